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
        assert "interpreter: correctness smoke test, not a speed figure" in out
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
