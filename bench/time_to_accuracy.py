"""Time to accuracy: run ``train.py`` with your arguments and report its validation curve against wall time.

    python bench/time_to_accuracy.py --name shapes -- --eval-interval 2 --output /tmp/tta
    python bench/time_to_accuracy.py --name glyphs --timeout-minutes 15 -- \\
        --train-ann G/annotations/instances_train.json --train-images G/train \\
        --val-ann G/annotations/instances_val.json --val-images G/val --eval-interval 2 --output /tmp/tta-g

Everything after ``--`` goes to ``train.py`` unchanged (run by this same Python). When it ends, the
``"eval"`` events it appended to ``<--output>/log.jsonl`` during this run (each carries ``minutes``
since the run started, ``AP`` and ``AP50``) are printed as a table with the total wall time, and
appended one JSON line per point to ``bench/results/tta-<name>.jsonl`` with the machine, torch
version, git commit, date and command. ``--timeout-minutes`` interrupts training (Ctrl-C, then a
kill after a grace period) if it runs longer; the points logged until then are still reported.
Exits with train.py's exit status.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO_ROOT))
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
GRACE_S = 120  # after an interrupt on timeout, how long train.py may take to save and stop


def output_dir(train_args: list[str]) -> str:
    """The ``--output`` folder train.py will use (its default is ``output``)."""
    out = "output"
    for i, a in enumerate(train_args):
        if a == "--output" and i + 1 < len(train_args):
            out = train_args[i + 1]
        elif a.startswith("--output="):
            out = a.split("=", 1)[1]
    return out


def read_events(path: Path, offset: int) -> list[dict]:
    """JSON objects of the lines of ``path`` after byte ``offset``; cut-short or foreign lines are skipped."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", errors="replace")
    from training.plots import parse_events

    return parse_events(text.splitlines())


def curve(events: list[dict]) -> list[dict]:
    """One point per ``"eval"`` event: epoch, step, minutes, AP, AP50 (and AR100 when logged)."""
    points = []
    for e in events:
        if e.get("event") == "eval":
            points.append({k: e.get(k) for k in ("epoch", "step", "minutes", "AP", "AP50", "AR100")})
    return points


def machine() -> dict:
    """CPU (model and cores), GPU when there is one, torch version: the same naming as the other benchmarks."""
    import torch

    from bench.harness import device_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": device_name(torch.device("cpu")), "cpu_cores": cores, "gpu": gpu, "torch": torch.__version__}


def run_train(cmd: list[str], timeout_minutes: float | None) -> tuple[int, bool]:
    """Run ``cmd``; on timeout send SIGINT (train.py stops cleanly), then SIGKILL after GRACE_S. (rc, timed out)."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout=None if timeout_minutes is None else timeout_minutes * 60), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=GRACE_S), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def print_table(name: str, points: list[dict], wall_minutes: float, rc: int, timed_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v, spec):
        return "-" if not isinstance(v, (int, float)) else format(v, spec)

    t = Table(title=f"time to accuracy: {name}",
              caption=f"total wall time {wall_minutes:.2f} min; train.py exit status {rc}"
                      + (" (stopped at --timeout-minutes)" if timed_out else ""))
    for col in ("epoch", "step", "minutes", "AP", "AP50"):
        t.add_column(col, justify="right")
    for p in points:
        t.add_row(fmt(p["epoch"], "d"), fmt(p["step"], "d"), fmt(p["minutes"], ".2f"), fmt(p["AP"], ".4f"),
                  fmt(p["AP50"], ".4f"))
    if not points:
        t.add_row("-", "-", "-", "no evaluation in this run", "-")
    Console().print(t)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python bench/time_to_accuracy.py",
                                description=__doc__.split("\n")[0],
                                usage="%(prog)s --name NAME [--timeout-minutes M] [--results-dir DIR] -- TRAIN.PY ARGS")
    p.add_argument("--name", required=True, help="label of the run; results go to <results-dir>/tta-<name>.jsonl")
    p.add_argument("--timeout-minutes", type=float, default=None, help="interrupt train.py after this long")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR), help="default: bench/results")
    a = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", a.name):
        p.error(f"--name {a.name!r}: use letters, digits, '.', '_' or '-' (it names the results file)")
    if a.timeout_minutes is not None and not a.timeout_minutes > 0:
        p.error(f"--timeout-minutes must be > 0, got {a.timeout_minutes}")

    log = Path(output_dir(train_args)) / "log.jsonl"
    offset = log.stat().st_size if log.is_file() else 0  # a reused --output appends: read only this run's lines
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *train_args]
    t0 = time.perf_counter()
    rc, timed_out = run_train(cmd, a.timeout_minutes)
    wall = (time.perf_counter() - t0) / 60
    events = read_events(log, offset)
    points = curve(events)
    print_table(a.name, points, wall, rc, timed_out)

    from bench.harness import append_jsonl, git_commit  # imports torch: only once train.py has finished

    start = next((e for e in events if e.get("event") == "start"), {})
    args = start.get("args") or {}
    record = {"bench": "time_to_accuracy", "name": a.name,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "git_commit": git_commit(), "command": cmd[1:],
              "train_images": start.get("train_images"), "val_images": start.get("val_images"),
              "recipe": args.get("recipe"), "total_wall_minutes": round(wall, 3), "train_returncode": rc,
              "timed_out": timed_out}
    if points:
        path = append_jsonl(points, record, a.results_dir, f"tta-{a.name}")
        print(f"{len(points)} points appended to {path}")
    else:
        print(f"no eval events in {log} from this run: nothing recorded", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
