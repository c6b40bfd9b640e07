"""Helpers behind ``bench/profile_kernels.ipynb`` (the notebook stays short; the logic lives and is tested here).

* :func:`notebook_params` - the notebook's parameters, overridable by ``EFFDET_NB_*`` environment variables;
* :func:`profile_model` - one training step (forward, targets, loss, backward, SGD, EMA) and one inference
  pass under ``torch.profiler``, with the five kernel ops labelled (:func:`kernel_labels`);
* :func:`top_ops`, :func:`kernel_shares`, :func:`shares_table` - where the time went;
* :func:`load_results`, :func:`roofline_chart`, :func:`speedup_chart` - the ``bench/results/*.jsonl`` rows as
  figures (PNG files too);
* :func:`time_kernel`, :func:`interpreter_demo` - time one kernel at one shape; step through a kernel in the
  Triton interpreter on the CPU;
* :func:`export_trace` - a Chrome trace of the profiled step (open it in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # so that ``bench.harness`` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import REPO_ROOT, device_slug, setup_repo_path  # noqa: E402,F401  (re-exported)

KERNEL_OPS = ("focal_loss", "batched_nms", "decode", "bifpn_fusion", "ema_update")
# public functions of ``kernels`` -> the op they belong to (decode_topk is the fused decode)
_PUBLIC = {"focal_loss": "focal_loss", "batched_nms": "batched_nms", "decode_boxes": "decode",
           "decode_topk": "decode", "bifpn_fusion": "bifpn_fusion", "ema_update": "ema_update"}
# event-name keys (lower case, without "_" and ":") -> op: our labels, the effdet:: custom ops, autograd nodes
_EVENT_KEYS = {"focalloss": "focal_loss", "batchednms": "batched_nms", "decodeboxes": "decode",
               "decodetopk": "decode", "bifpnfusion": "bifpn_fusion", "emaupdate": "ema_update"}
PHASES = ("train_step", "predict")

ENV_PARAMS = {  # parameter -> (environment variable, type)
    "model_name": ("EFFDET_NB_MODEL", str),
    "image_size": ("EFFDET_NB_SIZE", int),
    "batch": ("EFFDET_NB_BATCH", int),
    "device": ("EFFDET_NB_DEVICE", str),
    "out_dir": ("EFFDET_NB_OUT", str),
    "results_dir": ("EFFDET_NB_RESULTS", str),
    "kernel_size": ("EFFDET_NB_KERNEL_N", int),
}


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else the CPU."""
    if name in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def notebook_params(defaults: dict, environ=None) -> dict:
    """``defaults`` updated from the ``EFFDET_NB_*`` variables (see ``ENV_PARAMS``), then resolved:
    ``device`` becomes a ``torch.device``; ``out_dir`` defaults to ``bench/results``."""
    environ = os.environ if environ is None else environ
    params = dict(defaults)
    for key, (var, typ) in ENV_PARAMS.items():
        if environ.get(var, "") != "":
            params[key] = typ(environ[var])
    params["device"] = pick_device(params.get("device", "auto"))
    params["out_dir"] = Path(params.get("out_dir") or REPO_ROOT / "bench" / "results")
    params["results_dir"] = Path(params.get("results_dir") or REPO_ROOT / "bench" / "results")
    return params


def available_backends(device) -> list[str]:
    """Backends worth profiling on ``device``: the reference always, Triton only on CUDA (on the CPU it would
    run in the interpreter, which says nothing about speed)."""
    from kernels import triton_available

    backends = ["torch"]
    if torch.device(device).type == "cuda" and triton_available():
        backends.append("triton")
    return backends


# --------------------------------------------------------------------------------------------------
# profiling
# --------------------------------------------------------------------------------------------------


def _labelled(op_label: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(op_label):
            return fn(*args, **kwargs)
    wrapper.__wrapped_by_profiling__ = True
    return wrapper


@contextlib.contextmanager
def kernel_labels():
    """Wrap the public ``kernels`` functions in ``record_function("kernels.<name>")`` labels for the duration
    (``detector`` looks them up as ``kernels.<name>`` at call time, so the wrappers are seen)."""
    import kernels

    saved = {}
    try:
        for name in _PUBLIC:
            fn = getattr(kernels, name, None)
            if fn is None or getattr(fn, "__wrapped_by_profiling__", False):
                continue
            saved[name] = fn
            setattr(kernels, name, _labelled(f"kernels.{name}", fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def op_of(event_name: str) -> Optional[str]:
    """The kernel op an event name belongs to (our labels, ``effdet::`` custom ops, autograd nodes), or None."""
    key = re.sub(r"[_:\s.]", "", event_name.lower())
    for k, op in _EVENT_KEYS.items():
        if k in key:
            return op
    return None


def profile_model(model_name: str = "efficientdet_d0", image_size: int = 128, batch: int = 1, device="cpu",
                  backend: str = "torch", channels_last: bool = False, warmup: int = 1, seed: int = 0):
    """Build the model, warm up, then profile ``train_step`` (forward, targets, loss, backward, SGD step, EMA
    update) and ``predict`` (forward + post-processing) once each. Returns the ``torch.profiler.profile``."""
    setup_repo_path()
    from bench.static import d0_workload

    device = torch.device(device)
    train_step, predict = d0_workload(image_size, batch, device, model_name, backend, seed, channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in range(warmup):
        train_step()
        predict()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with kernel_labels(), torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("train_step"):
            train_step()
            sync()
        with torch.profiler.record_function("predict"):
            predict()
            sync()
    return prof


def _device_time(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def _event_time_us(evt, use_device: bool) -> float:
    return _device_time(evt) if use_device else float(evt.cpu_time_total)


def kernel_shares(prof, use_device: Optional[bool] = None) -> dict:
    """Per phase (``train_step``, ``predict``): total microseconds and, per kernel op, the time of its outermost
    events (nested events of the same op are not counted twice) plus the autograd backward nodes of the ops its
    forward recorded (matched by sequence number), and its percentage of the phase.

    ``use_device``: GPU time instead of CPU wall time (default: when the trace holds GPU time)."""
    events = list(prof.events())
    if use_device is None:
        use_device = any(_device_time(e) > 0 for e in events if e.name in PHASES)
    phases = {e.name: e for e in events if e.name in PHASES}
    out = {}
    for phase, top in phases.items():
        total = _event_time_us(top, use_device) or 1e-9
        fwd = {op: 0.0 for op in KERNEL_OPS}
        bwd = {op: 0.0 for op in KERNEL_OPS}
        seq_to_op = {}
        for e in events:
            op = op_of(e.name)
            if op is None or not _inside(e, top):
                continue
            if any(op_of(a.name) is not None for a in _ancestors(e)):
                continue  # its outermost labelled ancestor already counts it
            fwd[op] += _event_time_us(e, use_device)
            for d in _descendants(e):
                if getattr(d, "sequence_nr", -1) >= 0:
                    seq_to_op.setdefault(d.sequence_nr, op)
        for e in events:  # backward of what the labelled forwards recorded
            if (e.name.startswith("autograd::engine::evaluate_function") and _inside(e, top)
                    and op_of(e.name) is None and getattr(e, "sequence_nr", -1) in seq_to_op):
                bwd[seq_to_op[e.sequence_nr]] += _event_time_us(e, use_device)
        out[phase] = {"total_us": total, "unit": "device" if use_device else "cpu",
                      "ops": {op: {"us": fwd[op] + bwd[op], "forward_us": fwd[op], "backward_us": bwd[op],
                                   "pct": 100.0 * (fwd[op] + bwd[op]) / total} for op in KERNEL_OPS}}
    return out


def _descendants(evt) -> Iterable:
    for c in getattr(evt, "cpu_children", []):
        yield c
        yield from _descendants(c)


def _ancestors(evt) -> Iterable:
    p = getattr(evt, "cpu_parent", None)
    while p is not None:
        yield p
        p = getattr(p, "cpu_parent", None)


def _inside(evt, top) -> bool:
    if evt is top:
        return False
    if any(a is top for a in _ancestors(evt)):
        return True
    # autograd engine threads have no cpu_parent: fall back to the time range
    tr, tt = evt.time_range, top.time_range
    return tt.start <= tr.start and tr.end <= tt.end and getattr(evt, "thread", None) != getattr(top, "thread", 0)


def shares_table(shares_by_backend: dict) -> str:
    """Plain-text side-by-side table: rows = phase x op, columns = backends (ms and % of the phase)."""
    backends = list(shares_by_backend)
    head = f"{'phase':<11} {'op':<13}" + "".join(f" {b + ' ms':>12} {b + ' %':>9}" for b in backends)
    lines = [head, "-" * len(head)]
    for phase in PHASES:
        for op in list(KERNEL_OPS) + ["(phase total)"]:
            cells = []
            for b in backends:
                ph = shares_by_backend[b].get(phase)
                if ph is None:
                    cells.append(f" {'-':>12} {'-':>9}")
                elif op == "(phase total)":
                    cells.append(f" {ph['total_us'] / 1e3:>12.2f} {100.0:>9.1f}")
                else:
                    o = ph["ops"][op]
                    cells.append(f" {o['us'] / 1e3:>12.2f} {o['pct']:>9.1f}")
            lines.append(f"{phase:<11} {op:<13}" + "".join(cells))
    return "\n".join(lines)


def top_ops(prof, n: int = 15, device: bool = False) -> list[dict]:
    """The ``n`` most expensive operators by self time (``aten::`` and custom ops; our labels excluded)."""
    rows = []
    for a in prof.key_averages():
        if a.key in PHASES or a.key.startswith("kernels.") or a.key.startswith("ProfilerStep"):
            continue
        self_us = float(getattr(a, "self_device_time_total", 0.0) or 0.0) if device else float(a.self_cpu_time_total)
        rows.append({"name": a.key, "calls": int(a.count), "self_ms": self_us / 1e3,
                     "total_ms": (_device_time(a) if device else float(a.cpu_time_total)) / 1e3})
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return rows[:n]


def format_rows(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """A list of dicts as a fixed-width text table."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) if _num(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def export_trace(prof, out_dir, device) -> Path:
    """Write the Chrome trace of ``prof`` to ``<out_dir>/trace-<device-slug>.json`` and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"trace-{device_slug(device)}.json"
    prof.export_chrome_trace(str(path))
    return path


# --------------------------------------------------------------------------------------------------
# results and charts
# --------------------------------------------------------------------------------------------------


def load_results(results_dir) -> list[dict]:
    """Every JSON object of every ``*.jsonl`` in ``results_dir`` (unreadable lines skipped); each gets
    ``_file`` = the file name."""
    from training.plots import read_log

    rows = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for row in read_log(path):
            row["_file"] = path.name
            rows.append(row)
    return rows


def kernel_rows(rows: list[dict]) -> list[dict]:
    """Rows of ``bench/kernels.py`` that carry a timing (``op`` + ``provider`` + ``median_ms``)."""
    return [r for r in rows if "op" in r and "provider" in r and r.get("median_ms")]


def model_rows(rows: list[dict]) -> list[dict]:
    """Rows of ``bench/model.py`` that carry a timing."""
    return [r for r in rows if r.get("bench") == "model" and r.get("median_ms")]


def _latest(rows: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Keep the last row (file order = time order) for each key."""
    last = {}
    for r in rows:
        last[key(r)] = r
    return list(last.values())


def roofline_chart(rows: list[dict], out_png, title: str = "kernels: achieved bandwidth") -> Path:
    """Achieved GB/s of every kernel row (latest per device/op/shape/provider) against the device's measured
    copy bandwidth (dashed line per device). Interpreter rows are left out (not speed figures)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    pts = [r for r in _latest(kernel_rows(rows), lambda r: (r.get("device"), r["op"], r["shape"], r["provider"]))
           if r.get("gbps") and not r.get("interpreter")]
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    if not pts:
        ax.text(0.5, 0.5, "no kernel results with GB/s yet\n(run: python bench/kernels.py on a GPU)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        labels = sorted({f"{r['op']}\n{r['shape']}" for r in pts})
        xpos = {lab: i for i, lab in enumerate(labels)}
        providers = sorted({r["provider"] for r in pts})
        for j, prov in enumerate(providers):
            sel = [r for r in pts if r["provider"] == prov]
            xs = [xpos[f"{r['op']}\n{r['shape']}"] + (j - (len(providers) - 1) / 2) * 0.12 for r in sel]
            ax.scatter(xs, [r["gbps"] for r in sel], label=prov, zorder=3)
        for dev in sorted({r.get("device") for r in pts}, key=str):
            bw = [r.get("copy_gbps") for r in pts if r.get("device") == dev and r.get("copy_gbps")]
            if bw:
                ax.axhline(bw[-1], linestyle="--", color="gray")
                ax.text(len(labels) - 0.5, bw[-1], f" copy BW {dev}: {bw[-1]:.0f} GB/s", va="bottom",
                        ha="right", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("achieved GB/s (log)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title)
    _tight(fig)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def _tight(fig) -> None:
    import warnings

    with warnings.catch_warnings():  # long tick labels: matplotlib warns it cannot fit them all
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()


def speedup_rows(rows: list[dict]) -> list[dict]:
    """``{"label", "vs_reference", "vs_peer"}`` per kernel row (latest, not the reference itself, not the
    interpreter) and per model row of ours (vs effdet)."""
    out = []
    for r in _latest(kernel_rows(rows), lambda r: (r.get("device"), r["op"], r["shape"], r["provider"])):
        if r["provider"] == "reference" or r.get("interpreter"):
            continue
        if r.get("speedup_vs_reference") or r.get("speedup_vs_peer"):
            out.append({"label": f"{r['op']} {r['shape']} [{r['provider']}]",
                        "vs_reference": r.get("speedup_vs_reference"), "vs_peer": r.get("speedup_vs_peer")})
    key = lambda r: (r.get("device"), r.get("workload"), r.get("batch"), r.get("size"), r.get("impl"),  # noqa: E731
                     r.get("precision"), r.get("memory_format"))
    for r in _latest(model_rows(rows), key):
        if r.get("impl") == "ours" and r.get("speedup_vs_peer"):
            out.append({"label": f"model {r['workload']} b{r['batch']} {r['size']}px {r.get('memory_format', '')}",
                        "vs_reference": None, "vs_peer": r["speedup_vs_peer"]})
    return out


def speedup_chart(rows: list[dict], out_png, title: str = "speedups (x) over the reference and the peer") -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    data = speedup_rows(rows)
    fig = Figure(figsize=(9, max(3.0, 0.35 * len(data) + 1.5)))
    ax = fig.subplots()
    if not data:
        ax.text(0.5, 0.5, "no speedup results yet\n(run: python bench/kernels.py and python bench/model.py)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ys = range(len(data))
        ax.barh([y - 0.2 for y in ys], [d["vs_reference"] or 0 for d in data], height=0.4, label="vs reference")
        ax.barh([y + 0.2 for y in ys], [d["vs_peer"] or 0 for d in data], height=0.4, label="vs peer")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([d["label"] for d in data], fontsize=7)
        ax.set_xlabel("speedup (x), > 1 = faster")
        ax.legend(fontsize=8)
    ax.set_title(title)
    _tight(fig)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def shares_chart(shares_by_backend: dict, out_png) -> Path:
    """Bar chart: percentage of each phase spent in each kernel op, per backend."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    backends = list(shares_by_backend)
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, len(PHASES), squeeze=False)
    for ax, phase in zip(axes[0], PHASES):
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            ph = shares_by_backend[b].get(phase)
            vals = [ph["ops"][op]["pct"] if ph else 0.0 for op in KERNEL_OPS]
            ax.bar([i + j * width for i in range(len(KERNEL_OPS))], vals, width=width, label=b)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(KERNEL_OPS))])
        ax.set_xticklabels(KERNEL_OPS, rotation=30, fontsize=8)
        ax.set_ylabel("% of phase time")
        ax.set_title(phase)
        ax.legend(fontsize=8)
    _tight(fig)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


# --------------------------------------------------------------------------------------------------
# one kernel, one shape
# --------------------------------------------------------------------------------------------------


def time_kernel(fn: Callable[[], object], device, reps: int = 10, warmup: int = 2) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms", "method"}``: ``triton.testing.do_bench`` on CUDA, ``perf_counter``
    medians on the CPU."""
    from bench.harness import time_fn

    med, p20, p80 = time_fn(fn, device, reps=reps, warmup=warmup)
    method = "triton.testing.do_bench" if torch.device(device).type == "cuda" else "time.perf_counter median"
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "method": method}


def focal_loss_inputs(n: int, num_classes: int = 90, device="cpu", seed: int = 0):
    """Random ``(logits (1, n, C), targets (1, n), normalizer)`` for focal_loss: ~1% positives, some ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n, num_classes, generator=g) * 3
    targets = torch.full((1, n), -1, dtype=torch.long)
    pos = torch.rand(1, n, generator=g) < 0.01
    targets[pos] = torch.randint(0, num_classes, (int(pos.sum()),), generator=g)
    targets[torch.rand(1, n, generator=g) < 0.01] = -2
    normalizer = torch.tensor(float(pos.sum()) + 1.0)
    return logits.to(device), targets.to(device), normalizer.to(device)


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, {root!r})
    import torch
    from bench.profiling import focal_loss_inputs
    import kernels
    from kernels.focal_loss import focal_loss_reference
    logits, targets, normalizer = focal_loss_inputs({n}, num_classes={c})
    logits.requires_grad_(True)
    ours = kernels.focal_loss(logits, targets, normalizer, backend="triton")
    ours.backward()
    g_ours = logits.grad.clone(); logits.grad = None
    ref = focal_loss_reference(logits, targets, normalizer)
    ref.backward()
    g_ref = logits.grad
    print(f"triton (interpreter) loss = {{ours.item():.6f}}")
    print(f"reference loss            = {{ref.item():.6f}}")
    print(f"max |grad difference|     = {{(g_ours - g_ref).abs().max().item():.3e}}")
    print("MATCH" if torch.allclose(ours, ref, rtol=1e-5, atol=1e-6) and
          torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6) else "MISMATCH")
""")


def interpreter_demo(n: int = 64, num_classes: int = 7, timeout: float = 120.0) -> dict:
    """Run a tiny ``focal_loss(backend="triton")`` in a fresh Python with ``TRITON_INTERPRET=1`` (it must be set
    before triton is imported, hence the subprocess) and compare it with the reference.

    Returns ``{"returncode", "output", "match"}``. In that mode every ``@triton.jit`` kernel runs as plain
    Python on numpy arrays: ``print(...)`` and ``breakpoint()`` inside the kernel body work (run the script
    in a terminal for an interactive debugger), ``tl.device_print`` prints too."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("EFFDET_KERNEL_BACKEND", None)
    script = _INTERPRETER_SCRIPT.format(root=str(REPO_ROOT), n=int(n), c=int(num_classes))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(REPO_ROOT), capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + (("\n" + proc.stderr[-3000:]) if proc.returncode else "")
    return {"returncode": proc.returncode, "output": output.strip(),
            "match": proc.returncode == 0 and "MATCH" in proc.stdout.split() and "MISMATCH" not in proc.stdout}
