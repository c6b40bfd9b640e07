"""Benchmark helpers shared by everything in ``bench/`` (repository root, device name and slug, git commit,
quantiles, AMP autocast) and the kernel benchmark harness: cases, timing, copy-bandwidth baseline, table and JSON-lines results.

A :class:`Case` is one op at one shape with several zero-argument *providers* (``"triton"``,
``"reference"``, ``"compiled"`` = ``torch.compile`` of the reference, ``"peer:<name>"`` = an outside
implementation such as torchvision or effdet). :func:`run_cases` times every provider of every case
and records, per row: median / p20 / p80 milliseconds, the case's minimum bytes moved, GB/s, the
percentage of the measured device-to-device copy bandwidth, and the speedups over ``"reference"`` and
over the first peer. A provider that raises becomes an error row, never a crash.

Timing: on CUDA ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])``; on the CPU the median,
20th and 80th percentile of ``time.perf_counter`` over a few repetitions. Triton providers on the CPU
run in the interpreter: those rows show that the kernel code runs, not how fast it is (whether it computes
the reference's values is what ``pytest tests/kernels`` checks), and are marked so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

INTERPRETER_NOTE = "interpreter: the kernel runs (values: pytest tests/kernels), not a speed figure"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclasses.dataclass
class Case:
    """One op at one shape. ``providers`` maps a name to a zero-argument callable that runs the op once."""

    op: str
    shape: str
    providers: dict[str, Callable[[], object]]
    bytes_moved: int
    setup: str = ""


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} threads)"


def device_slug(device: torch.device) -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def append_jsonl(rows: list[dict], meta: dict, results_dir, name: str) -> Path:
    """Append one JSON line per row (``meta`` merged into each) to ``<results_dir>/<name>.jsonl``."""
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}, default=str) + "\n")
    return path


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation (numpy's default)."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of milliseconds."""
    return statistics.median(times_ms), quantile(times_ms, 0.2), quantile(times_ms, 0.8)


def autocast_context(device: torch.device, precision: str):
    """AMP autocast for ``"fp16"`` / ``"bf16"``, a no-op for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def setup_repo_path() -> Path:
    """Put the repository root on ``sys.path`` (scripts and notebooks may run from any folder); return it."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return REPO_ROOT


def time_fn(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1
            ) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def measure_copy_bandwidth(device, nbytes: Optional[int] = None) -> float:
    """Achieved copy bandwidth in GB/s (bytes read + written per second).

    CUDA: device-to-device ``copy_`` of a large buffer (256 MiB) timed with ``do_bench``.
    CPU: a memcpy estimate, ``copy_`` of a 64 MiB buffer timed with ``perf_counter``.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    med_ms, _, _ = time_fn(lambda: dst.copy_(src), device, reps=7, warmup=2)
    return 2 * nbytes / (med_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------------


def _first_peer(names) -> Optional[str]:
    return next((n for n in names if n.startswith("peer:")), None)


def run_case(case: Case, device, copy_gbps: Optional[float], reps: int = 5) -> list[dict]:
    rows = []
    for name, fn in case.providers.items():
        row = {"op": case.op, "shape": case.shape, "provider": name, "bytes": int(case.bytes_moved),
               "setup": case.setup, "median_ms": None, "p20_ms": None, "p80_ms": None, "gbps": None,
               "pct_copy_bw": None, "speedup_vs_reference": None, "speedup_vs_peer": None, "error": None,
               "interpreter": name == "triton" and torch.device(device).type != "cuda"
               and interpreter_active()}
        try:
            med, p20, p80 = time_fn(fn, device, reps=reps)
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            if med > 0 and case.bytes_moved:
                row["gbps"] = case.bytes_moved / (med * 1e-3) / 1e9
                if copy_gbps:
                    row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
        except Exception as err:  # a failing provider is a row, not a crash
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            row["traceback"] = traceback.format_exc(limit=3)[-1500:]
        if row["interpreter"]:
            row["note"] = INTERPRETER_NOTE
        rows.append(row)
    by_name = {r["provider"]: r for r in rows}
    ref = by_name.get("reference")
    peer = by_name.get(_first_peer(by_name))
    for r in rows:
        if r["median_ms"]:
            if ref and ref["median_ms"]:
                r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
            if peer and peer["median_ms"]:
                r["speedup_vs_peer"] = peer["median_ms"] / r["median_ms"]
                r["peer"] = peer["provider"]
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], title: str, console=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print(title)
        for r in rows:
            print(r)
        return
    console = console or Console(width=200)
    table = Table(title=title, show_lines=False)
    for col in ("op", "shape", "provider", "median ms", "p20 ms", "p80 ms", "MB", "GB/s", "% copy BW",
                "x ref", "x peer", "error / note"):
        table.add_column(col, justify="right" if col not in ("op", "shape", "provider", "error / note")
                         else "left", overflow="fold")
    for r in rows:
        table.add_row(r["op"], r["shape"], r["provider"], _fmt(r["median_ms"], ".4g"), _fmt(r["p20_ms"], ".4g"),
                      _fmt(r["p80_ms"], ".4g"), _fmt(r["bytes"] / 1e6, ".3g"), _fmt(r["gbps"], ".4g"),
                      _fmt(r["pct_copy_bw"], ".3g"), _fmt(r["speedup_vs_reference"], ".3g"),
                      _fmt(r["speedup_vs_peer"], ".3g"),
                      r["error"] or ("interpreter" if r.get("interpreter") else ""))
    console.print(table)


def run_cases(cases: list[Case], device, results_dir=None, reps: Optional[int] = None, quick: bool = False,
              console=None) -> list[dict]:
    """Time every case, print the table, append JSON lines to ``<results_dir>/kernels-<slug>.jsonl``."""
    device = torch.device(device)
    reps = reps or (3 if quick else 10)
    try:
        copy_gbps = measure_copy_bandwidth(device, nbytes=(8 << 20) if quick and device.type != "cuda" else None)
    except Exception:
        copy_gbps = None
    rows = []
    for case in cases:
        rows.extend(run_case(case, device, copy_gbps, reps=reps))
    interp = any(r.get("interpreter") for r in rows)
    title = f"kernels on {device_name(device)} (copy {_fmt(copy_gbps, '.1f')} GB/s)"
    if interp:
        title += f" | triton rows: {INTERPRETER_NOTE}"
    print_table(rows, title, console)
    meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version(), "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_gbps": copy_gbps, "quick": quick, "triton_interpreter": interp}
    out_dir = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{device_slug(device)}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}, default=str) + "\n")
    if console is None:
        print(f"results appended to {path}")
    return rows
