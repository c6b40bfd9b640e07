"""NVIDIA EfficientDet-PyTorch checkpoints load and give NVIDIA's outputs.

The files are re-created from ``tests/fixtures/nvidia/manifest.json``, which ``make_manifest.py`` recorded by
running NVIDIA's own model code, training-checkpoint saver and ``checkpoint_processing.py`` (see there): same
keys, shapes, dtypes, top-level entries and pickle globals, weights from a seeded recipe, and per-level output
statistics of NVIDIA's model for those weights, which ours must reproduce to 1e-4.
"""
import json
import os

import numpy as np
import pytest
import torch

from detector.anchors import anchors_for
from detector.checkpoint import CheckpointError, infer_num_classes, load_for_inference, read
from detector.configs import get_config
from tests.fixtures.nvidia import recipe

MANIFEST = json.load(open(os.path.join(os.path.dirname(recipe.__file__), "manifest.json")))
LAYOUTS = MANIFEST["layouts"]
TRAINING, PROCESSED = "model_best.pth.tar", "Effdet_B0.pth"
# COCO 2017's 80 category ids (1..90 without the ten unused ones) and Waymo's three
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
CATEGORY_IDS = {"d0_coco": COCO_IDS, "d0_waymo": [1, 2, 3]}


@pytest.fixture(scope="module")
def nvidia_file(tmp_path_factory):
    """``nvidia_file(layout, file, numpy1)`` -> path of the re-created file (each built once)."""
    cache = {}

    def get(tag, name, numpy1=False):
        if (tag, name, numpy1) not in cache:
            layout = LAYOUTS[tag]
            path = tmp_path_factory.mktemp(tag) / name
            recipe.save(recipe.synth_checkpoint(layout["files"][name], layout["keys"]), path, numpy1=numpy1)
            cache[tag, name, numpy1] = path
        return cache[tag, name, numpy1]

    return get


def test_manifest_records_what_the_old_fixture_left_out():
    for tag, layout in LAYOUTS.items():
        keys = [k for k, _, _ in layout["keys"]["training"]]
        assert "anchors.boxes" in keys and all(k.startswith("model.") for k in keys if k != "anchors.boxes"), tag
        entries = layout["files"][TRAINING]["entries"]
        assert entries["metric"]["type"] == "numpy.float64", tag
        assert {"state_dict", "state_dict_ema", "optimizer", "epoch"} <= set(entries), tag
    assert LAYOUTS["d0_coco"]["class_head_classes"] == 96 and LAYOUTS["d0_coco"]["num_classes"] == 90
    assert LAYOUTS["d0_waymo"]["num_classes"] == 3


@pytest.mark.parametrize("tag", sorted(LAYOUTS))
@pytest.mark.parametrize("name,numpy1", [(TRAINING, False), (TRAINING, True), (PROCESSED, False)])
def test_recreated_file_is_pickled_like_nvidias(nvidia_file, tag, name, numpy1):
    expected = LAYOUTS[tag]["files"][name]["pickle_globals"]
    if numpy1:  # numpy 1 wrote numpy.core where numpy 2 writes numpy._core
        expected = sorted(g.replace("numpy._core.", "numpy.core.") for g in expected)
    assert recipe.pickle_globals(nvidia_file(tag, name, numpy1)) == expected


@pytest.mark.parametrize("numpy1", [False, True])
def test_training_file_reads_with_weights_only_and_keeps_numpy_metric(nvidia_file, numpy1):
    spec = LAYOUTS["d0_coco"]["files"][TRAINING]
    obj = read(str(nvidia_file("d0_coco", TRAINING, numpy1)))
    assert list(obj) == list(spec["entries"])
    for name, e in spec["entries"].items():
        assert f"{type(obj[name]).__module__}.{type(obj[name]).__qualname__}" == e["type"], name
    assert isinstance(obj["metric"], np.float64) and obj["metric"] == spec["entries"]["metric"]["value"]
    assert obj["state_dict"]["anchors.boxes"].shape == (49104, 4)


CASES = [  # (layout, file, numpy-1 pickle, use_ema); NVIDIA's validation scripts pass --use-ema with either file
    ("d0_coco", TRAINING, False, False), ("d0_coco", TRAINING, True, True), ("d0_coco", PROCESSED, False, True),
    ("d0_waymo", TRAINING, True, False), ("d0_waymo", PROCESSED, False, False),
]


@pytest.mark.parametrize("tag,name,numpy1,use_ema", CASES)
def test_outputs_equal_nvidias_model(nvidia_file, tag, name, numpy1, use_ema):
    layout = LAYOUTS[tag]
    x = recipe.fixed_input(MANIFEST["input"])
    loaded = load_for_inference(str(nvidia_file(tag, name, numpy1)), model_name=layout["model"],
                                category_ids=CATEGORY_IDS[tag], image_size=tuple(x.shape[-2:]), use_ema=use_ema,
                                backend="torch")
    assert loaded.model.config.num_classes == layout["num_classes"]
    assert "NVIDIA" in loaded.description
    with torch.no_grad():
        cls, box = loaded.model(x)
    # the processed file holds the EMA weights: it answers to the EMA reference with or without --use-ema
    ref = layout["reference"]["state_dict_ema" if use_ema or name == PROCESSED else "state_dict"]
    for got, want in ((recipe.output_stats(cls, seed=1), ref["class"]), (recipe.output_stats(box, seed=2), ref["box"])):
        assert [g["shape"] for g in got] == [w["shape"] for w in want]
        for g, w in zip(got, want):
            assert g["probe_index"] == w["probe_index"]
            for field in ("mean", "abs_mean", "probe_value"):
                torch.testing.assert_close(torch.tensor(g[field]), torch.tensor(w[field]), rtol=1e-4, atol=1e-4,
                                           msg=f"{tag} {name} level {got.index(g)} {field}")


def _head(classes: int, nvidia: bool = True) -> dict:
    sd = {"class_net.predict.conv_pw.bias": torch.zeros(9 * classes)}
    if nvidia:
        sd["backbone.input_conv.0.weight"] = torch.zeros(32, 3, 3, 3)
    return sd


def test_class_count_from_the_head():
    assert infer_num_classes(_head(96), COCO_IDS) == 90  # --fused-focal-loss: 90 padded to 96
    assert infer_num_classes(_head(90), COCO_IDS) == 90  # without it: the head as is (evaluate.py refused this)
    assert infer_num_classes(_head(80), COCO_IDS) == 80  # contiguous over the data's 80 categories
    assert infer_num_classes(_head(3), [1, 2, 3]) == 3
    assert infer_num_classes(_head(8), [1, 2, 3]) == 3  # Waymo trained with --fused-focal-loss
    assert infer_num_classes(_head(90, nvidia=False), [1, 2, 3]) == 90  # effdet: never padded
    with pytest.raises(CheckpointError, match="predicts 8 classes.*80 categories.*--num_classes"):
        infer_num_classes(_head(8), COCO_IDS)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refused_files_give_one_line_errors(tmp_path):
    cases = {"evil.pth": {"state_dict": {}, "metric": _Evil()},
             "array.pth": {"state_dict": {}, "metric": np.zeros(3)}}  # numpy arrays are not on the allow-list
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="refused") as e:
            read(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value) and "GLOBAL" in str(e.value), str(e.value)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "array.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read(str(tmp_path / "cut.pth"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tag", sorted(LAYOUTS))
def test_anchors_equal_nvidias(tag):
    """NVIDIA's ``anchors.boxes`` is dropped on load because ours are the same boxes (at 512 and 1536 px)."""
    layout = LAYOUTS[tag]
    cfg = get_config(layout["model"], image_size=layout["image_size"])
    want = layout["anchors_xyxy"]
    got = recipe.output_stats([anchors_for(cfg)], seed=3)[0]
    assert got["shape"] == want["shape"] and got["probe_index"] == want["probe_index"]
    for field in ("mean", "abs_mean", "probe_value"):
        torch.testing.assert_close(torch.tensor(got[field]), torch.tensor(want[field]), rtol=1e-6, atol=1e-3)


def test_load_for_inference_rebuilds_our_checkpoint_from_its_config(tmp_path):
    from detector import create_model
    from detector.checkpoint import save

    torch.manual_seed(0)
    m = create_model("efficientdet_d0", num_classes=5, image_size=(128, 256), backend="torch",
                     backbone_bn_eps=1e-3).eval()
    save({"model": m.state_dict(), "config": m.config.to_dict(), "epoch": 4}, str(tmp_path / "ours.pth"))
    loaded = load_for_inference(str(tmp_path / "ours.pth"), backend="torch")  # no name, size or class count given
    cfg = loaded.model.config
    assert (cfg.name, cfg.num_classes, cfg.image_size, cfg.backbone_bn_eps) == ("efficientdet_d0", 5, (128, 256), 1e-3)
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0][0], m(x)[0][0])
    torch.save(m.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="plain.pth does not record its model: pass --model"):
        load_for_inference(str(tmp_path / "plain.pth"))


def test_evaluate_runs_nvidias_processed_file_on_coco_categories(nvidia_file, tmp_path, capsys):
    """``evaluate.py DATA --model efficientdet_d0 --checkpoint Effdet_B0.pth`` just runs: the processed file's
    class head (90 classes padded to 96) is unpadded, and class i maps to COCO category id i + 1 on a tiny set
    that declares COCO's 80 categories (its objects use three of them)."""
    import evaluate
    from datasets.synthetic import generate_synthetic

    layout = LAYOUTS["d0_coco"]
    syn = generate_synthetic(tmp_path / "syn", seed=11, num_train=1, num_val=2, image_size=64, num_classes=3,
                             min_object=12, max_object=40, workers=1)
    ann = json.load(open(syn["val"]["ann_file"]))
    used = {c["id"]: cid for c, cid in zip(ann["categories"], (1, 18, 90))}  # person, dog, toothbrush
    ann["categories"] = [{"id": i, "name": f"coco{i}", "supercategory": "x"} for i in COCO_IDS]
    for a in ann["annotations"]:
        a["category_id"] = used[a["category_id"]]
    (tmp_path / "val.json").write_text(json.dumps(ann))
    out = tmp_path / "out"
    argv = ["--val-ann", str(tmp_path / "val.json"), "--val-images", syn["val"]["image_dir"], "--model",
            layout["model"], "--checkpoint", str(nvidia_file("d0_coco", PROCESSED)), "--input_size", "128",
            "--device", "cpu", "--kernel-backend", "torch", "--output", str(out)]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    said = " ".join(capsys.readouterr().out.split())
    assert "NVIDIA's processed file" in said and "class padding converted" in said, said
    event = [json.loads(x) for x in open(out / "eval.jsonl")][-1]
    assert "AP" in event
    dets = json.load(open(out / "detections.json"))
    assert dets and {d["category_id"] for d in dets} <= set(COCO_IDS)
    assert len({d["category_id"] for d in dets}) > 3  # the 90-class head, not just the three categories used
