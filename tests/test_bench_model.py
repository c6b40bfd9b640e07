"""``bench/model.py``: the quick whole-model benchmark end to end (subprocess), and its cheap helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import model as bm

REPO_ROOT = Path(__file__).resolve().parent.parent


def _effdet_importable() -> bool:
    return bm.effdet_available() is None


def test_parse_args_quick_and_defaults():
    full = bm.parse_args([])
    assert (full.model, full.device, full.precision, full.backend) == ("efficientdet_d0", "cpu", "fp32", "auto")
    assert (full.infer_batches, full.infer_size) == ([1, 8], 512)
    assert full.train_runs == [(128, 16, "adamw"), (256, 8, "sgd")]  # the two train rows
    assert full.peer_memory_format == full.memory_format == "nhwc"  # effdet's best CPU setting, as ours
    assert bm.parse_args(["--train-size", "128,256", "--train-batch", "2", "--opt", "sgd"]).train_runs == [
        (128, 2, "sgd"), (256, 2, "sgd")]
    assert bm.parse_args(["--peer-memory-format", "same", "--memory-format", "nchw"]).peer_memory_format == "nchw"
    quick = bm.parse_args(["--quick", "--infer-batch", "1,2", "--memory-format", "nhwc",
                           "--peer-memory-format", "nchw"])
    assert quick.infer_batches == [1, 2] and quick.infer_size == 128 and quick.iters == 2  # explicit flag wins
    assert (quick.memory_format, quick.peer_memory_format) == ("nhwc", "nchw")


@pytest.mark.parametrize("argv,msg", [
    (["--quick", "--infer-size", "100"], "--infer-size 100: efficientdet_d0: image_size (100, 100)"),
    (["--train-size", "128,96"], "--train-size 96:"), (["--train-batch", "0"], "--train-batch takes"),
    (["--infer-batch", "1,x"], "--infer-batch takes"), (["--iters", "0"], "--iters must be 1 or more"),
    (["--warmup", "-1"], "--warmup must be 0 or more"), (["--model", "d9"], "--model: unknown model 'd9'")])
def test_bad_arguments_are_one_line_before_any_timing(argv, msg, capsys):
    """They were a ConfigError traceback, or (a 0 batch, 0 iterations) rows of nothing appended to the results."""
    with pytest.raises(SystemExit) as exit:
        bm.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and msg in err[-1], err


def test_random_targets_and_effdet_format():
    boxes, labels = bm.random_targets(4, 256, 90, max_boxes=5, seed=3)
    assert boxes.shape == (4, 5, 4) and labels.shape == (4, 5)
    real = labels >= 0
    assert real.any(1).all() and (labels[~real] == -1).all()
    assert (boxes[real][:, 2:] > boxes[real][:, :2]).all() and boxes.max() <= 256 and boxes.min() >= 0
    assert (labels[real] < 90).all()
    t = bm.effdet_target(boxes, labels)
    torch.testing.assert_close(t["bbox"][..., 0], boxes[..., 1])  # yxyx
    torch.testing.assert_close(t["bbox"][..., 3], boxes[..., 2])
    assert (t["cls"][real] == (labels[real] + 1).float()).all() and (t["cls"][~real] == -1).all()


def test_summarize_and_rows():
    med, p20, p80 = bm.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (med, p20, p80) == (3.0, 1.8, 4.2)
    rows = bm.make_rows("predict", 8, 512, {"ours": [100.0, 100.0], "effdet": [300.0]}, {}, ["ours", "effdet"])
    ours = rows[0]
    assert ours["impl"] == "ours" and ours["img_per_s"] == pytest.approx(80.0)
    assert ours["speedup_vs_peer"] == pytest.approx(3.0) and rows[1]["speedup_vs_peer"] == 1.0
    rows = bm.make_rows("predict", 1, 64, {"ours": [], "effdet": [2.0]}, {"ours": "RuntimeError: x"},
                        ["ours", "effdet"])
    assert rows[0]["median_ms"] is None and rows[0]["error"] == "RuntimeError: x"
    assert rows[0]["speedup_vs_peer"] is None


def test_time_interleaved_alternates_and_records_errors():
    order = []

    def bad():
        order.append("b")
        raise RuntimeError("boom")
    times, errors = bm.time_interleaved({"a": lambda: order.append("a"), "b": bad, "c": lambda: order.append("c")},
                                        torch.device("cpu"), warmup=1, iters=3)
    assert order == ["a", "b", "c", "a", "c", "a", "c", "a", "c"]  # warm-ups, then a/c alternate; b stops
    assert len(times["a"]) == 3 and times["b"] == [] and errors["b"].startswith("RuntimeError: boom")


def test_op_groups():
    for conv in ("aten::convolution_backward", "mkldnn::_convolution_pointwise", "aten::_slow_conv2d_forward",
                 "aten::mkldnn_convolution", "aten::_conv_depthwise2d"):
        assert bm.op_group(conv) == "conv", conv
    assert bm.op_group("aten::native_batch_norm_backward") == "batch_norm"
    assert bm.op_group("aten::silu_") == bm.op_group("aten::silu_backward") == "silu"
    for other in ("autograd::engine::evaluate_function: ConvolutionBackward0", "aten::mul",
                  "aten::_convert_indices_from_coo_to_csr", "DepthwiseSmallMapBackward"):
        assert bm.op_group(other) == "other", other


def test_shares_of_wall_count_self_time_once():
    from types import SimpleNamespace as E

    # nested: conv2d -> convolution -> mkldnn_convolution; their totals overlap, their self times do not
    events = [E(key="aten::conv2d", self_cpu_time_total=2.0, cpu_time_total=100.0),
              E(key="aten::convolution", self_cpu_time_total=3.0, cpu_time_total=98.0),
              E(key="aten::mkldnn_convolution", self_cpu_time_total=95.0, cpu_time_total=95.0),
              E(key="aten::native_batch_norm", self_cpu_time_total=20.0, cpu_time_total=20.0),
              E(key="aten::silu_", self_cpu_time_total=10.0, cpu_time_total=10.0),
              E(key="aten::mul", self_cpu_time_total=15.0, cpu_time_total=15.0)]
    share = bm.shares_of_wall(events, wall_us=400.0)  # the rest of the wall time: Python, dispatch, profiler
    assert share == pytest.approx({"conv": 0.25, "batch_norm": 0.05, "silu": 0.025, "other": 0.675})
    assert bm.shares_of_wall(events, wall_us=50.0)["other"] == pytest.approx(15.0 / 145.0)  # never negative


def test_op_shares_profiles_a_real_call():
    x = torch.randn(2, 8, 32, 32)
    w = torch.randn(8, 8, 3, 3)
    share = bm.op_shares(lambda: torch.nn.functional.conv2d(x, w, padding=1) * 2.0)
    assert set(share) == set(bm.OP_GROUPS) and 0.0 < share["conv"] < 1.0 and share["batch_norm"] == 0.0
    assert bm.op_shares(lambda: x * 2.0)["conv"] == 0.0


def test_ceilings(monkeypatch):
    shares = {"ours": {"conv": 0.5, "batch_norm": 0.1, "silu": 0.1, "other": 0.3},
              "effdet": {"conv": 0.4, "batch_norm": 0.1, "silu": 0.2, "other": 0.3}}
    monkeypatch.setattr(bm, "op_shares", lambda fn: shares[fn()])
    rows = bm.make_rows("predict", 1, 32, {"ours": [10.0], "effdet": [15.0]}, {}, ["ours", "effdet"])
    bm.add_op_breakdown(rows, {"ours": lambda: "ours", "effdet": lambda: "effdet"})
    ours, effdet = rows
    assert ours["conv_ms"] == pytest.approx(5.0) and effdet["conv_ms"] == pytest.approx(6.0)
    assert ours["ceiling_conv"] == pytest.approx(15.0 / 5.0)
    assert ours["ceiling_conv_bn_silu"] == pytest.approx(15.0 / 7.0)
    assert ours["ceiling_effdet_conv_silu"] == pytest.approx(1.0 / 0.6)
    assert "ceiling_conv" not in effdet


def test_model_quick_subprocess(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmark measures real paths; on the CPU "auto" = the reference
    env["EFFDET_KERNEL_BACKEND"] = "auto"
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "model.py"), "--quick", "--op-breakdown", "--results-dir",
         str(tmp_path)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    with_peer = _effdet_importable()
    assert "efficientdet_d0 on" in out and "precision fp32" in out and "backend auto" in out
    for col in ("workload", "median ms", "p20 ms", "p80 ms", "img/s", "x effdet"):
        assert col in out, col
    assert "predict" in out and "train_step" in out and "ours" in out and "where the wall time goes" in out
    files = list(tmp_path.glob("model-*.jsonl"))
    assert len(files) == 1 and files[0].name == "model-cpu.jsonl"
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == (4 if with_peer else 2)
    for r in rows:
        for key in ("device", "cpu_threads", "torch", "triton", "git_commit", "precision", "memory_format",
                    "backend", "workload", "impl", "batch", "size", "median_ms", "p20_ms", "p80_ms", "img_per_s"):
            assert key in r, key
        assert r["error"] is None, r["error"]
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["img_per_s"] > 0
        assert r["memory_format"] == "nhwc" and r["quick"] is True and r["samples"] == 2
        assert all(0.0 <= s <= 1.0 for s in r["op_share"].values()) and 0 < r["conv_ms"] < r["median_ms"]
    assert {(r["workload"], r["batch"], r["size"]) for r in rows} == {("predict", 1, 128), ("train_step", 2, 128)}
    if with_peer:
        assert "effdet" in out
        ours = [r for r in rows if r["impl"] == "ours"]
        assert all(r["speedup_vs_peer"] > 0 for r in ours)


def test_both_peer_layouts_in_one_interleaved_run(tmp_path, capsys):
    """--peer-memory-format both: effdet channels-last and effdet NCHW timed in the same rounds as ours, each
    row with a ratio against each layout (the issue's table, one run)."""
    args = bm.parse_args(["--peer-memory-format", "both"])
    assert bm.peer_formats(args) == {"effdet": "nhwc", "effdet-nchw": "nchw"}
    assert bm.peer_formats(bm.parse_args([])) == {"effdet": "nhwc"}
    rows = bm.make_rows("predict", 1, 64, {"ours": [10.0], "effdet": [15.0], "effdet-nchw": [20.0]}, {},
                        ["ours", "effdet", "effdet-nchw"])
    ours, peer, nchw = rows
    assert ours["speedup_vs_peer"] == pytest.approx(1.5) and ours["speedup_vs_peer_nchw"] == pytest.approx(2.0)
    assert peer["speedup_vs_peer_nchw"] == pytest.approx(20 / 15) and nchw["speedup_vs_peer"] == pytest.approx(0.75)
    if not _effdet_importable():
        pytest.skip("effdet is not importable: the run itself needs it")
    assert bm.main(["--quick", "--no-train", "--peer-memory-format", "both", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "x effdet-nchw" in out and "effdet both" in out
    rows = [json.loads(line) for line in (tmp_path / "model-cpu.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["ours", "effdet", "effdet-nchw"] and all(r["error"] is None for r in rows)
    assert all(r["peer_memory_format"] == "both" and r["samples"] == 2 for r in rows)
    assert rows[0]["speedup_vs_peer"] > 0 and rows[0]["speedup_vs_peer_nchw"] > 0


def test_write_results_appends(tmp_path):
    meta = {"device_slug": "cpu", "device": "CPU x", "git_commit": "abc"}
    rows = bm.make_rows("predict", 2, 64, {"ours": [10.0]}, {}, ["ours"])
    p1 = bm.write_results(rows, meta, tmp_path)
    p2 = bm.write_results(rows, meta, tmp_path)
    assert p1 == p2 == tmp_path / "model-cpu.jsonl"
    lines = [json.loads(x) for x in p1.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["device"] == "CPU x" and lines[1]["median_ms"] == 10.0
    assert lines[0]["img_per_s"] == pytest.approx(200.0)


def test_bench_helpers_live_in_one_place():
    from bench import harness, profiling

    assert bm.summarize is harness.summarize and bm.quantile is harness.quantile
    assert bm.autocast_context is harness.autocast_context and bm.device_slug is harness.device_slug
    assert profiling.device_slug is harness.device_slug and profiling.REPO_ROOT == harness.REPO_ROOT == REPO_ROOT
    assert harness.quantile([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5 and harness.quantile([7.0], 0.2) == 7.0
    a = torch.randn(4, 4)
    with harness.autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with harness.autocast_context("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
