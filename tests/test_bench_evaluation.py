"""``bench/evaluation.py``: the quick run end to end on a tiny synthetic set, and its argument checks."""
from __future__ import annotations

import json

import pytest
import torch

from bench import evaluation as be
from datasets.synthetic import generate_synthetic

TINY = dict(seed=4, num_train=1, num_val=3, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


def test_quick_run_writes_rows(tmp_path):
    syn = generate_synthetic(tmp_path / "syn", **TINY)
    args = be.parse_args(["--quick", "--ann", syn["val"]["ann_file"], "--images", syn["val"]["image_dir"],
                          "--batch", "2", "--nms-classes", "7,1", "--results-dir", str(tmp_path / "res"),
                          "--backend", "torch", "--threads", "1"])
    assert (args.candidates, args.nms_iters, args.eval_iters, args.max_images, args.warmup) == (300, 2, 1, 4, 0)
    threads = torch.get_num_threads()
    try:
        rows = be.run(args)
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in (tmp_path / "res" / "eval-cpu.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) == 3
    nms = [r for r in lines if r["part"] == "nms"]
    assert [r["classes"] for r in nms] == [7, 1] and all(r["same_result"] for r in nms)
    assert all(r["ours_ms"] > 0 and r["reference_ms"] > 0 for r in nms)
    ev = next(r for r in lines if r["part"] == "eval")
    assert ev["images"] == 3 and ev["eval_img_per_s"] > 0 and ev["predict_img_per_s"] > 0
    assert ev["ratio"] == pytest.approx(ev["predict_img_per_s"] / ev["eval_img_per_s"])
    for key in ("device", "git_commit", "date", "cpu_threads", "torch"):
        assert lines[0][key]


def test_candidates_are_clustered_and_valid():
    boxes, scores, classes = be.nms_candidates(500, 4, "cpu", seed=1)
    assert boxes.shape == (500, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert scores.unique().numel() == 500 and set(classes.tolist()) == {0, 1, 2, 3}
    import torchvision

    kept = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)
    assert 0 < kept.numel() < 400  # clusters: most candidates are suppressed


@pytest.mark.parametrize("argv,msg", [(["--nms-classes", "9,x"], "comma-separated"), (["--nms-classes", "0"], ">= 1"),
                                      (["--ann", "a.json"], "go together"), (["--size", "100"], "multiple of 128")])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit):
        be.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_interleaved_rounds():
    calls = []
    out = be.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                         torch.device("cpu"), warmup=1, iters=2)
    assert calls == ["a", "b"] * 3 and [n for _, n in out["a"]] == [1, 1] and [n for _, n in out["b"]] == [2, 2]
