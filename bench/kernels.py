"""Benchmark the Triton kernels against their references and peers.

    python bench/kernels.py [--quick] [--ops focal_loss,nms,...] [--device cuda|cpu] [--results-dir DIR]
    python bench/kernels.py --static [--sizes 128,128x256] [--batch 2] [--arch 90,80] [--workers 2]

Every module in ``bench/cases/`` that defines ``cases(quick: bool, device) -> list[Case]`` contributes
(missing or broken modules are skipped with a message). Full mode uses the real shapes (D0 training:
batch 32 at 512 px = 49,104 anchors x 90 classes; inference: batch 8 at 512 px, k = 5000; D4: 1024 px
= 196,416 anchors) and needs a GPU; ``--quick`` uses tiny shapes that run anywhere. Without CUDA the
Triton providers run in the Triton interpreter (set up here before triton is imported): those rows
show that the kernel code runs, not a speed (its values are checked by ``pytest tests/kernels``), and the
table and JSON say so.

``--static`` needs no GPU: it records every kernel variant one D0 training step + inference pass launch
(Triton path, interpreter on the CPU), compiles each for sm_90 and sm_80 and prints registers, spill bytes,
shared memory, SASS instructions (per element), bytes per element and compile seconds
(``bench/static.py`` defines each figure), appending ``static-sm<arch>.jsonl`` to the results folder.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU-friendly smoke run)")
    p.add_argument("--ops", default="", help="comma-separated case modules to run (default: all)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--results-dir", default=None, help="where kernels-<device>.jsonl is appended "
                   "(default: bench/results)")
    p.add_argument("--reps", type=int, default=None, help="CPU timing repetitions")
    s = p.add_argument_group("--static: compiled-code evidence, no GPU needed")
    s.add_argument("--static", action="store_true", help="capture the D0 kernel variants and compile them")
    s.add_argument("--sizes", default="128,128x256", help="image sizes (H or HxW, multiples of 128) of the D0 "
                   "workload (default 128,128x256)")
    s.add_argument("--batch", type=int, default=2, help="batch of the D0 workload (default 2)")
    s.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    s.add_argument("--workers", type=int, default=2, help="compile worker processes (default 2)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds per compile before it counts as failed")
    s.add_argument("--no-cache", action="store_true", help="compile again even when a cached result exists")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(y) for y in x.split("x")) if "x" in x else int(x)
                      for x in args.sizes.replace(" ", "").split(",") if x]
        args.arch = [int(x) for x in args.arch.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes takes comma-separated H or HxW sizes, --arch comma-separated integers")
    if args.static:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from detector.configs import config_problem

        for size in args.sizes:  # found before capturing, not deep in the model's construction
            if config_problem("efficientdet_d0", image_size=size):
                p.error(f"--sizes {size if isinstance(size, int) else 'x'.join(map(str, size))}: "
                        f"{config_problem('efficientdet_d0', image_size=size)}")
        for flag, value in (("--batch", args.batch), ("--workers", args.workers), ("--timeout", args.timeout)):
            if value <= 0:
                p.error(f"{flag} must be more than 0, got {value:g}")
        if not args.sizes or not args.arch:
            p.error("--sizes and --arch need at least one value each")
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be 1 or more, got {args.reps}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if args.static:
        from bench.static import run_static

        out = run_static(args.sizes, args.batch, args.arch, args.workers, args.timeout, args.results_dir,
                         use_cache=not args.no_cache)
        return 0 if not out["problems"] and len(out["variants"]) <= 24 else 1
    import torch  # importing torch does not import triton

    has_cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        print("error: CUDA is not available here (-, --device): pass --device cpu --quick for the CPU smoke run",
              file=sys.stderr)
        return 2
    if device == "cpu" and not has_cuda:
        if not args.quick:  # the real shapes in the interpreter run for hours and measure nothing
            print("error: no CUDA device here, and the full shapes need one (-, --quick): pass --quick for the "
                  "CPU smoke run (Triton interpreter), or --static for compiled-code figures", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

    from bench import cases as cases_pkg
    from bench.harness import run_cases

    available = sorted(m.name for m in pkgutil.iter_modules(cases_pkg.__path__) if not m.name.startswith("_"))
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()] or available
    all_cases = []
    for name in wanted:
        if name not in available:
            print(f"[bench] no case module bench/cases/{name}.py; skipped", file=sys.stderr)
            continue
        try:
            mod = importlib.import_module(f"bench.cases.{name}")
            made = mod.cases(args.quick, torch.device(device))
        except Exception as err:
            print(f"[bench] bench/cases/{name}.py failed to build its cases ({type(err).__name__}: {err}); "
                  "skipped", file=sys.stderr)
            continue
        all_cases.extend(made)
    if not all_cases:
        print("[bench] nothing to run", file=sys.stderr)
        return 1
    run_cases(all_cases, device, results_dir=args.results_dir, reps=args.reps, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
