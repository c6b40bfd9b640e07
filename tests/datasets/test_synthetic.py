"""The synthetic set: COCO-readable, deterministic, atomic, cached by parameters."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import datasets.synthetic as syn
from datasets.coco import CocoDetection

from .conftest import TINY


def read_all(d):
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_reads_back_through_coco_loader(tiny_synthetic):
    p = tiny_synthetic
    assert p["class_names"] == ["circle", "square", "triangle"]
    for split, n in (("train", 8), ("val", 4)):
        ds = CocoDetection(p[split]["ann_file"], p[split]["image_dir"])
        assert len(ds) == n and ds.class_names == p["class_names"]
        assert not ds.stats  # nothing clipped, dropped or missing
        assert ds.label_to_cat_id == {0: 1, 1: 2, 2: 3}
        assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in ds.cat_ids)
        for i in range(n):
            s = ds[i]
            assert s["image"].shape == (64, 64, 3)
            assert 1 <= len(s["labels"]) <= syn.DEFAULT_MAX_OBJECTS_PER_IMAGE
            assert ((s["labels"] >= 0) & (s["labels"] < 3)).all()
            wh = s["boxes"][:, 2:] - s["boxes"][:, :2]
            assert (wh >= TINY["min_object"]).all() and (wh <= TINY["max_object"]).all()
            assert (s["boxes"] >= 0).all() and (s["boxes"] <= 64).all()


def test_shapes_are_drawn_where_the_boxes_are():
    img, objects = syn.render_image(0, 0, 5, 96, 6, 16, 48, textured=False, max_objects=4)
    bg = img[0, 0]
    for cls, (x0, y0, x1, y1), area in objects:
        inner = img[y0:y1, x0:x1]
        assert (np.abs(inner.astype(int) - bg).sum(-1) > 0).any(), (cls, x0, y0)
        assert 0 < area <= (x1 - x0) * (y1 - y0)


def test_deterministic_bytes(tmp_path):
    kw = {**TINY, "num_train": 3, "num_val": 2}
    a = read_all(syn.generate_synthetic(tmp_path / "a", **kw)["root"])
    b = read_all(syn.generate_synthetic(tmp_path / "b", **kw)["root"])
    assert a == b and len(a) == 3 + 2 + 3
    c = read_all(syn.generate_synthetic(tmp_path / "c", **{**kw, "seed": kw["seed"] + 1})["root"])
    assert c["train/000000.png"] != a["train/000000.png"]


def test_worker_processes_give_the_same_bytes(tmp_path):
    kw = {**TINY, "num_train": 64, "num_val": 1, "image_size": 32, "min_object": 4, "max_object": 16}
    a = read_all(syn.generate_synthetic(tmp_path / "a", **{**kw, "workers": 1})["root"])
    b = read_all(syn.generate_synthetic(tmp_path / "b", **{**kw, "workers": 2})["root"])
    assert a == b


def test_ensure_caches_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDET_DATA", str(tmp_path))
    kw = {k: v for k, v in TINY.items() if k != "workers"}
    p = syn.ensure_synthetic(**kw)
    root = Path(p["root"])
    assert root.parent == tmp_path and root.name == syn.synthetic_name(**kw)
    mtime = os.stat(p["train"]["ann_file"]).st_mtime_ns
    calls = []
    monkeypatch.setattr(syn, "_write_split", lambda *a, **k: calls.append(a))
    assert syn.ensure_synthetic(**kw) == p and not calls  # reused, not regenerated
    assert os.stat(p["train"]["ann_file"]).st_mtime_ns == mtime
    other = syn.synthetic_name(**{**kw, "min_object": 9})
    assert other != root.name


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    real = syn._write_split

    def failing(root, name, *a, **k):
        if name == "val":
            raise RuntimeError("disk full")
        return real(root, name, *a, **k)

    monkeypatch.setattr(syn, "_write_split", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        syn.generate_synthetic(tmp_path / "out", **TINY)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder


def test_unfinished_folder_is_not_taken_for_a_finished_one(tmp_path):
    out = tmp_path / "out"
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(ValueError, match="not a finished synthetic set"):
        syn.generate_synthetic(out, **TINY)
    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    syn.generate_synthetic(tmp_path / "empty", **{**TINY, "num_train": 1, "num_val": 1})
    with pytest.raises(ValueError, match="other parameters"):
        syn.generate_synthetic(tmp_path / "empty", **{**TINY, "num_train": 2, "num_val": 1})


def test_more_classes_and_bad_parameters(tmp_path):
    p = syn.generate_synthetic(tmp_path / "six", **{**TINY, "num_classes": 6, "num_train": 6, "num_val": 1})
    assert p["class_names"] == ["circle", "square", "triangle", "cross", "ring", "diamond"]
    data = json.loads(Path(p["train"]["ann_file"]).read_text())
    assert [c["name"] for c in data["categories"]] == p["class_names"]
    for bad in ({"num_classes": 7}, {"num_classes": 0}, {"min_object": 40, "max_object": 20}, {"num_train": 0},
                {"image_size": 4}):
        with pytest.raises(ValueError):
            syn.generate_synthetic(tmp_path / "bad", **{**TINY, **bad})


def test_cli(tmp_path, capsys):
    rc = syn.main(["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--size", "40",
                   "--classes", "4", "--min-object", "8", "--max-object", "20", "--workers", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ds = CocoDetection(out["train"]["ann_file"], out["train"]["image_dir"])
    assert len(ds) == 2 and ds.class_names[-1] == "cross" and ds[0]["image"].shape == (40, 40, 3)


def test_defaults_are_module_constants():
    assert (syn.DEFAULT_IMAGE_SIZE, syn.DEFAULT_NUM_CLASSES) == (256, 3)
    assert syn.DEFAULT_MIN_OBJECT < syn.DEFAULT_MAX_OBJECT <= syn.DEFAULT_IMAGE_SIZE
    assert syn.DEFAULT_NUM_TRAIN > syn.DEFAULT_NUM_VAL > 0


def test_cli_out_that_cannot_be_a_folder_is_an_error_not_a_traceback(tmp_path, capsys):
    import pytest

    from datasets.synthetic import main

    (tmp_path / "file.json").write_text("{}")
    for out in (tmp_path / "file.json", tmp_path / "file.json" / "sub"):
        with pytest.raises(SystemExit) as exit:
            main(["--out", str(out), "--num-train", "2", "--num-val", "1"])
        assert exit.value.code == 2 and "file.json" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_no_objects_per_image_is_said_before_drawing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # it failed inside numpy's sampler ("low >= high")
        syn.main(["--out", str(tmp_path / "s"), "--max-objects-per-image", "0", "--num-train", "2", "--num-val", "1"])
    assert exit.value.code == 2
    assert "max_objects_per_image must be >= 1, got 0" in capsys.readouterr().err.strip().splitlines()[-1]

