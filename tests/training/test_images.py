"""evaluate.py --images: a folder of images of any size and mode, EXIF orientation applied, a corrupt file
skipped and counted, detections with file names and class names in original pixels."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from training.images import find_images, read_image
from training.models import build_model

NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("efficientdet_d0", len(NAMES), (128, 128), backend="torch")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "class_names": NAMES,
                "label_to_cat_id": {i: 10 + i for i in range(len(NAMES))}}, path)
    return path


def _pattern(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_pattern(90, 150)).save(d / "wide.png")
    Image.fromarray(_pattern(200, 60)).convert("L").save(d / "sub" / "gray.png")
    rgba = np.dstack([_pattern(70, 70), np.full((70, 70), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_pattern(40, 100)).save(d / "rotated.jpg", exif=exif)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


def test_read_image_applies_exif_and_converts_modes(folder):
    assert read_image(str(folder / "rotated.jpg")).shape == (100, 40, 3)  # stored 40x100, shown 100x40
    gray = read_image(str(folder / "sub" / "gray.png"))
    assert gray.shape == (200, 60, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert read_image(str(folder / "alpha.png")).shape == (70, 70, 3)


def test_find_images_folder_and_glob(folder):
    paths, root = find_images(str(folder))
    assert len(paths) == 5 and not any(p.endswith(".txt") for p in paths)
    paths, _ = find_images(str(folder / "**" / "*.png"))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["alpha.png", "gray.png", "wide.png"]
    import shutil

    named = folder / "copy [1].png"  # a file is taken as named: its brackets are no glob class
    shutil.copy(folder / "alpha.png", named)
    try:
        assert find_images(str(named)) == ([str(named)], str(folder))
    finally:
        named.unlink()


def test_evaluate_images_writes_detections_and_pictures(folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    rc = evaluate.main(["--images", str(folder), "--checkpoint", str(tiny_checkpoint), "--output", str(out),
                        "-b", "3", "--workers", "0", "--device", "cpu", "--visualize", "2",
                        "--kernel-backend", "torch"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 image file(s) could not be decoded" in " ".join(printed.split()) and "broken.jpg" in printed
    dets = json.load(open(out / "detections.json"))
    assert dets and {"file_name", "image_id", "category_id", "category_name", "bbox", "score"} <= set(dets[0])
    sizes = {"wide.png": (90, 150), "sub/gray.png": (200, 60), "alpha.png": (70, 70), "rotated.jpg": (100, 40)}
    assert {d["file_name"] for d in dets} == set(sizes)  # every good image, not the broken one
    for d in dets:
        h, w = sizes[d["file_name"]]
        x, y, bw, bh = d["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3  # original pixels
        assert d["category_name"] == NAMES[d["category_id"] - 10]
    assert len(list((out / "pictures").glob("*.png"))) == 2


def test_images_without_any_image_is_one_line_error(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    rc = evaluate.main(["--images", str(tmp_path / "empty"), "--checkpoint", str(tiny_checkpoint),
                        "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: no image files found (")


def test_pictures_of_files_with_the_same_stem_do_not_overwrite_each_other(tmp_path):
    from training.images import picture_names

    root = str(tmp_path)
    paths = [str(tmp_path / p) for p in ("a/b.jpg", "a_b.jpg", "x.jpg", "x.png")]
    names = picture_names(paths, root)
    assert names == ["a_b.jpg.png", "a_b.jpg-2.png", "x.jpg.png", "x.png.png"]


def test_no_decodable_image_is_one_line_error(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = evaluate.main(["--images", str(tmp_path / "bad"), "--checkpoint", str(tiny_checkpoint),
                        "--output", str(tmp_path / "o"), "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: none of the 1 image file(s) could be decoded")


def test_images_take_the_default_checkpoint_and_the_evaluation_flags(folder, tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    """Without --checkpoint: OUTPUT/best.pth as the other evaluations; --fill-color and --interpolation reach
    the transform (as evaluate.py builds it for annotated data)."""
    import shutil

    import datasets

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny_checkpoint, out / "best.pth")
    seen = []
    real = datasets.EvalTransform

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(datasets, "EvalTransform", spy)
    rc = evaluate.main(["--images", str(folder / "wide.png"), "--output", str(out), "--workers", "0",
                        "--device", "cpu", "--kernel-backend", "torch", "--fill-color", "0",
                        "--interpolation", "nearest"])
    assert rc == 0 and "loaded " + str(out / "best.pth") in " ".join(capsys.readouterr().out.split())
    assert seen and seen[0]["fill"] == (0, 0, 0) and seen[0]["interpolation"] == "nearest", seen
