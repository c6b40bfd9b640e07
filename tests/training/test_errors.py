"""Every known bad input ends in ONE stderr line ``error: <what> (<file>, <field>): <what to do>`` and exit
status 2, without a traceback and without advice to load with ``weights_only=False``; ``--debug`` and
EFFDET_DEBUG=1 show the traceback; an unknown bug keeps its traceback."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
from datasets.synthetic import generate_synthetic
from training.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINE = re.compile(r"^error: \S.* \((?P<file>[^,]+), (?P<field>.+)\): \S.*$")
TINY = dict(seed=7, num_train=4, num_val=2, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """Checkpoints: a good one (ours, 3 classes), one whose pickle runs code, a truncated one, another model."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = build_model("efficientdet_d0", 3, (128, 128), backend="torch")
    torch.save({"model": m.state_dict(), "config": m.config.to_dict()}, d / "good.pth")
    torch.save({"model": Evil()}, d / "evil.pth", pickle_protocol=2)
    data = (d / "good.pth").read_bytes()
    (d / "cut.pth").write_bytes(data[: len(data) // 3])
    torch.save(build_model("efficientdet_d1", 3, (128, 128)).state_dict(), d / "d1.pth")
    return d


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def one_error_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "weights_only=False" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = LINE.match(lines[0])
    assert m, lines[0]
    return lines[0], m


def val_args(tiny, out, *extra, ann=None, images=None):
    return ["--val-ann", str(ann or tiny["val"]["ann_file"]), "--val-images", str(images or tiny["val"]["image_dir"]),
            "--output", str(out), "--workers", "0", "--device", "cpu", "--kernel-backend", "torch", *extra]


@pytest.mark.parametrize("name, extra, expect_what, expect_file", [
    ("evil.pth", [], "checkpoint refused: loading it would run code", "evil.pth"),
    ("cut.pth", [], "checkpoint is truncated", "cut.pth"),
    ("d1.pth", ["--model", "efficientdet_d0"], "does not fit efficientdet_d0", "d1.pth"),
    ("good.pth", ["--num_classes", "5"], "does not fit efficientdet_d0 with 5 classes", "good.pth"),
    ("missing.pth", [], "checkpoint file not found", "missing.pth"),
])
def test_bad_checkpoints(tiny, ckpt_dir, tmp_path, capsys, name, extra, expect_what, expect_file):
    rc = evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / name), *extra))
    line, m = one_error_line(capsys, rc)
    assert expect_what in line and m["file"].endswith(expect_file)
    if name in ("cut.pth", "missing.pth"):  # the file as a whole: the flag that named it
        assert m["field"] == "--checkpoint", line
    if name == "good.pth":  # a class-count change says how to get past it (a fresh head is no evaluation)
        assert "--num_classes" in line and "--remove-weights" not in line


def test_refused_pickle_names_the_culprit_and_never_suggests_weights_only(ckpt_dir, tiny, tmp_path, capsys):
    rc = evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "evil.pth")))
    line, m = one_error_line(capsys, rc)
    assert "system" in m["field"] and "do not load this file" in line


def test_malformed_annotation_file(tiny, tmp_path, capsys):
    bad = json.load(open(tiny["val"]["ann_file"]))
    bad["annotations"][0]["bbox"] = [1, 2, "wide", 4]
    path = tmp_path / "bad.json"
    json.dump(bad, open(path, "w"))
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, ann=path)))
    assert m["file"].endswith("bad.json") and m["field"] == "annotations[0].bbox"
    (tmp_path / "nojson.json").write_text("{ not json")
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, ann=tmp_path / "nojson.json")))
    assert "not a JSON file" in line


def _copy_images(tiny, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny["val"]["image_dir"], images)
    first = sorted(images.iterdir())[0]
    return images, first


def test_missing_image_without_skip_bad_images(tiny, ckpt_dir, tmp_path, capsys):
    images, first = _copy_images(tiny, tmp_path)
    first.unlink()
    rc = evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"), images=images))
    line, m = one_error_line(capsys, rc)
    assert m["file"] == str(first) and "--skip-bad-images" in line and "image id" in m["field"]


@pytest.mark.parametrize("workers", ["0", "1"])  # 1: the error is re-raised from a DataLoader worker process
def test_corrupt_image_without_skip_bad_images(tiny, ckpt_dir, tmp_path, capsys, workers):
    images, first = _copy_images(tiny, tmp_path)
    first.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"), images=images)
    args[args.index("--workers") + 1] = workers
    line, m = one_error_line(capsys, evaluate.main(args))
    assert "cannot decode image file" in line and m["file"] == str(first) and "--skip-bad-images" in line


def test_flag_combinations_that_cannot_work(tiny, ckpt_dir, tmp_path, capsys):
    rc = evaluate.main(["--images", str(tmp_path), "--detections", "d.json", "--checkpoint",
                        str(ckpt_dir / "good.pth"), "--output", str(tmp_path)])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--images"
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--num_classes", "1", "--output", str(tmp_path), "--device", "cpu", "--workers", "0"])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--num_classes" and m["file"].endswith(".json")
    line, m = one_error_line(capsys, train.main(["--waymo", "--output", str(tmp_path)]))
    assert m["field"] == "--waymo-train-annotation"
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--lr", "0", "--output", str(tmp_path), "--device", "cpu", "--workers", "0"])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--lr" and "must be > 0" in line


def test_debug_flag_and_environment_show_the_traceback(ckpt_dir, tiny, tmp_path, monkeypatch):
    from detector.checkpoint import CheckpointError

    args = val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "cut.pth"))
    with pytest.raises(CheckpointError):
        evaluate.main(args + ["--debug"])
    monkeypatch.setenv("EFFDET_DEBUG", "1")
    with pytest.raises(CheckpointError):
        evaluate.main(args)


def test_unknown_bug_keeps_its_traceback(tiny, ckpt_dir, tmp_path, monkeypatch):
    import detector.checkpoint

    def broken(*a, **k):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(detector.checkpoint, "load_for_inference", broken)
    with pytest.raises(ValueError, match="a bug"):
        evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth")))


def test_script_prints_one_line_and_exits_2(ckpt_dir, tiny, tmp_path):
    """The real command line: stderr is exactly the one line (no warning, no traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "EFFDET_DEBUG"}
    p = subprocess.run([sys.executable, "evaluate.py", *val_args(tiny, tmp_path, "--checkpoint",
                                                                 str(ckpt_dir / "evil.pth"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]) and "weights_only=False" not in p.stderr, p.stderr


def test_malformed_detections_file(tiny, tmp_path, capsys):
    bad = tmp_path / "dets.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, -3, 4], "score": 0.5}]))
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--detections", str(bad))))
    assert m["file"].endswith("dets.json") and "entry #0" in line and "bbox" in line
    bad.write_text("[{")
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--detections", str(bad))))
    assert "not a JSON file" in line and m["file"].endswith("dets.json")


def test_files_that_are_no_checkpoint_and_folders(tiny, tmp_path, capsys):
    """A text file or an image is "not a PyTorch file" (not a pickle that would run code); a folder where a file
    belongs is said to be one."""
    (tmp_path / "text.pth").write_text("hello world\n")
    (tmp_path / "image.pth").write_bytes((Path(ROOT) / "docs" / "images" / "glyphs_sample.png").read_bytes()[:2000])
    for name, kind in (("text.pth", "KeyError"), ("image.pth", "UnpicklingError")):
        rc = evaluate.main(val_args(tiny, tmp_path / "out", "--checkpoint", str(tmp_path / name)))
        line, m = one_error_line(capsys, rc)
        assert f"checkpoint is truncated or not a PyTorch file ({kind})" in line, line
        assert m["field"] == "--checkpoint", line
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path / "out", "--checkpoint", str(tmp_path))))
    assert "checkpoint is a folder" in line and m["file"] == str(tmp_path) and m["field"] == "--checkpoint"
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path / "out", ann=tmp_path)))
    assert "annotation file is a folder" in line and m["field"] == "--val-ann"
    for det in (tmp_path / "none.json", tmp_path):
        line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path / "out", "--detections", str(det))))
        assert ("detections file not found" if det.suffix else "detections file is a folder") in line
        assert m["field"] == "--detections"


def test_detections_of_images_or_categories_the_annotations_lack(tiny, tmp_path, capsys):
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    image, cat = gt["images"][0]["id"], gt["categories"][0]["id"]
    for entry, field in (({"image_id": 99999, "category_id": cat}, "[1].image_id"),
                         ({"image_id": image, "category_id": 77}, "[1].category_id")):
        dets = [{"image_id": image, "category_id": cat, "bbox": [0, 0, 3, 4], "score": 0.5},
                {**entry, "bbox": [0, 0, 3, 4], "score": 0.4}]
        (tmp_path / "dets.json").write_text(json.dumps(dets))
        rc = evaluate.main(val_args(tiny, tmp_path, "--detections", str(tmp_path / "dets.json")))
        line, m = one_error_line(capsys, rc)
        assert m["file"].endswith("dets.json") and m["field"] == field, line
    dets = [{"image_id": image, "category_id": cat, "bbox": [0, 0, 3, 4]}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--detections", str(tmp_path / "dets.json"))))
    assert m["field"] == "[0].score"


def test_checkpoint_categories_the_data_lacks(tiny, ckpt_dir, tmp_path, capsys):
    """Our checkpoint records its category ids: none of them in the data is an error before any inference;
    some of them missing leaves those classes' detections out and says so."""
    state = torch.load(ckpt_dir / "good.pth")
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    ids = [c["id"] for c in gt["categories"]]
    torch.save({**state, "label_to_cat_id": {i: c + 100 for i, c in enumerate(ids)}}, tmp_path / "other.pth")
    rc = evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(tmp_path / "other.pth")))
    line, m = one_error_line(capsys, rc)
    assert "none of the checkpoint's category ids" in line and m["field"] == "categories"
    torch.save({**state, "label_to_cat_id": {0: ids[0], 1: ids[1], 2: 100}}, tmp_path / "some.pth")
    assert evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(tmp_path / "some.pth"))) == 0
    assert "the data has no category [100]" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flags, field", [(["-b", "0"], "--batch-size"), (["--input_size", "300"], "--input_size"),
                                          (["--input_size", "0"], "--input_size"),
                                          (["--input_size", "128", "256", "384"], "--input_size"),
                                          (["--device", "foo"], "--device"), (["--device", "cuda:1"], "--device")])
def test_flags_this_machine_or_model_cannot_run(tiny, ckpt_dir, tmp_path, capsys, flags, field):
    args = val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"))
    args = [a for a in args if a not in ("--device", "cpu")] + flags  # the flag under test, not val_args' device
    line, m = one_error_line(capsys, evaluate.main(args))
    assert m["field"] == field, line
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--output", str(tmp_path), "--workers", "0", "--max-steps", "1", *flags]
                    + ([] if "--device" in flags else ["--device", "cpu"]))
    line, m = one_error_line(capsys, rc)
    assert m["field"] == field, line


@pytest.mark.parametrize("flags, env, field", [
    (["--kernel-backend", "triton"], {}, "--kernel-backend"),
    ([], {"EFFDET_KERNEL_BACKEND": "triton"}, "EFFDET_KERNEL_BACKEND"),
    ([], {"EFFDET_KERNEL_BACKEND": "bogus"}, "EFFDET_KERNEL_BACKEND")])
def test_kernel_backends_this_machine_cannot_run(tiny, ckpt_dir, tmp_path, capsys, monkeypatch, flags, env, field):
    """Triton asked for on CPU tensors without the interpreter: one line before any data or model is built
    (it was a traceback from the first kernel call)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so the Triton kernels can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conftest turns the interpreter on for the kernel tests
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [a for a in val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"))]
    args = args[:args.index("--kernel-backend")] + args[args.index("--kernel-backend") + 2:] + flags
    line, m = one_error_line(capsys, evaluate.main(args))
    assert m["field"] == field, line
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--output", str(tmp_path), "--workers", "0", "--max-steps", "1", "--device", "cpu", *flags])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == field, line
    assert not (tmp_path / "last.pth").exists()  # refused before training


@pytest.mark.parametrize("flag", ["--train-ann", "--val-ann", "--initial-checkpoint", "--resume",
                                  "--pretrained-backbone-path"])
def test_training_files_not_found_name_their_flag(tiny, tmp_path, capsys, flag):
    """A file a flag names that is missing: the error's field is that flag (the backbone's advice is its own)."""
    args = {"--train-ann": tiny["train"]["ann_file"], "--train-images": tiny["train"]["image_dir"],
            "--val-ann": tiny["val"]["ann_file"], "--val-images": tiny["val"]["image_dir"]}
    args[flag] = str(tmp_path / "missing.file")
    argv = [x for kv in args.items() for x in kv]
    rc = train.main(argv + ["--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "--max-steps", "1",
                            "-b", "2"])
    line, m = one_error_line(capsys, rc)
    assert "not found" in line and m["file"].endswith("missing.file") and m["field"] == flag, line
    if flag == "--pretrained-backbone-path":
        assert "backbone weights" in line and "last.pth" not in line, line


def test_fields_name_the_flag_the_user_gave_or_the_entry(tiny, ckpt_dir, tmp_path, capsys, monkeypatch):
    """The field of a one-line error is the flag that really gave the value (a data root is ``data``, not an
    annotation flag the user never passed; --remove-weights, not the checkpoint it applies to) or the entry
    inside the file (an empty 'images'), and an image folder without the listed images names that folder."""
    train_args = ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                  "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "--max-steps", "1", "-b", "2"]
    rc = train.main(train_args + ["--initial-checkpoint", str(ckpt_dir / "good.pth"), "--remove-weights", "nosuch"])
    line, m = one_error_line(capsys, rc)
    assert "matches no parameter" in line and m["field"] == "--remove-weights", line
    (tmp_path / "root").mkdir()
    line, m = one_error_line(capsys, evaluate.main([str(tmp_path / "root"), "--output", str(tmp_path / "o"),
                                                    "--device", "cpu", "--checkpoint", str(ckpt_dir / "good.pth")]))
    assert "annotation file not found" in line and m["field"] == "data", line
    empty = json.loads(open(tiny["val"]["ann_file"]).read())
    empty["images"] = []
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"),
                                                            ann=tmp_path / "empty.json")))
    assert "contains no images" in line and m["field"] == "images", line
    (tmp_path / "no_images").mkdir()
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"),
                                                            "--skip-bad-images", images=tmp_path / "no_images")))
    assert "no usable images" in line and m["file"] == str(tmp_path / "no_images"), line
    assert m["field"] == "image folder" and "--val-images" in line, line


def test_values_that_do_not_matter_to_the_run_are_not_refused(tiny, tmp_path, capsys, monkeypatch):
    """A detections file is scored without a model or kernels: its --model and the kernel environment are not
    checked; an explicit --kernel-backend wins over a stale EFFDET_KERNEL_BACKEND, as backend= does."""
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    dets = [{"image_id": gt["images"][0]["id"], "category_id": gt["categories"][0]["id"], "bbox": [1, 2, 10, 10],
             "score": 0.9}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    monkeypatch.setenv("EFFDET_KERNEL_BACKEND", "bogus")
    args = val_args(tiny, tmp_path, "--detections", str(tmp_path / "dets.json"), "--model", "foo")
    assert evaluate.main([a for a in args if a not in ("--kernel-backend", "torch")]) == 0, capsys.readouterr().err
    from training.host import check_kernel_backend

    check_kernel_backend("torch", cuda=False)  # the flag given: the environment variable is not read


def test_skipped_images_are_counted_in_the_evaluation(tiny, ckpt_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny["val"]["image_dir"], images)
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    (images / gt["images"][0]["file_name"]).write_bytes(b"not an image")     # undecodable
    gt["images"].append(dict(gt["images"][0], id=999, file_name="gone.png"))  # missing
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    rc = evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"), "--skip-bad-images",
                                ann=tmp_path / "ann.json", images=images))
    assert rc == 0
    out = " ".join(capsys.readouterr().out.split())
    n = len(gt["images"])
    assert f"2 of {n} images left out (--skip-bad-images): 1 missing, 1 undecodable; scored over the other " \
           f"{n - 2}" in out, out
    event = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
    assert event["skipped_images"] == 2 and event["images"] == n - 2


@pytest.mark.parametrize("flags, field", [(["-vb", "0"], "--validation-batch-size-multiplier"),
                                          (["--opt", "foo"], "--opt"), (["--epochs", "0"], "--epochs"),
                                          (["--max-steps", "0"], "--max-steps"), (["--output", "FILE/sub"], "--output"),
                                          (["--num_classes", "0"], "--num_classes"),
                                          (["--model-ema-decay", "1.5"], "--model-ema-decay"),
                                          (["--momentum", "2"], "--momentum"), (["--warmup-epochs", "-1"], "--warmup-epochs"),
                                          (["--lr-noise", "0.9", "0.4"], "--lr-noise"),
                                          (["--start-epoch", "-1"], "--start-epoch"),
                                          (["--clip-grad", "-1"], "--clip-grad"), (["--weight-decay", "-1"], "--weight-decay"),
                                          (["--smoothing", "2"], "--smoothing"), (["--drop-path", "2"], "--drop-path"),
                                          (["--seed", "-1"], "--seed"), (["--workers", "-1"], "--workers"),
                                          (["--nproc", "0"], "--nproc"),
                                          (["--sched", "step", "--decay-epochs", "0"], "--decay-epochs"),
                                          (["--epochs", "2", "--start-epoch", "2", "-b", "2"], "--start-epoch")])
def test_training_values_that_cannot_run(tiny, tmp_path, capsys, flags, field):
    (tmp_path / "file").write_text("")
    flags = [f.replace("FILE", str(tmp_path / "file")) for f in flags]
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu", *flags])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == field, line


def test_training_set_without_boxes(tiny, tmp_path, capsys):
    gt = json.loads(open(tiny["train"]["ann_file"]).read())
    gt["annotations"] = []
    (tmp_path / "empty.json").write_text(json.dumps(gt))
    rc = train.main(["--train-ann", str(tmp_path / "empty.json"), "--train-images", tiny["train"]["image_dir"],
                     "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert "no boxes" in line and m["file"].endswith("empty.json") and m["field"] == "annotations"


def test_validation_categories_other_than_the_training_ones(tiny, tmp_path, capsys):
    """The model's class i is the training file's i-th category: a validation file listing other categories was
    scored (and drawn) under its own mapping, AP 0 for a perfect model. Refused at start, naming both sides."""
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    dropped = gt["categories"][0]["id"]
    gt["categories"] = gt["categories"][1:]
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != dropped]
    (tmp_path / "val.json").write_text(json.dumps(gt))
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--val-ann", str(tmp_path / "val.json"), "--val-images", tiny["val"]["image_dir"],
                     "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "-b", "2"])
    line, m = one_error_line(capsys, rc)
    assert "categories differ" in line and f"only in the training file: [{dropped}]" in line, line
    assert m["file"].endswith("val.json") and m["field"] == "categories", line


def test_data_root_and_annotation_flags_together(tiny, tmp_path, capsys):
    rc = train.main([str(tmp_path), "--train-ann", tiny["train"]["ann_file"], "--train-images",
                     tiny["train"]["image_dir"], "--output", str(tmp_path / "out"), "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert "both DATA and --train-ann" in line and m["field"] == "data"


def test_image_folders_without_their_annotation_file(tiny, tmp_path, capsys):
    """--train-images / --val-images alone were ignored: the built-in set trained, or validation was left out."""
    rc = train.main(["--train-images", tiny["train"]["image_dir"], "--output", str(tmp_path), "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert "--train-images without --train-ann" in line and m["field"] == "--train-images"
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
                     "--output", str(tmp_path), "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--val-images", line
    rc = evaluate.main(["--val-images", tiny["val"]["image_dir"], "--output", str(tmp_path), "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--val-images", line


def test_image_flags_recorded_in_an_older_checkpoint_are_not_checked(capsys):
    """The check is for the command line: a checkpoint of a run that passed DATA and --val-images (ignored
    then) still evaluates on DATA's val set, instead of failing on a flag evaluate.py was not given."""
    from training.config import eval_parser

    state = {"args": {"data": "/d", "val_images": "/elsewhere"}}
    ann, images = evaluate.recorded_data_paths(eval_parser().parse_args([]), lambda: ("c.pth", state))
    assert (ann, images) == ("/d/annotations/instances_val2017.json", "/d/val2017")


def test_detections_file_without_ground_truth(tiny, tmp_path, capsys):
    """It was scored against the built-in set's val split."""
    (tmp_path / "dets.json").write_text("[]")
    line, m = one_error_line(capsys, evaluate.main(["--detections", str(tmp_path / "dets.json"),
                                                    "--output", str(tmp_path)]))
    assert m["field"] == "--val-ann" and m["file"].endswith("dets.json"), line


def test_validation_set_without_annotations(tiny, ckpt_dir, tmp_path, capsys):
    """Found before training (it ended the first epoch in a traceback, before that epoch's checkpoint was saved)
    and before inference; --inference still writes detections."""
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    gt["annotations"] = []
    (tmp_path / "noboxes.json").write_text(json.dumps(gt))
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                     "--val-ann", str(tmp_path / "noboxes.json"), "--val-images", tiny["val"]["image_dir"],
                     "--output", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])
    line, m = one_error_line(capsys, rc)
    assert m["file"].endswith("noboxes.json") and m["field"] == "annotations", line
    args = val_args(tiny, tmp_path, "--checkpoint", str(ckpt_dir / "good.pth"), ann=tmp_path / "noboxes.json")
    line, m = one_error_line(capsys, evaluate.main(args))
    assert m["file"].endswith("noboxes.json") and "--inference" in line, line
    assert evaluate.main(args + ["--inference"]) == 0 and (tmp_path / "detections.json").exists()


def test_results_path_that_cannot_be_a_file(tiny, ckpt_dir, tmp_path, capsys):
    """Checked before inference (it was an IsADirectoryError after it)."""
    (tmp_path / "file").write_text("")
    for bad in (tmp_path, tmp_path / "file" / "dets.json"):
        rc = evaluate.main(val_args(tiny, tmp_path / "out", "--checkpoint", str(ckpt_dir / "good.pth"),
                                    "--results", str(bad)))
        line, m = one_error_line(capsys, rc)
        assert m["field"] == "--results", line


def test_checkpoint_categories_named_otherwise_in_the_data(tiny, ckpt_dir, tmp_path, capsys):
    """The same ids naming other classes (a re-numbered annotation file) would score one class as another."""
    state = torch.load(ckpt_dir / "good.pth")
    gt = json.loads(open(tiny["val"]["ann_file"]).read())
    ids = [c["id"] for c in gt["categories"]]
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    mapping = {i: c for i, c in enumerate(sorted(ids))}
    torch.save({**state, "label_to_cat_id": mapping, "class_names": names[1:] + names[:1]}, tmp_path / "x.pth")
    line, m = one_error_line(capsys, evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(tmp_path / "x.pth"))))
    assert m["field"] == "categories" and f"{names[1]!r} in the checkpoint, {names[0]!r} in the data" in line, line
    torch.save({**state, "label_to_cat_id": mapping, "class_names": [n.upper() for n in names]}, tmp_path / "y.pth")
    assert evaluate.main(val_args(tiny, tmp_path, "--checkpoint", str(tmp_path / "y.pth"))) == 0  # case aside


def test_resume_from_what_is_no_training_state(tiny, ckpt_dir, tmp_path, capsys):
    """Weights only, or an optimizer other than the run's: one line (a KeyError, or a KeyError at the first step)."""
    base = ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"], "-b", "2",
            "--input_size", "128", "--workers", "0", "--device", "cpu", "--kernel-backend", "torch"]
    for extra in ([], ["--no-resume-opt"]):
        rc = train.main(base + ["--output", str(tmp_path / "a"), "--resume", str(ckpt_dir / "good.pth"), *extra])
        line, m = one_error_line(capsys, rc)
        assert m["field"] == "--resume" and "--initial-checkpoint" in line, line
    assert train.main(base + ["--output", str(tmp_path / "b"), "--max-steps", "1", "--opt", "adamw"]) == 0
    capsys.readouterr()
    rc = train.main(base + ["--output", str(tmp_path / "b"), "--resume", "--opt", "sgd"])
    line, m = one_error_line(capsys, rc)
    assert m["field"] == "--opt" and "--no-resume-opt" in line, line


def test_undecodable_training_images_are_counted_at_the_end(tiny, tmp_path, capsys):
    """--skip-bad-images in training: the images replaced in the loader's workers are counted once each by the
    main process, said at the end and listed in the log's end event (the count stayed in the workers)."""
    images = tmp_path / "images"
    shutil.copytree(tiny["train"]["image_dir"], images)
    gt = json.loads(open(tiny["train"]["ann_file"]).read())
    for im in gt["images"][:2]:
        (images / im["file_name"]).write_bytes(b"not an image")
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", str(images), "-b", "2",
                     "--input_size", "128", "--epochs", "2", "--workers", "1", "--device", "cpu",
                     "--kernel-backend", "torch", "--skip-bad-images", "--output", str(tmp_path / "out")])
    assert rc == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"2 of {len(gt['images'])} training images could not be decoded" in said, said
    end = [json.loads(l) for l in open(tmp_path / "out" / "log.jsonl")][-1]
    assert end["event"] == "end" and sorted(os.path.basename(p) for p in end["undecodable_train_images"]) == \
        sorted(im["file_name"] for im in gt["images"][:2])
    # a run stopped early (--max-steps, or interrupted) says it too: one batch of every image
    rc = train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", str(images), "-b",
                     str(len(gt["images"])), "--input_size", "128", "--epochs", "2", "--max-steps", "1", "--workers",
                     "0", "--device", "cpu", "--kernel-backend", "torch", "--skip-bad-images", "--output",
                     str(tmp_path / "out2")])
    assert rc == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "--max-steps 1 reached" in said and f"2 of {len(gt['images'])} training images could not be" in said, said
