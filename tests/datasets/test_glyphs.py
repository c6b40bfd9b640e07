"""The glyphs family: true ink boxes, honoured ranges, deterministic, COCO-readable, cached apart from shapes."""
import json
from pathlib import Path

import numpy as np
import pytest

import datasets.glyphs as gl
import datasets.synthetic as syn
from datasets.coco import CocoDetection

SMALL = dict(family="glyphs", seed=7, num_train=6, num_val=3, image_size=128, num_classes=12, min_object=10,
             max_object=28, min_objects_per_image=4, max_objects_per_image=9, workers=1)


@pytest.fixture(scope="module")
def small_glyphs(tmp_path_factory):
    return syn.generate_synthetic(tmp_path_factory.mktemp("gl") / "small", **SMALL)


def read_all(d):
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def ink_box(mask, threshold=1):
    ys, xs = np.nonzero(mask >= threshold)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("char", ["1", "7", "A", "M"])
@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_glyph_mask_is_cropped_to_its_ink(char, angle):
    m = gl.render_glyph(char, 30, angle)
    assert ink_box(m) == [0, 0, m.shape[1], m.shape[0]]  # every border row and column holds ink
    assert m[m > 0].min() >= gl.INK_THRESHOLD  # faint fringe cleared: nothing drawn outside the box
    if not angle:
        assert max(m.shape) == 30
    assert abs(max(m.shape) - 30) <= 12  # a rotation by 12 degrees grows the box by at most ~1/3


def test_bitmap_font_fallback_for_old_pillow(monkeypatch):
    """Pillow < 10.1 has no scalable default font: the scaled bitmap font still gives sized, cropped glyphs."""
    gl._raw_mask.cache_clear()
    monkeypatch.setattr(gl, "_font", lambda px: None)
    try:
        for char in "08AM":
            m = gl.render_glyph(char, 24)
            assert max(m.shape) == 24 and ink_box(m) == [0, 0, m.shape[1], m.shape[0]]
    finally:
        gl._raw_mask.cache_clear()  # later tests render with the real font again


def test_one_glyph_alone_box_is_its_ink_box():
    """Flat background, one glyph: the pixels that changed are exactly the annotated box."""
    for index in range(6):
        img, objects = gl.render_image(1, 0, index, 96, 20, 12, 40, False, 1, 1)
        assert len(objects) == 1
        cls, box, area = objects[0]
        corner = img[95, 95] if box[:2] == [0, 0] else img[0, 0]
        changed = (img != corner).any(-1)
        assert ink_box(changed) == box, (index, cls)
        assert 0 < area <= (box[2] - box[0]) * (box[3] - box[1])
        assert area == int(changed.sum())  # the ink pixel count (one glyph, nothing on top)


def test_render_ranges_and_determinism():
    counts = []
    for index in range(8):
        img, objects = gl.render_image(2, 0, index, 160, 10, 12, 30, True, 5, 12)
        again, objects2 = gl.render_image(2, 0, index, 160, 10, 12, 30, True, 5, 12)
        assert np.array_equal(img, again) and objects == objects2
        assert img.shape == (160, 160, 3) and img.dtype == np.uint8
        counts.append(len(objects))
        for cls, (x0, y0, x1, y1), _ in objects:
            assert 0 <= cls < 10
            assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 160
            assert 12 <= max(x1 - x0, y1 - y0) <= 30
    assert min(counts) >= 5 and max(counts) <= 12
    other, _ = gl.render_image(3, 0, 0, 160, 10, 12, 30, True, 5, 12)
    assert not np.array_equal(other, gl.render_image(2, 0, 0, 160, 10, 12, 30, True, 5, 12)[0])


def test_set_reads_back_with_pycocotools_and_coco_loader(small_glyphs):
    from pycocotools.coco import COCO

    p = small_glyphs
    assert p["class_names"] == list("0123456789AE")
    for split, n in (("train", 6), ("val", 3)):
        coco = COCO(p[split]["ann_file"])
        assert len(coco.getImgIds()) == n and len(coco.getCatIds()) == 12
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == p["class_names"]
        for a in coco.loadAnns(coco.getAnnIds()):
            assert a["iscrowd"] == 0 and a["area"] > 0 and set(a) >= {"id", "image_id", "category_id", "bbox"}
        ds = CocoDetection(p[split]["ann_file"], p[split]["image_dir"])
        assert len(ds) == n and ds.class_names == p["class_names"] and not ds.stats
        for i in range(n):
            s = ds[i]
            assert s["image"].shape == (128, 128, 3)
            assert 4 <= len(s["labels"]) <= 9
            assert ((s["labels"] >= 0) & (s["labels"] < 12)).all()
            wh = s["boxes"][:, 2:] - s["boxes"][:, :2]
            assert (wh.max(1) >= 10).all() and (wh.max(1) <= 28).all()
            assert (s["boxes"] >= 0).all() and (s["boxes"] <= 128).all()
    info = json.loads(Path(p["train"]["ann_file"]).read_text())["info"]
    assert info["family"] == "glyphs" and info["description"].endswith("glyphs")


def test_generation_is_deterministic_and_worker_independent(tmp_path, small_glyphs):
    a = read_all(small_glyphs["root"])
    b = read_all(syn.generate_synthetic(tmp_path / "b", **SMALL)["root"])
    assert a == b and len(a) == 6 + 3 + 3
    kw = {**SMALL, "num_train": 64, "num_val": 1, "image_size": 64, "min_objects_per_image": 1,
          "max_objects_per_image": 3}
    one = read_all(syn.generate_synthetic(tmp_path / "w1", **{**kw, "workers": 1})["root"])
    two = read_all(syn.generate_synthetic(tmp_path / "w2", **{**kw, "workers": 2})["root"])
    assert one == two
    c = read_all(syn.generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 8})["root"])
    assert c["train/000000.png"] != a["train/000000.png"]


def test_cache_name_has_the_family_and_defaults(tmp_path):
    g = syn.synthetic_name(family="glyphs")
    assert g.startswith("glyphs-") and g != syn.synthetic_name()
    assert syn.synthetic_name().startswith("shapes-")
    assert f"px{gl.DEFAULTS['image_size']}" in g and f"c{gl.DEFAULTS['num_classes']}" in g
    assert syn.synthetic_name(family="glyphs", min_objects_per_image=5) != g
    kw = {k: v for k, v in SMALL.items() if k != "workers"}
    p = syn.ensure_synthetic(root=tmp_path, **kw)
    assert Path(p["root"]) == tmp_path / syn.synthetic_name(**kw)
    assert syn.ensure_synthetic(root=tmp_path, **kw) == p


def test_defaults_are_unlike_the_shapes_set():
    d = gl.DEFAULTS
    assert d["num_classes"] > syn.DEFAULT_NUM_CLASSES
    assert d["max_object"] < syn.DEFAULT_MIN_OBJECT * 2 and d["max_object"] / d["image_size"] < 0.2
    assert d["min_objects_per_image"] > syn.DEFAULT_MAX_OBJECTS_PER_IMAGE
    assert len(gl.GLYPHS) == len(set(gl.GLYPHS)) == 20


@pytest.mark.parametrize("bad, match", [
    ({"num_classes": 21}, "num_classes"), ({"num_classes": 0}, "num_classes"),
    ({"min_object": 30, "max_object": 20}, "min_object"), ({"min_object": 3}, "min_object"),
    ({"image_size": 20}, "image_size"), ({"min_objects_per_image": 5, "max_objects_per_image": 2}, "per_image"),
    ({"num_train": 0}, "num_train"), ({"family": "letters"}, "family"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match) as e:
        syn.generate_synthetic(tmp_path / "bad", **{**SMALL, **bad})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_shapes_reject_the_glyphs_only_parameter(tmp_path):
    with pytest.raises(ValueError, match="glyphs"):
        syn.generate_synthetic(tmp_path / "s", num_train=1, num_val=1, min_objects_per_image=2)
    with pytest.raises(SystemExit):
        syn.main(["--out", str(tmp_path / "s"), "--min-objects-per-image", "2"])


def test_cli_writes_a_glyphs_set(tmp_path, capsys):
    rc = syn.main(["--family", "glyphs", "--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1",
                   "--size", "96", "--classes", "15", "--min-object", "10", "--max-object", "24",
                   "--min-objects-per-image", "3", "--max-objects-per-image", "6", "--workers", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class_names"] == list(gl.GLYPHS[:15])
    ds = CocoDetection(out["train"]["ann_file"], out["train"]["image_dir"])
    assert len(ds) == 2 and ds[0]["image"].shape == (96, 96, 3) and 3 <= len(ds[0]["labels"]) <= 6
    with pytest.raises(SystemExit):  # a bad value is an argparse error, not a traceback
        syn.main(["--family", "glyphs", "--out", str(tmp_path / "bad"), "--classes", "30"])
    assert "num_classes" in capsys.readouterr().err
