"""Execute ``bench/profile_kernels.ipynb`` headless on the CPU with tiny shapes (nbclient), and unit-test the
cheap helpers of ``bench/profiling.py`` it relies on."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench import profiling as P

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "bench" / "profile_kernels.ipynb"


# ---------------------------------------------------------------------------------------------- helpers


def test_notebook_params_env_overrides(tmp_path):
    defaults = {"model_name": "efficientdet_d0", "image_size": 256, "batch": 2, "device": "auto", "out_dir": "",
                "results_dir": "", "kernel_size": 4096}
    p = P.notebook_params(defaults, environ={})
    assert p["image_size"] == 256 and p["batch"] == 2
    assert p["device"] == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert p["out_dir"] == REPO_ROOT / "bench" / "results"
    env = {"EFFDET_NB_SIZE": "128", "EFFDET_NB_BATCH": "3", "EFFDET_NB_DEVICE": "cpu", "EFFDET_NB_OUT": str(tmp_path),
           "EFFDET_NB_MODEL": "efficientdet_d1", "EFFDET_NB_KERNEL_N": ""}
    p = P.notebook_params(defaults, environ=env)
    assert (p["image_size"], p["batch"], p["model_name"]) == (128, 3, "efficientdet_d1")
    assert p["device"] == torch.device("cpu") and p["out_dir"] == tmp_path
    assert p["kernel_size"] == 4096  # empty variable = keep the default
    assert isinstance(p["image_size"], int)


@pytest.mark.parametrize("name, op", [
    ("kernels.focal_loss", "focal_loss"), ("effdet::focal_loss_fwd", "focal_loss"),
    ("_FocalLossTritonBackward", "focal_loss"), ("effdet::batched_nms", "batched_nms"),
    ("kernels.decode_topk", "decode"), ("effdet::decode_topk_gather", "decode"), ("effdet::decode_boxes", "decode"),
    ("kernels.bifpn_fusion", "bifpn_fusion"), ("BifpnFusionBackward", "bifpn_fusion"),
    ("effdet::ema_update_", "ema_update"), ("aten::conv2d", None), ("aten::topk", None), ("train_step", None),
])
def test_op_of(name, op):
    assert P.op_of(name) == op


def test_available_backends_cpu():
    assert P.available_backends("cpu") == ["torch"]


def test_kernel_labels_wraps_and_restores():
    import kernels

    before = kernels.focal_loss
    logits, targets, normalizer = P.focal_loss_inputs(32, num_classes=5)
    with P.kernel_labels():
        assert kernels.focal_loss is not before
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("train_step"):
                loss = kernels.focal_loss(logits.requires_grad_(True), targets, normalizer, backend="torch")
                loss.backward()
    assert kernels.focal_loss is before
    ref = kernels.focal_loss(logits.detach(), targets, normalizer, backend="torch")
    torch.testing.assert_close(loss.detach(), ref)
    assert "kernels.focal_loss" in {e.name for e in prof.events()}
    shares = P.kernel_shares(prof, use_device=False)
    fl = shares["train_step"]["ops"]["focal_loss"]
    assert fl["forward_us"] > 0 and fl["backward_us"] > 0, fl  # backward found through sequence numbers
    assert 0 < fl["pct"] <= 100.0
    assert all(shares["train_step"]["ops"][op]["us"] == 0 for op in P.KERNEL_OPS if op != "focal_loss")
    table = P.shares_table({"torch": shares})
    assert "focal_loss" in table and "train_step" in table


def test_time_kernel_cpu():
    calls = []
    t = P.time_kernel(lambda: calls.append(1), "cpu", reps=5, warmup=2)
    assert len(calls) == 7
    assert t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] and t["method"].startswith("time.perf_counter")


def test_format_rows():
    text = P.format_rows([{"name": "aten::mm", "calls": 3, "self_ms": 1.23456}, {"name": "x", "calls": 10,
                                                                               "self_ms": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "calls", "self_ms"] and "1.23" in lines[2] and "-" in lines[3]
    assert P.format_rows([]) == "(no rows)"


def _write_results(d: Path):
    kernel = {"op": "focal_loss", "shape": "B8xN49104xC90", "bytes": 10**8, "device": "GPU X", "copy_gbps": 3000.0}
    rows = [
        {**kernel, "provider": "reference", "median_ms": 1.0, "gbps": 100.0, "speedup_vs_reference": 1.0},
        {**kernel, "provider": "triton", "median_ms": 0.1, "gbps": 1000.0, "speedup_vs_reference": 10.0,
         "speedup_vs_peer": 4.0},
        {**kernel, "provider": "triton", "median_ms": 50.0, "gbps": 2.0, "interpreter": True,
         "speedup_vs_reference": 0.02, "device": "CPU"},
        {**kernel, "provider": "peer:effdet", "median_ms": None, "error": "boom"},
        {"bench": "model", "workload": "predict", "impl": "ours", "batch": 1, "size": 512, "median_ms": 300.0,
         "speedup_vs_peer": 2.1, "device": "CPU", "memory_format": "nhwc"},
        {"bench": "model", "workload": "predict", "impl": "effdet", "batch": 1, "size": 512, "median_ms": 630.0,
         "speedup_vs_peer": 1.0, "device": "CPU"},
    ]
    (d / "kernels-gpu-x.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\nnot json\n\n")
    (d / "model-cpu.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    (d / "ignored.txt").write_text("{}")


def test_load_results_and_speedup_rows(tmp_path):
    _write_results(tmp_path)
    rows = P.load_results(tmp_path)
    assert len(rows) == 6 and {r["_file"] for r in rows} == {"kernels-gpu-x.jsonl", "model-cpu.jsonl"}
    assert len(P.kernel_rows(rows)) == 3 and len(P.model_rows(rows)) == 2
    sp = P.speedup_rows(rows)
    labels = [d["label"] for d in sp]
    assert any("[triton]" in lab for lab in labels) and not any("[reference]" in lab for lab in labels)
    assert sum("model predict" in lab for lab in labels) == 1  # ours only, effdet is the baseline
    tri = next(d for d in sp if "[triton]" in d["label"])
    assert (tri["vs_reference"], tri["vs_peer"]) == (10.0, 4.0)  # the interpreter row is left out
    assert P.load_results(tmp_path / "missing") == []


def test_charts_write_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -r requirements-notebook.txt)")
    _write_results(tmp_path)
    rows = P.load_results(tmp_path)
    for path in (P.roofline_chart(rows, tmp_path / "r.png"), P.speedup_chart(rows, tmp_path / "s.png"),
                 P.roofline_chart([], tmp_path / "r0.png"), P.speedup_chart([], tmp_path / "s0.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- notebook


def test_notebook_executes_headless(tmp_path):
    for mod in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        pytest.importorskip(mod, reason=f"{mod} not installed (pip install -r requirements-notebook.txt)")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "out"
    env = {"EFFDET_NB_SIZE": "128", "EFFDET_NB_BATCH": "2", "EFFDET_NB_DEVICE": "cpu", "EFFDET_NB_OUT": str(out),
           "EFFDET_NB_RESULTS": str(tmp_path / "no-results"), "EFFDET_NB_KERNEL_N": "512"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel process inherits this environment
    try:
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO_ROOT / "bench")}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "a code cell did not run"
    for c in code:
        errors = [o for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"cell failed: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    text = "\n".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "only the reference backend" in text  # the CPU run says so plainly
    assert "No results yet" in text
    assert "matches the reference: True" in text
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"kernel-shares-cpu.png", "roofline-cpu.png", "speedups-cpu.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    trace = out / "trace-cpu.json"
    assert trace.exists() and trace.stat().st_size > 1000
    assert "traceEvents" in trace.read_text()[:4000]
