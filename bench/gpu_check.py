"""One command for a fresh CUDA machine with the requirements installed: every GPU check, one results folder.

    python bench/gpu_check.py [--out bench/results/gpu-<date>/] [--budget 480] [--dry-run] [--only a,b]

Steps, each in its own subprocess with its own time limit (a failing or timed-out step is recorded and the
rest still run; the limits add up to 450 s, within the 8-minute ``--budget``, and a step never gets more than
what is left of it):

1. ``cuda_tests``   - ``pytest -m cuda`` (JUnit XML in the folder);
2. ``kernels``      - ``bench/kernels.py`` full shapes (D0 training batch 32 at 512 px, inference batch 8,
   D4 1024 px): Triton against the reference, ``torch.compile`` and the peers;
3. ``model``        - ``bench/model.py`` with AMP (fp16): D0 training step at batch 32 and inference at batch
   8, 512 px, beside effdet;
4. ``nms_20k``      - 20,000 boxes of one class in one image: ``kernels.batched_nms`` (Triton) against the
   reference and ``torchvision.ops.batched_nms`` (``triton.testing.do_bench``), kept indices compared;
5. ``notebook``     - ``bench/profile_kernels.ipynb`` executed headless (nbclient) on CUDA, reading the
   results of the steps above; the executed notebook is saved in the folder.

Everything lands in ``--out``: the JSON lines of each bench, ``steps.jsonl`` (one line per step), the
executed notebook and ``summary.md`` (device, date, torch / triton versions, git commit, each step's status,
seconds and key numbers). Without CUDA it stops with a one-line error (exit 2) unless ``--dry-run``, which
prints the plan and exits 0. Exit 1 when a step failed, timed out or was skipped for lack of time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent   # (bench.harness.REPO_ROOT; not imported: --dry-run
if str(REPO_ROOT) not in sys.path:                     # and the no-CUDA error stay fast, torch-free until needed)
    sys.path.insert(0, str(REPO_ROOT))

BUDGET_S = 480
# name -> (time limit in seconds, what it runs)
STEPS = {
    "cuda_tests": (110, "python -m pytest -m cuda -q tests"),
    "kernels": (120, "bench/kernels.py --device cuda (D0 batch 32 / inference batch 8 / D4 shapes)"),
    "model": (100, "bench/model.py --device cuda --precision fp16 --train-batch 32 --train-size 512 "
                   "--infer-batch 8 --infer-size 512 (ours beside effdet)"),
    "nms_20k": (30, "kernels.batched_nms, 20,000 boxes x 1 class, against torchvision.ops.batched_nms"),
    "notebook": (90, "bench/profile_kernels.ipynb via nbclient on CUDA"),
}


def default_out() -> Path:
    return REPO_ROOT / "bench" / "results" / f"gpu-{datetime.date.today().isoformat()}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="results folder (default bench/results/gpu-<date>/)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together (default 480)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no CUDA needed)")
    p.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out else default_out()
    args.steps = [s.strip() for s in args.only.split(",") if s.strip()] or list(STEPS)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"--only: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    return args


# --------------------------------------------------------------------------------------------------
# the steps (each runs in its own process: ``gpu_check.py --step NAME --out DIR``); each returns a dict of
# key numbers and raises on failure
# --------------------------------------------------------------------------------------------------


def step_cuda_tests(out: Path) -> dict:
    xml = out / "cuda-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", "tests"], cwd=REPO_ROOT, capture_output=True, text=True)
    (out / "cuda-tests.log").write_text(proc.stdout + proc.stderr)
    nums = {}
    if xml.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for k in ("tests", "failures", "errors", "skipped"):
            nums[k] = int(suite.get(k, 0))
        nums["passed"] = nums["tests"] - nums["failures"] - nums["errors"] - nums["skipped"]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}: {nums}; see cuda-tests.log")
    return nums


def _latest_rows(path: Path, since: str) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("date", "") >= since]


def step_kernels(out: Path) -> dict:
    from bench import kernels

    since = _now()
    code = kernels.main(["--device", "cuda", "--results-dir", str(out)])
    rows = [r for p in out.glob("kernels-*.jsonl") for r in _latest_rows(p, since)]
    nums = {f"{r['op']} {r['shape']}": {"triton_ms": r["median_ms"], "x_ref": r["speedup_vs_reference"],
                                         "x_peer": r["speedup_vs_peer"], "pct_copy_bw": r["pct_copy_bw"]}
            for r in rows if r["provider"] == "triton"}
    errors = [f"{r['op']} {r['shape']} {r['provider']}: {r['error']}" for r in rows if r.get("error")]
    if code != 0 or not rows:
        raise RuntimeError(f"bench/kernels.py exited {code} with {len(rows)} rows")
    if errors:
        nums["errors"] = errors
    return nums


def step_model(out: Path) -> dict:
    from bench import model

    since = _now()
    code = model.main(["--device", "cuda", "--precision", "fp16", "--train-batch", "32", "--train-size", "512",
                       "--infer-batch", "8", "--infer-size", "512", "--warmup", "3", "--iters", "10",
                       "--backend", "auto", "--results-dir", str(out)])
    rows = [r for p in out.glob("model-*.jsonl") for r in _latest_rows(p, since)]
    nums = {f"{r['workload']} b{r['batch']} {r['impl']}": {"median_ms": r["median_ms"], "img_per_s": r["img_per_s"],
                                                           "x_effdet": r["speedup_vs_peer"], "error": r["error"]}
            for r in rows}
    if code != 0 or not rows:
        raise RuntimeError(f"bench/model.py exited {code} with {len(rows)} rows")
    return nums


def nms_20k_inputs(n: int = 20000, device="cuda", seed: int = 0):
    """``n`` boxes of one class in one 1024 px image: half jittered around 50 objects, half spread."""
    import torch

    g = torch.Generator().manual_seed(seed)
    objects = torch.rand(50, 4, generator=g) * torch.tensor([900.0, 900.0, 120.0, 120.0])
    objects = torch.cat([objects[:, :2], objects[:, :2] + 8 + objects[:, 2:]], 1)
    clustered = objects[torch.randint(0, 50, (n,), generator=g)] + torch.randn(n, 4, generator=g) * 4
    xy = torch.rand(n, 2, generator=g) * 1000
    spread = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 100], 1)
    boxes = torch.where(torch.rand(n, 1, generator=g) < 0.5, clustered, spread)
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)
    scores = torch.rand(n, generator=g)
    return boxes.to(device), scores.to(device), torch.zeros(n, dtype=torch.int64, device=device)


def step_nms_20k(out: Path) -> dict:
    import torch
    import torchvision

    import kernels
    from bench.harness import Case, run_cases

    boxes, scores, classes = nms_20k_inputs()
    iou = 0.5
    ours = kernels.batched_nms(boxes, scores, classes, iou, backend="triton")
    peer = torchvision.ops.batched_nms(boxes, scores, classes, iou)
    same = bool(ours.shape == peer.shape and torch.equal(ours.cpu(), peer.cpu()))
    case = Case(op="batched_nms", shape="20000 boxes x 1 class", bytes_moved=20000 * (16 + 4 + 8 + 8),
                setup="one 1024 px image, one class, IoU 0.5, half clustered on 50 objects, half spread",
                providers={"triton": lambda: kernels.batched_nms(boxes, scores, classes, iou, backend="triton"),
                           "reference": lambda: kernels.batched_nms(boxes, scores, classes, iou, backend="torch"),
                           "peer:torchvision": lambda: torchvision.ops.batched_nms(boxes, scores, classes, iou)})
    rows = run_cases([case], "cuda", results_dir=out)
    by = {r["provider"]: r for r in rows}
    nums = {"kept_triton": int(ours.numel()), "kept_torchvision": int(peer.numel()), "same_indices": same,
            **{f"{k}_ms": r["median_ms"] for k, r in by.items()},
            "x_torchvision": by["triton"]["speedup_vs_peer"]}
    if not same:
        raise RuntimeError(f"kept indices differ from torchvision: {nums}")
    return nums


def step_notebook(out: Path) -> dict:
    import nbformat
    from nbclient import NotebookClient

    src = REPO_ROOT / "bench" / "profile_kernels.ipynb"
    nb = nbformat.read(src, as_version=4)
    os.environ.update({"EFFDET_NB_DEVICE": "cuda", "EFFDET_NB_OUT": str(out / "notebook"),
                       "EFFDET_NB_RESULTS": str(out)})
    error = None
    try:
        NotebookClient(nb, timeout=80, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO_ROOT / "bench")}}).execute()
    except Exception as err:  # keep the partly executed notebook
        error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    nbformat.write(nb, out / "profile_kernels.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    ran = sum(1 for c in code if c.get("execution_count"))
    if error:
        raise RuntimeError(f"{error} ({ran}/{len(code)} code cells ran)")
    return {"code_cells_run": ran, "code_cells": len(code),
            "figures": sorted(p.name for p in (out / "notebook").glob("*.png"))}


STEP_FUNCS = {"cuda_tests": step_cuda_tests, "kernels": step_kernels, "model": step_model,
              "nms_20k": step_nms_20k, "notebook": step_notebook}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_step_here(name: str, out: Path) -> int:
    """``--step NAME``: run one step in this process, print its key numbers as the last line."""
    try:
        nums = STEP_FUNCS[name](out)
        print("STEP-RESULT " + json.dumps({"status": "ok", "numbers": nums}, default=str))
        return 0
    except Exception as err:
        print("STEP-RESULT " + json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}"[:1000]},
                                          default=str))
        return 1


def run_step(name: str, out: Path, limit: float) -> dict:
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit)
        text = proc.stdout + proc.stderr
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("STEP-RESULT ")), None)
        res = json.loads(line[len("STEP-RESULT "):]) if line else {
            "status": "failed", "error": f"exit {proc.returncode} without a result; see {log.name}"}
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        res = {"status": "timeout", "error": f"stopped after {limit:.0f} s"}
    log.write_text(text)
    res.update(step=name, seconds=round(time.perf_counter() - t0, 1), limit_s=limit, command=STEPS[name][1])
    return res


def environment() -> dict:
    import torch

    from bench.harness import device_name, git_commit, triton_version

    return {"device": device_name(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA device",
            "date": _now(), "torch": torch.__version__, "triton": triton_version(), "git_commit": git_commit(),
            "python": sys.version.split()[0]}


def write_summary(out: Path, env: dict, results: list[dict]) -> Path:
    lines = ["# GPU check", "", f"- device: {env['device']}", f"- date (UTC): {env['date']}",
             f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}",
             f"- git commit: {env['git_commit']}", "- command: `python bench/gpu_check.py`", "",
             "| step | status | seconds (limit) | key numbers |", "|---|---|---|---|"]
    for r in results:
        nums = r.get("numbers") or r.get("error") or ""
        text = json.dumps(nums, default=str) if not isinstance(nums, str) else nums
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} ({r['limit_s']:.0f}) | "
                     f"{text.replace('|', '/')[:1500]} |")
    lines += ["", "Per-step output: `<step>.log`; bench rows: `kernels-*.jsonl`, `model-*.jsonl`; step results: "
              "`steps.jsonl`; executed notebook: `profile_kernels.ipynb`."]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan(args) -> str:
    rows = [f"GPU check plan -> {args.out} (budget {args.budget:.0f} s)"]
    for name in args.steps:
        limit, what = STEPS[name]
        rows.append(f"  {name:<11} limit {limit:>4} s  {what}")
    rows.append("  then summary.md, steps.jsonl")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.step:
        args.out.mkdir(parents=True, exist_ok=True)
        return run_step_here(args.step, args.out)
    if args.dry_run:
        print(plan(args))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here, torch.cuda.is_available() is False (-, -): run it on a GPU "
              "machine, or pass --dry-run to see the plan", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(plan(args), flush=True)
    deadline = time.monotonic() + args.budget
    results = []
    for name in args.steps:
        left = deadline - time.monotonic()
        limit = min(STEPS[name][0], left)
        if limit < 10:
            res = {"step": name, "status": "skipped", "error": "out of time budget", "seconds": 0.0,
                   "limit_s": 0.0, "command": STEPS[name][1]}
        else:
            print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", flush=True)
            res = run_step(name, args.out, limit)
        print(f"[gpu_check] {name}: {res['status']} in {res['seconds']} s", flush=True)
        results.append(res)
        with open(args.out / "steps.jsonl", "a") as f:
            f.write(json.dumps({**env, **res}, default=str) + "\n")
    path = write_summary(args.out, env, results)
    print(f"summary: {path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
