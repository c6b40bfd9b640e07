"""bench/kernels.py --quick runs standalone (subprocess) for this part's ops and writes table + JSON lines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OPS = ["focal_loss", "ema", "decode"]
OP_NAMES = {"focal_loss": ["focal_loss"], "ema": ["ema_update"], "decode": ["decode_boxes", "decode_topk"]}


def test_bench_quick_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the script must set it itself
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, str(REPO / "bench" / "kernels.py"), "--quick", "--ops", ",".join(OPS),
           "--results-dir", str(tmp_path), "--reps", "2"]
    if not torch.cuda.is_available():
        cmd += ["--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    files = list(tmp_path.glob("kernels-*.jsonl"))
    assert len(files) == 1, (files, out[-2000:])
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    for key in ("device", "torch", "triton", "git_commit", "date", "setup", "op", "shape", "provider",
                "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "pct_copy_bw", "speedup_vs_reference",
                "speedup_vs_peer", "error"):
        assert key in rows[0], key
    ops = {r["op"] for r in rows}
    for mod in OPS:
        for name in OP_NAMES[mod]:
            assert name in ops, (name, ops)
            assert name in out                                     # in the printed table
            got = {r["provider"]: r for r in rows if r["op"] == name}
            for prov in ("triton", "reference"):
                assert prov in got, (name, got.keys())
                assert got[prov]["error"] is None, got[prov]["error"]
                assert got[prov]["median_ms"] > 0
            assert any(p.startswith("peer:") for p in got), got.keys()
    assert all(r["git_commit"] for r in rows)
    if not torch.cuda.is_available():
        assert "not a speed figure" in out
        triton_rows = [r for r in rows if r["provider"] == "triton"]
        assert all(r["interpreter"] and "not a speed figure" in r["note"] for r in triton_rows)


def test_error_rows_do_not_crash(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.harness import Case, run_cases

    def boom():
        raise RuntimeError("provider failed")
    rows = run_cases([Case(op="x", shape="s", providers={"reference": lambda: None, "triton": boom},
                           bytes_moved=100, setup="unit")], "cpu", results_dir=tmp_path, reps=2, quick=True)
    by = {r["provider"]: r for r in rows}
    assert by["triton"]["error"].startswith("RuntimeError: provider failed")
    assert by["reference"]["error"] is None and by["reference"]["median_ms"] is not None
    assert len((tmp_path / "kernels-cpu.jsonl").read_text().splitlines()) == 2


def _gpu_check(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_check_dry_run_prints_the_plan(tmp_path):
    out = tmp_path / "gpu-out"
    proc = _gpu_check(["--dry-run", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(REPO))
    from bench.gpu_check import BUDGET_S, STEPS

    for step, (limit, _) in STEPS.items():
        assert step in proc.stdout and f"limit {limit:>4} s" in proc.stdout, proc.stdout
    assert sum(limit for limit, _ in STEPS.values()) <= BUDGET_S <= 480   # the 8-minute budget
    assert str(out) in proc.stdout and not out.exists()                   # a plan writes nothing
    bad = _gpu_check(["--dry-run", "--only", "kernels,nope"], tmp_path)
    assert bad.returncode == 2 and "unknown step(s) nope" in bad.stderr


def test_gpu_check_without_cuda_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        import pytest
        pytest.skip("CUDA present: gpu_check would run for real")
    out = tmp_path / "gpu-out"
    proc = _gpu_check(["--out", str(out)], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA device" in proc.stderr and not out.exists()


def test_gpu_check_summary_lists_every_step(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench import gpu_check

    env = {"device": "X", "date": "d", "torch": "t", "triton": "tr", "git_commit": "abc", "python": "3"}
    results = [{"step": "kernels", "status": "ok", "seconds": 1.0, "limit_s": 120, "numbers": {"a | b": 2}},
               {"step": "model", "status": "timeout", "seconds": 100.0, "limit_s": 100, "error": "stopped"}]
    text = gpu_check.write_summary(tmp_path, env, results).read_text()
    for needle in ("device: X", "torch t, triton tr", "git commit: abc", "| kernels | ok |", "| model | timeout |",
                   "stopped", "a / b"):
        assert needle in text, (needle, text)
    boxes, scores, classes = gpu_check.nms_20k_inputs(2000, device="cpu")
    assert boxes.shape == (2000, 4) and (boxes[:, 2:] > boxes[:, :2]).all() and classes.unique().numel() == 1


def test_full_shapes_without_cuda_are_refused_in_one_line(tmp_path):
    """Without a GPU the full shapes would run in the Triton interpreter for hours, printing nothing."""
    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: the full shapes run")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--results-dir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--quick" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_static_arguments_are_one_line(capsys):
    """``--static --sizes 100`` was a ConfigError traceback from deep in the model's construction."""
    import pytest

    from bench.kernels import _parse

    for argv, msg in ((["--static", "--sizes", "100"], "--sizes 100: efficientdet_d0: image_size (100, 100)"),
                      (["--static", "--sizes", "128x96"], "--sizes 128x96:"),
                      (["--static", "--batch", "0"], "--batch must be more than 0"),
                      (["--quick", "--reps", "0"], "--reps must be 1 or more")):
        with pytest.raises(SystemExit) as exit:
            _parse(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and msg in err[-1], err
    assert _parse(["--static", "--sizes", "128,128x256"]).sizes == [128, (128, 256)]
