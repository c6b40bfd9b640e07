"""Whole-model benchmark: our EfficientDet against effdet's on the same machine, in the same run.

    python bench/model.py [--model efficientdet_d0] [--device cpu|cuda] [--precision fp32|fp16|bf16]
                          [--memory-format nhwc|nchw] [--peer-memory-format nhwc|nchw|same|both]
                          [--backend auto|torch|triton] [--infer-batch 1,8] [--infer-size 512]
                          [--train-batch 16,8] [--train-size 128,256] [--opt adamw,sgd] [--compile]
                          [--malloc tuned|default] [--warmup N] [--iters N] [--threads N] [--op-breakdown]
                          [--no-peer] [--no-train] [--no-infer] [--quick] [--results-dir bench/results]

Workloads, each for ours and for the peer (effdet 0.4.1, when it imports; ``--no-peer`` skips it):

* ``predict``    - model forward + batched post-processing (``detector.predict`` against
  ``effdet.DetBenchPredict``) under ``torch.inference_mode``, one row per ``--infer-batch`` entry;
* ``train_step`` - forward, target assignment, loss, backward and an optimizer step (``detector.compute_loss``
  against ``effdet.DetBenchTrain``), one row per (``--train-size``, ``--train-batch``, ``--opt``) triple; both
  sides use the same ``torch.optim`` optimizer in its fused implementation (what train.py builds).

By default ours is channels-last and so is effdet (``--peer-memory-format nhwc``): what a careful effdet user
runs. ``--peer-memory-format both`` times effdet in both layouts in the same interleaved rounds (a second
effdet model in NCHW, ``effdet-nchw``, built with the same seed), and gives our rows a ratio against each.
``--compile`` runs ours through ``torch.compile`` (inductor; for predict with ``freezing``) and reports the
compile time of each workload. ``--op-breakdown`` (CPU) then profiles three more calls of each side and splits their
wall time into convolutions (forward and backward, SiLU fused into the conv included), batch norm, SiLU and
the rest, and gives our rows the ceilings that this work puts on the speed-up (``add_op_breakdown``: both sides
call the same oneDNN convolutions). ``--malloc tuned`` (default) applies ``training.host.tune_allocator`` to
the process, so both sides run with it, as train.py and evaluate.py do.

Random normalized images and 1-5 random ground-truth boxes per image (padded with -1 labels). fp16/bf16
run under AMP autocast (CUDA fp16 training adds a GradScaler; on the CPU only bf16 autocast exists
here); ``nhwc`` puts models and images in channels-last. Timing: warm-up, then the median, 20th and
80th percentile of ``--iters`` ``time.perf_counter`` samples (``torch.cuda.synchronize`` around each on
CUDA), plus the process CPU time of each call (``time.process_time``, summed over threads; on a shared
machine it is the steadier figure, and the table shows it with its own speedup). Ours and the peer are timed
*interleaved* (one iteration of each in turn) so that load from
other processes on a shared machine hits both alike.

Prints a rich table and appends one JSON line per row to ``<results-dir>/model-<device-slug>.jsonl``.
Defaults: D0 on the CPU, inference at batch 1 and 8 at 512 px, train steps at 128 px batch 16 with AdamW and
256 px batch 8 with SGD. ``--quick`` = tiny shapes (128 px, batch 1 / 2, 1 warm-up, 2 iterations) for
the tests.
"""
from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import (REPO_ROOT, append_jsonl, autocast_context, device_name, device_slug,  # noqa: E402,F401
                           git_commit, quantile, summarize, triton_version)

OURS, PEER, PEER_NCHW = "ours", "effdet", "effdet-nchw"
QUICK = dict(infer_batch="1", infer_size=128, train_batch="2", train_size="128", opt="sgd", warmup=1, iters=2)
FULL = dict(infer_batch="1,8", infer_size=512, train_batch="16,8", train_size="128,256", opt="adamw,sgd", warmup=2,
            iters=10)


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientdet_d0")
    p.add_argument("--num-classes", type=int, default=90)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--memory-format", choices=("nchw", "nhwc"), default="nhwc",
                   help="for ours (default channels-last, as train.py's small-data recipe runs on CPUs)")
    p.add_argument("--peer-memory-format", choices=("same", "nchw", "nhwc", "both"), default="nhwc",
                   help="for effdet (default: channels-last, effdet's fastest on CPUs; same = as ours; both = "
                        "effdet channels-last and effdet NCHW, interleaved in the same rounds)")
    p.add_argument("--no-fuse", action="store_true",
                   help="predict with the unfused training model (default: BN folded, detector.fuse)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="kernel backend of our model (auto: Triton on CUDA, reference on the CPU)")
    p.add_argument("--infer-batch", default=None, help="comma-separated inference batch sizes (default 1,8)")
    p.add_argument("--infer-size", type=int, default=None, help="inference image size (default 512)")
    p.add_argument("--train-batch", default=None, help="comma-separated training batch sizes (default 16,8)")
    p.add_argument("--train-size", default=None, help="comma-separated training image sizes (default 128,256)")
    p.add_argument("--opt", default=None, help="comma-separated optimizers per train row: sgd | adamw "
                   "(default adamw,sgd)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (reports compile seconds)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: training.host.tune_allocator for the whole process (both sides)")
    p.add_argument("--op-breakdown", action="store_true",
                   help="CPU: profile 3 calls of each side; report the share of convolutions, BN, SiLU, the rest")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="skip effdet")
    p.add_argument("--no-infer", action="store_true", help="skip the predict workload")
    p.add_argument("--no-train", action="store_true", help="skip the train-step workload")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 iterations (smoke test)")
    p.add_argument("--results-dir", default=str(REPO_ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    def positive_ints(flag: str, text) -> list[int]:
        try:
            values = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:  # a 0 batch or size timed nothing and still wrote a row
            p.error(f"{flag} takes comma-separated whole numbers of 1 or more, got {text!r}")
        return values

    args.infer_batches = positive_ints("--infer-batch", args.infer_batch)
    sizes, batches = positive_ints("--train-size", args.train_size), positive_ints("--train-batch", args.train_batch)
    opts = [v.strip() for v in str(args.opt).split(",") if v.strip()]
    n = max(len(sizes), len(batches), len(opts))
    pad = lambda xs: xs + xs[-1:] * (n - len(xs))  # noqa: E731 - a shorter list repeats its last entry
    args.train_runs = [(s, b, o) for s, b, o in zip(pad(sizes), pad(batches), pad(opts))]
    for _, _, o in args.train_runs:
        if o not in ("sgd", "adamw"):
            p.error(f"--opt {o!r}: choose sgd or adamw")
    from detector.configs import config_problem

    if config_problem(args.model):
        p.error(f"--model: {config_problem(args.model)}")
    for flag, size in [("--infer-size", args.infer_size)] + [("--train-size", s) for s in sizes]:
        if config_problem(args.model, image_size=size):  # found before any timing, not deep in the model
            p.error(f"{flag} {size}: {config_problem(args.model, image_size=size)}")
    for flag, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be {low} or more, got {value}")
    if args.peer_memory_format == "same":
        args.peer_memory_format = args.memory_format
    if args.op_breakdown and args.device != "cpu":
        p.error("--op-breakdown splits CPU time: use it with --device cpu")
    return args


# --------------------------------------------------------------------------------------------------
# inputs, precision, timing
# --------------------------------------------------------------------------------------------------


def memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "nhwc" else torch.contiguous_format


def random_images(batch: int, size: int, device, fmt: torch.memory_format, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)


def random_targets(batch: int, size: int, num_classes: int, max_boxes: int = 5, seed: int = 0):
    """``(boxes (B, M, 4) xyxy px, labels (B, M))``: 1..max_boxes real boxes per image, the rest -1 padding."""
    g = torch.Generator().manual_seed(seed + 1)
    xy = torch.rand(batch, max_boxes, 2, generator=g) * 0.7 * size
    wh = (0.08 + 0.3 * torch.rand(batch, max_boxes, 2, generator=g)) * size
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    labels = torch.randint(0, num_classes, (batch, max_boxes), generator=g)
    count = torch.randint(1, max_boxes + 1, (batch, 1), generator=g)
    pad = torch.arange(max_boxes)[None] >= count
    labels[pad] = -1
    boxes[pad] = 0.0
    return boxes, labels


def effdet_target(boxes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Our xyxy boxes / 0-based labels -> effdet's ``{"bbox": yxyx, "cls": 1-based, -1 padding}``."""
    return {"bbox": boxes[..., [1, 0, 3, 2]].contiguous(),
            "cls": torch.where(labels >= 0, labels + 1, labels).float()}


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int,
                     cpu_times: Optional[dict] = None) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Warm every function up, then time them in turn, ``iters`` rounds. Returns (wall ms lists, errors).

    ``cpu_times``, when given, receives the process CPU milliseconds (``time.process_time``, all threads) of
    each timed call: unlike wall time it hardly moves when other processes load the machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, str] = {}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in fns})

    def guarded(name, fn, record):
        if name in errors:
            return
        try:
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            if record:
                times[name].append((time.perf_counter() - t0) * 1e3)
                if cpu_times is not None:
                    cpu_times[name].append((time.process_time() - c0) * 1e3)
        except Exception as err:  # one failing side is a row with an error, not a crash
            errors[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc(limit=4, file=sys.stderr)

    for name, fn in fns.items():
        for _ in range(warmup):
            guarded(name, fn, record=False)
    for _ in range(max(1, iters)):
        for name, fn in fns.items():
            guarded(name, fn, record=True)
    return times, errors


# --------------------------------------------------------------------------------------------------
# models and workloads
# --------------------------------------------------------------------------------------------------


def build_ours(args, size: int, device: torch.device):
    import detector

    torch.manual_seed(args.seed)
    model = detector.create_model(args.model, num_classes=args.num_classes, image_size=(size, size),
                                  backend=args.backend)
    return model.to(device).to(memory_format=memory_format(args.memory_format))


def effdet_available() -> Optional[str]:
    """None when effdet imports, else the reason it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import effdet  # noqa: F401
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def peer_formats(args) -> dict[str, str]:
    """The effdet sides to time: name -> memory format (``PEER`` first; ``PEER_NCHW`` too with ``both``)."""
    if args.peer_memory_format == "both":
        return {PEER: "nhwc", PEER_NCHW: "nchw"}
    return {PEER: args.peer_memory_format}


def build_peer(args, size: int, device: torch.device, fmt: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import effdet

        torch.manual_seed(args.seed)
        model = effdet.create_model(args.model, pretrained=False, pretrained_backbone=False,
                                    image_size=(size, size), num_classes=args.num_classes)
    return model.to(device).to(memory_format=memory_format(fmt))


def predict_fns(args, batch: int, size: int, device: torch.device, ours, peers: dict) -> dict:
    """``peers``: effdet side name -> its model (``peer_formats`` gives each one's memory format)."""
    import detector

    fns = {}
    amp = lambda: autocast_context(device, args.precision)  # noqa: E731
    if ours is not None:
        x = random_images(batch, size, device, memory_format(args.memory_format), args.seed)
        ours.eval()
        if not args.no_fuse:  # our inference path: BN folded into the convs (detector.fuse)
            from detector.fuse import fuse_for_inference

            ours = fuse_for_inference(ours)
        if args.compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # weights become constants: conv + BN + SiLU fusions
            ours = torch.compile(ours)

        def run_ours():
            with torch.inference_mode(), amp():
                return detector.predict(ours, x, backend=args.backend)
        fns[OURS] = run_ours
    formats = peer_formats(args)
    for name, peer in peers.items():
        import effdet

        xp = random_images(batch, size, device, memory_format(formats[name]), args.seed)
        peer_bench = effdet.DetBenchPredict(peer.eval()).eval()  # model + effdet's post-processing

        def run_peer(peer_bench=peer_bench, xp=xp):
            with torch.inference_mode(), amp():
                return peer_bench(xp)
        fns[name] = run_peer
    return fns


def _train_step(model_loss: Callable[[], torch.Tensor], opt, scaler) -> None:
    opt.zero_grad(set_to_none=True)
    loss = model_loss()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def make_optimizer(name: str, params):
    """The same optimizer for both sides, in its fastest implementation (``fused``, as train.py builds it)."""
    from training.schedule import fused_kw

    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, **fused_kw(params))
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **fused_kw(params))


def train_fns(args, batch: int, size: int, device: torch.device, ours_model, peer_models: dict,
              opt_name="sgd") -> dict:
    """``peer_models``: effdet side name -> its model (``peer_formats`` gives each one's memory format)."""
    import detector

    fns = {}
    amp = lambda: autocast_context(device, args.precision)  # noqa: E731
    use_scaler = device.type == "cuda" and args.precision == "fp16"
    boxes, labels = random_targets(batch, size, args.num_classes, seed=args.seed)
    boxes, labels = boxes.to(device), labels.to(device)
    if ours_model is not None:
        x = random_images(batch, size, device, memory_format(args.memory_format), args.seed)
        ours_model.train()
        opt = make_optimizer(opt_name, ours_model.parameters())
        net = torch.compile(ours_model) if args.compile else ours_model
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        def loss_ours():
            with amp():
                return detector.compute_loss(net, x, boxes, labels, backend=args.backend)["loss"]
        fns[OURS] = lambda: _train_step(loss_ours, opt, scaler)
    formats = peer_formats(args)
    for name, peer_model in peer_models.items():
        import effdet

        bench = effdet.DetBenchTrain(peer_model).to(device).train()
        xp = random_images(batch, size, device, memory_format(formats[name]), args.seed)
        target = {k: v.to(device) for k, v in effdet_target(boxes, labels).items()}
        opt_p = make_optimizer(opt_name, peer_model.parameters())
        scaler_p = torch.amp.GradScaler("cuda") if use_scaler else None

        def loss_peer(bench=bench, xp=xp, target=target):
            with amp():
                return bench(xp, target)["loss"]
        fns[name] = lambda loss_peer=loss_peer, opt_p=opt_p, scaler_p=scaler_p: _train_step(loss_peer, opt_p, scaler_p)
    return fns


# --------------------------------------------------------------------------------------------------
# where the time goes (--op-breakdown)
# --------------------------------------------------------------------------------------------------

OP_GROUPS = ("conv", "batch_norm", "silu", "other")
_CONV_OP = re.compile(r"conv(olution|2d|_depthwise|_transpose)")


def op_group(name: str) -> str:
    """The group of a profiler event. Only ATen and oneDNN ops count as conv / batch_norm / silu (forward and
    backward alike; a conv with SiLU fused in is conv); autograd bookkeeping and everything else is other."""
    low = name.lower()
    if not low.startswith(("aten::", "mkldnn::")):
        return "other"
    if _CONV_OP.search(low):
        return "conv"
    if "batch_norm" in low:
        return "batch_norm"
    return "silu" if "silu" in low else "other"


def shares_of_wall(events, wall_us: float) -> dict[str, float]:
    """``events`` (``key``, ``self_cpu_time_total`` in us, as ``torch.profiler``'s ``key_averages()``) -> the
    share of ``wall_us`` each group's self time takes; ``other`` is the rest of the wall time: other ops,
    Python and dispatch between ops, the profiler's own cost. Self times exclude nested ops, so nothing counts
    twice; all ops run on the calling thread (CPU autograd too), so they add up to at most the wall time."""
    totals = dict.fromkeys(OP_GROUPS, 0.0)
    for event in events:
        totals[op_group(event.key)] += event.self_cpu_time_total
    wall_us = max(wall_us, sum(totals.values()), 1e-9)
    shares = {group: totals[group] / wall_us for group in OP_GROUPS[:-1]}
    shares["other"] = 1.0 - sum(shares.values())
    return shares


def op_shares(fn: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Shares of the wall time of ``calls`` calls of ``fn`` under ``torch.profiler`` (``shares_of_wall``). The
    profiler's cost lands mostly in ``other``, so the conv / BN / SiLU shares err low and the ceilings built
    on them high."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall_us = (time.perf_counter() - t0) * 1e6
    return shares_of_wall(prof.key_averages(), wall_us)


def add_op_breakdown(rows: list[dict], fns: dict) -> None:
    """Give each timed row its ``op_share`` and ``conv_ms`` (share x median); give ours three ceilings on its
    speed-up over effdet, each the effdet ms over the time of work ours cannot drop:

    * ``ceiling_conv``: our convolutions (SiLU fused into them included) as fast as they run now;
    * ``ceiling_conv_bn_silu``: our convolutions, BN and SiLU as fast as they run now;
    * ``ceiling_effdet_conv_silu``: effdet's own convolutions and SiLU (the same math), at effdet's speed.

    Each is the speed-up ours would have if everything else it does took no time."""
    by = {r["impl"]: r for r in rows if r["median_ms"]}
    for impl, row in by.items():
        share = op_shares(fns[impl])
        row["op_share"] = share
        row["conv_ms"] = share["conv"] * row["median_ms"]
    if OURS in by and PEER in by and by[OURS]["op_share"]["conv"] > 0 and by[PEER]["op_share"]["conv"] > 0:
        ours, peer = by[OURS]["op_share"], by[PEER]["op_share"]
        ours_ms, peer_ms = by[OURS]["median_ms"], by[PEER]["median_ms"]
        by[OURS]["ceiling_conv"] = peer_ms / (ours["conv"] * ours_ms)
        by[OURS]["ceiling_conv_bn_silu"] = peer_ms / ((ours["conv"] + ours["batch_norm"] + ours["silu"]) * ours_ms)
        by[OURS]["ceiling_effdet_conv_silu"] = 1.0 / (peer["conv"] + peer["silu"])


def print_breakdown(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="where the wall time goes (op self time, torch.profiler, 3 calls)", title_justify="left")
    for col in ("workload", "impl", "batch", "size", "conv %", "BN %", "SiLU %", "other %", "conv ms",
                "ceiling x effdet: our conv", "our conv+BN+SiLU", "effdet's conv+SiLU"):
        table.add_column(col, justify="left" if col in ("workload", "impl") else "right")
    for r in rows:
        if "op_share" not in r:
            continue
        s = r["op_share"]
        table.add_row(r["workload"], r["impl"], str(r["batch"]), str(r["size"]),
                      *(f"{100 * s[g]:.0f}" for g in OP_GROUPS), _fmt(r["conv_ms"], ".1f"),
                      *(_fmt(r.get(k), ".2f") for k in ("ceiling_conv", "ceiling_conv_bn_silu",
                                                        "ceiling_effdet_conv_silu")))
    (console or Console(width=160)).print(table)


# --------------------------------------------------------------------------------------------------
# rows, table, results
# --------------------------------------------------------------------------------------------------


def make_rows(workload: str, batch: int, size: int, times: dict, errors: dict, impls: list[str],
              cpu_times: Optional[dict] = None, extra: Optional[dict] = None) -> list[dict]:
    rows = []
    for impl in impls:
        row = {"workload": workload, "impl": impl, "batch": batch, "size": size, **(extra or {}).get(impl, {}),
               "median_ms": None,
               "p20_ms": None, "p80_ms": None, "img_per_s": None, "speedup_vs_peer": None, "cpu_median_ms": None,
               "cpu_speedup_vs_peer": None, "samples": len(times.get(impl, [])), "error": errors.get(impl)}
        if times.get(impl) and impl not in errors:
            med, p20, p80 = summarize(times[impl])
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80, img_per_s=batch / (med * 1e-3))
            if cpu_times and cpu_times.get(impl):
                row["cpu_median_ms"] = statistics.median(cpu_times[impl])
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    # every row's ratio against effdet (PEER, the first layout) and, when timed, against effdet NCHW
    for peer, key in ((PEER, "speedup_vs_peer"), (PEER_NCHW, "speedup_vs_peer_nchw")):
        if peer not in by:
            continue
        for row in rows:
            if row["median_ms"] and by[peer]["median_ms"]:
                row[key] = by[peer]["median_ms"] / row["median_ms"]
            if row["cpu_median_ms"] and by[peer]["cpu_median_ms"]:
                row["cpu_" + key] = by[peer]["cpu_median_ms"] / row["cpu_median_ms"]
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def header_line(meta: dict) -> str:
    return (f"{meta['model']} on {meta['device']} | CPU threads {meta['cpu_threads']} | torch {meta['torch']} | "
            f"triton {meta['triton'] or '-'} | git {meta['git_commit'][:12]} | precision {meta['precision']} | "
            f"memory format ours {meta['memory_format']} / effdet {meta['peer_memory_format']} | "
            f"backend {meta['backend']} | ours predict: {'BN folded' if meta.get('ours_bn_folded') else 'unfused'}"
            f"{' | ours torch.compile' if meta.get('compile') else ''} | "
            f"malloc {'tuned' if meta.get('malloc_tuned') else 'default'}")


def print_table(rows: list[dict], meta: dict, console=None) -> None:
    title = header_line(meta)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a requirement
        print(title)
        for r in rows:
            print(r)
        return
    console = console or Console(width=180)
    table = Table(title=title, title_justify="left")
    nchw = any(r.get("speedup_vs_peer_nchw") is not None for r in rows)  # --peer-memory-format both
    ratios = ["x effdet", "x effdet (CPU)"] + (["x effdet-nchw", "x effdet-nchw (CPU)"] if nchw else [])
    for col in ("workload", "impl", "batch", "size", "opt", "median ms", "p20 ms", "p80 ms", "img/s", "CPU ms",
                *ratios, "compile s", "error"):
        table.add_column(col, justify="left" if col in ("workload", "impl", "error") else "right",
                         overflow="fold")
    for r in rows:
        cells = [_fmt(r.get(k), ".2f") for k in ("speedup_vs_peer", "cpu_speedup_vs_peer")
                 + (("speedup_vs_peer_nchw", "cpu_speedup_vs_peer_nchw") if nchw else ())]
        table.add_row(r["workload"], r["impl"], str(r["batch"]), str(r["size"]), r.get("opt") or "-",
                      _fmt(r["median_ms"], ".1f"), _fmt(r["p20_ms"], ".1f"), _fmt(r["p80_ms"], ".1f"),
                      _fmt(r["img_per_s"], ".2f"), _fmt(r["cpu_median_ms"], ".0f"), *cells,
                      _fmt(r.get("compile_s"), ".0f"), r["error"] or "")
    console.print(table)


def write_results(rows: list[dict], meta: dict, results_dir) -> Path:
    return append_jsonl(rows, meta, results_dir, f"model-{meta['device_slug']}")


def compile_seconds(fns: dict, args) -> Optional[float]:
    """With ``--compile``: the first call of ours (where torch.compile compiles), in seconds."""
    if not args.compile or OURS not in fns:
        return None
    t0 = time.perf_counter()
    fns[OURS]()
    return time.perf_counter() - t0


def measure(workload: str, batch: int, size: int, fns: dict, impls: list[str], extra: dict, args,
            device: torch.device) -> list[dict]:
    """Time ``fns`` interleaved and make their rows (with ``--op-breakdown``, their op shares and ceilings)."""
    cpu: dict = {}
    times, errors = time_interleaved(fns, device, args.warmup, args.iters, cpu)
    rows = make_rows(workload, batch, size, times, errors, impls, cpu, extra)
    if args.op_breakdown:
        add_op_breakdown(rows, fns)
    return rows


def run(args) -> list[dict]:
    from training.schedule import fused_kw  # what make_optimizer applies to both sides' float parameters

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here (-, --device): pass --device cpu")
    if device.type == "cpu" and args.precision == "fp16":
        raise SystemExit("--precision fp16 needs CUDA; on the CPU use bf16 (autocast) or fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = False
    if args.malloc == "tuned" and device.type == "cpu":
        from training.host import tune_allocator

        malloc_tuned = tune_allocator()
    peer_reason = "--no-peer" if args.no_peer else effdet_available()
    with_peer = peer_reason is None
    if not with_peer:
        print(f"[bench/model] effdet not measured: {peer_reason}", file=sys.stderr)
    formats = peer_formats(args) if with_peer else {}
    impls = [OURS, *formats]

    meta = {"bench": "model", "model": args.model, "num_classes": args.num_classes, "device": device_name(device),
            "device_type": device.type, "device_slug": device_slug(device), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version(), "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "precision": args.precision, "memory_format": args.memory_format,
            "peer_memory_format": args.peer_memory_format if with_peer else None, "backend": args.backend,
            "ours_bn_folded": not args.no_fuse,
            "peer": "effdet" if with_peer else None, "warmup": args.warmup, "iters": args.iters,
            "quick": bool(args.quick), "peer_skipped_reason": None if with_peer else peer_reason,
            "compile": bool(args.compile), "malloc_tuned": malloc_tuned,
            "optimizer_impl": "fused" if fused_kw([torch.empty(1, device=device)]) else "default"}
    rows: list[dict] = []
    models: dict[int, tuple] = {}

    def models_for(size):
        if size not in models:
            models[size] = (build_ours(args, size, device),
                            {name: build_peer(args, size, device, fmt) for name, fmt in formats.items()})
        return models[size]

    if not args.no_infer:
        for batch in args.infer_batches:
            ours, peers = models_for(args.infer_size)
            fns = predict_fns(args, batch, args.infer_size, device, ours, peers)
            extra = {OURS: {"compile_s": compile_seconds(fns, args)}}
            rows += measure("predict", batch, args.infer_size, fns, impls, extra, args, device)
    if not args.no_train:
        for size, batch, opt_name in args.train_runs:
            ours, peers = models_for(size)
            fns = train_fns(args, batch, size, device, ours, peers, opt_name)
            extra = {impl: {"opt": opt_name} for impl in impls}
            extra[OURS]["compile_s"] = compile_seconds(fns, args)
            rows += measure("train_step", batch, size, fns, impls, extra, args, device)

    print_table(rows, meta)
    if args.op_breakdown:
        print_breakdown(rows)
    path = write_results(rows, meta, args.results_dir)
    print(f"results appended to {path}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    return 1 if any(r["impl"] == OURS and r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
