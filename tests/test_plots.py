"""training.plots: curves from a JSON-lines log (gaps tolerated) and labelled detection pictures."""
import json

import numpy as np
import pytest
from PIL import Image

from training.plots import draw_detections, main, plot_training, read_log

pytest.importorskip("matplotlib", reason="matplotlib (requirements.txt) not installed")


def _write_log(path, events, tail=""):
    with open(path, "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
        f.write(tail)


def _pixels(path):
    im = Image.open(path)
    return im.size, np.asarray(im.convert("RGB"))


def _full_log():
    ev = [{"event": "start", "step": 0, "epoch": 0, "args": {}}]
    for s in range(1, 41):
        ev.append({"event": "train", "step": s, "epoch": s // 10, "loss": 2.0 / s, "cls_loss": 1.5 / s,
                   "box_loss": 0.01 / s, "lr": 0.01 * min(1, s / 5), "img_per_s": 10.0})
        if s % 10 == 0:
            ev.append({"event": "eval", "step": s, "epoch": s // 10 - 1, "AP": 0.01 * s, "AP50": 0.02 * s})
    return ev


def test_curves_png(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, _full_log())
    out = plot_training(str(log))
    assert out == str(tmp_path / "curves.png")
    (w, h), px = _pixels(out)
    assert w >= 1000 and h >= 300
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # lines, text, several colours


def test_curves_tolerate_gaps(tmp_path):
    ev = _full_log()
    for e in ev[5:15]:
        e.pop("cls_loss", None)
        e.pop("lr", None)
    ev = [e for e in ev if e["event"] != "eval"]  # a run without evaluations
    ev.append({"event": "train", "step": 41, "loss": float("nan")})  # non-finite and partial events
    ev.append({"event": "train"})
    log = tmp_path / "log.jsonl"
    _write_log(log, ev, tail='{"event": "train", "step": 42, "lo')  # cut short by a kill
    assert len(read_log(str(log))) == len(ev)
    out = plot_training(str(log), str(tmp_path / "sub" / "c.png"), title="gaps")
    (w, h), px = _pixels(out)
    assert w >= 1000 and px.std() > 10


def test_curves_empty_log_and_cli(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("\n")
    assert main([str(log), "--output", str(tmp_path / "e.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "e.png")
    assert _pixels(tmp_path / "e.png")[1].std() > 1  # axes and "no data" text


def test_detection_picture_has_tags():
    image = np.full((200, 300, 3), 90, dtype=np.uint8)
    dets = np.array([[20, 40, 120, 150, 0.9, 1], [150, 30, 280, 180, 0.5, 0], [0, 0, 10, 10, 0.1, 0],
                     [0, 0, 0, 0, 0, -1]], dtype=np.float32)
    gt = np.array([[25, 45, 118, 148], [155, 35, 270, 175]], dtype=np.float32)
    im = draw_detections(image, dets, gt_boxes=gt, gt_labels=np.array([1, 0]), class_names=["cat", "dog"])
    assert im.size == (300, 200) and im.mode == "RGB"
    px = np.asarray(im)
    # a filled tag in class 1's colour sits just above the first box
    tag = px[max(0, 40 - 12):40, 22:60].reshape(-1, 3)
    colour = np.array([60, 180, 75])
    assert (np.abs(tag.astype(int) - colour).sum(1) == 0).mean() > 0.3
    assert (px == 255).all(-1).sum() > 100  # white ground truth outlines and tags
    # the low-score detection is not drawn: its corner keeps the background
    blank = draw_detections(image, dets[2:3], class_names=["cat", "dog"])
    assert (np.asarray(blank) == 90).all()
    # no boxes at all: the image is returned unchanged
    assert (np.asarray(draw_detections(image, None)) == image).all()


def test_cli_bad_log_is_one_line(tmp_path, capsys):
    """A missing file or folder was a traceback; a JSON file that is no log drew an empty picture."""
    from training.plots import main

    (tmp_path / "other.json").write_text('{"images": []}\n')
    for path, field in ((tmp_path / "nope.jsonl", "log"), (tmp_path, "log"), (tmp_path / "other.json", "event")):
        assert main([str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and f"({path}, {field})" in err[0], err
    assert not (tmp_path / "curves.png").exists()


def test_cli_output_that_cannot_be_the_picture_is_one_line(tmp_path, capsys):
    """A suffix matplotlib does not write and a path under a file were tracebacks; a folder wrote
    ``folder.png`` beside it while the command printed the folder's name."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"event": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n')
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    for out in ("curves.xyz", "curves", "file/curves.png", "folder", "new/curves.xyz"):
        assert main([str(log), "--output", str(tmp_path / out)]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"({tmp_path / out}, --output)" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "log.jsonl"]
    assert main([str(log), "--output", str(tmp_path / "new" / "c.svg")]) == 0
    assert (tmp_path / "new" / "c.svg").stat().st_size > 0
