"""Issue 10's run settings: the recipe fitted to the data's statistics, --time-budget, workers per core."""
import json
import os
import sys

import pytest

import train
from datasets.synthetic import generate_synthetic
from training import budget, host
from training.config import DEMO_TIME_BUDGET, TrainConfig, train_parser
from training.recipe import DataStats, fit_small_recipe, input_size_for

TINY = dict(seed=3, num_train=6, num_val=2, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


def coco(n_images, side, box_sides, per_image=1, classes=3):
    images = [{"id": i, "width": side, "height": side, "file_name": f"{i}.png"} for i in range(n_images)]
    anns = [{"id": k, "image_id": k % n_images, "category_id": 1, "bbox": [0, 0, s, s], "iscrowd": 0}
            for k, s in enumerate(box_sides * per_image)]
    return {"images": images, "annotations": anns, "categories": [{"id": c + 1, "name": str(c)} for c in range(classes)]}


def test_stats_read_counts_and_relative_sizes():
    st = DataStats.of(coco(4, 200, [20, 40, 60, 80], per_image=2, classes=5))
    assert (st.images, st.classes, st.objects, st.objects_per_image, st.image_side) == (4, 5, 8, 2.0, 200.0)
    assert st.object_rel_size == pytest.approx(0.25)  # median of 0.1, 0.2, 0.3, 0.4 (each twice)


@pytest.mark.parametrize("side, obj, size", [
    (256, 76, 128),  # the built-in set: objects 24-128 px in 256 px images
    (320, 26, 256),  # small glyphs: 128 px would make them 10 px
    (640, 20, 512),  # tiny objects: the largest size, the images are big enough
    (200, 10, 256),  # tiny objects in small images: never above the images' own size (rounded up to 128)
])
def test_input_size_follows_object_size(side, obj, size):
    assert input_size_for(DataStats.of(coco(10, side, [obj]))) == size


def test_fitted_recipe_scales_batch_lr_and_epochs():
    shapes = fit_small_recipe(DataStats.of(coco(600, 256, [76])))
    assert shapes == dict(input_size=(128, 128), batch_size=16, lr=2e-3, epochs=30)  # the built-in set's values
    small_objects = fit_small_recipe(DataStats.of(coco(4000, 320, [26])))
    assert small_objects["batch_size"] == 8 and small_objects["lr"] == pytest.approx(2e-3 * 0.5 ** 0.5, rel=1e-3)
    assert small_objects["epochs"] == 10  # 18,000 image views, at least 10 epochs
    assert fit_small_recipe(DataStats.of(coco(20, 256, [76])))["epochs"] == 300  # at most 300


def config(*argv, stats=None, builtin=False, num_train=10):
    return TrainConfig.from_args(train_parser().parse_args(list(argv)), num_train=num_train, cuda=False,
                                 stats=stats, builtin_data=builtin)


def test_config_uses_fitted_values_but_flags_win():
    st = DataStats.of(coco(800, 320, [26]))
    cfg = config(stats=st, num_train=800)
    assert cfg.input_size == (256, 256) and cfg.batch_size == 8 and "input 256 px" in cfg.recipe
    given = config("--input_size", "384", "-b", "2", stats=st, num_train=800)
    assert given.input_size == (384, 384) and given.batch_size == 2
    assert config(stats=st, num_train=10_000).input_size is None  # NVIDIA's recipe: the model's own size
    # a batch you give gets the recipe's learning rate for that batch, unless you give --lr too
    assert given.lr == pytest.approx(2e-3 * (2 / 16) ** 0.5, rel=1e-3) and "-b 2: the recipe's learning rate" in \
        " ".join(given.notes)
    assert config("-b", "2", "--lr", "5e-3", stats=st, num_train=800).lr == 5e-3
    assert config("-b", "2", stats=st, num_train=10_000).lr == 0.01  # NVIDIA's recipe: its own lr


def test_time_budget_defaults_to_the_demo_only():
    assert config(builtin=True).time_budget == DEMO_TIME_BUDGET
    assert config("--epochs", "3", builtin=True).time_budget is None  # N epochs asked for: N epochs
    assert config().time_budget is None  # your own data: no budget unless asked for
    assert config("--time-budget", "2").time_budget == 2.0
    assert config("--time-budget", "0", builtin=True).time_budget is None
    with pytest.raises(ValueError, match="--time-budget"):
        config("--time-budget", "-1")
    assert config(builtin=True).eval_interval == 0  # a budgeted run evaluates once, at the end
    assert config("--time-budget", "2", "--eval-interval", "1").eval_interval == 1


def test_evaluate_refuses_compile_with_torchscript():
    import evaluate

    with pytest.raises(ValueError, match="--compile and --torchscript"):
        evaluate.main(["--compile", "--torchscript", "--debug"])


def test_workers_fit_the_cores():
    assert [host.default_workers(c, cuda=True) for c in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert [host.default_workers(c) for c in (1, 2, 3, 8, 64)] == [0, 0, 2, 4, 4]  # CPU step: 2 cores load inline
    assert config().workers == host.default_workers() and config("-j", "3").workers == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_allocator_setting_takes_effect():
    assert host.tune_allocator() is True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_fraction_follows_the_clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    tb = budget.TimeBudget(1.0, t0=100.0)  # 60 s in all
    clock.now = 110.0  # 10 s of set-up
    tb.start()
    assert tb.fraction() == 0.0
    clock.now = 130.0  # window = 60 - 10 - 10 (reserve) = 40 s; 20 s used
    assert tb.fraction() == pytest.approx(0.5)
    tb.evaluated(5.0)  # reserve = 10 + 6 = 16 s -> window 34 s
    assert tb.fraction() == pytest.approx(20 / 34)
    clock.now = 150.0
    assert tb.fraction() >= 1.0  # 40 of 34 s: training must stop


def test_resumed_budget_counts_the_earlier_training_time(monkeypatch):
    """A resumed run trains what its budget has left after the earlier runs' training seconds, not a whole new
    window (it did: the fraction was rescaled to reach 1 only at the window's end, whatever the offset)."""
    clock = Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    tb = budget.TimeBudget(1.0, t0=100.0, spent=25.0)
    tb.start()  # no set-up: window = 60 - 10 (reserve) = 50 s, of which 25 s were trained before
    assert tb.fraction() == pytest.approx(0.5) and tb.train_seconds() == 25.0
    clock.now = 120.0
    assert tb.fraction() == pytest.approx(0.9)
    clock.now = 125.0
    assert tb.fraction() >= 1.0  # 25 s left, 25 s trained: stop (the whole 50 s window before)
    longer = budget.TimeBudget(2.0, t0=125.0, spent=45.0)  # the same run resumed with a 2-minute budget
    longer.start()
    assert longer.fraction() == pytest.approx(45 / 110)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def train_tiny(tiny, out, *flags) -> list[dict]:
    """train.py on the tiny set (batch 2, 128 px, CPU) with ``flags``; the run's log events."""
    argv = ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
            "--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"], "--output", str(out),
            "--input_size", "128", "-b", "2", "--workers", "0", "--device", "cpu", "--kernel-backend", "torch",
            *flags]
    assert train.main(argv) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # strict: no line skipped


def test_train_stops_in_time_and_evaluates(tiny, tmp_path):
    out = tmp_path / "out"
    log = train_tiny(tiny, out, "--pictures", "1", "--epochs", "100000", "--eval-interval", "100000",
                     "--time-budget", "0.4")
    evals, end = [e for e in log if e["event"] == "eval"], log[-1]
    summary = [{k: e.get(k) for k in ("event", "epoch", "step", "minutes")} for e in log if e["event"] != "train"]
    assert end["event"] == "end" and end["time_budget"] == 0.4, summary
    assert len(evals) == 1 and evals[0]["epoch"] < 100000 - 1, summary  # stopped by the clock, evaluated once
    assert end["minutes"] < 0.4 + 2.0, summary  # generous: a loaded CI machine; the demo run's time is measured
    assert os.listdir(out / "pictures")  # pictures come from the final evaluation


@pytest.mark.parametrize("where", ["end_of_epoch", "while_saving"])
def test_budget_spent_between_epochs_still_ends_with_the_final_evaluation(tiny, tmp_path, monkeypatch, where):
    """The budget can run out after an epoch's last step was checked: at the epoch's end (before its evaluation
    is decided) or while its checkpoint is written. Either way the run evaluates once, at the end."""
    from training import loop

    hook = "distribute_bn" if where == "end_of_epoch" else "save_state"
    original = getattr(loop, hook)

    def spend_budget_after_first_epoch(run, *a, **kw):
        result = original(run, *a, **kw)
        if run.step == 3 and run.budget is not None:  # 6 images, batch 2: the end of epoch 0
            run.budget.seconds = 0.0
        return result

    monkeypatch.setattr(loop, hook, spend_budget_after_first_epoch)
    log = train_tiny(tiny, tmp_path / "out", "--pictures", "0", "--epochs", "50", "--eval-interval", "0",
                     "--time-budget", "30")
    evals = [e for e in log if e["event"] == "eval"]
    assert len(evals) == 1, [e["event"] for e in log]
    # at the epoch's end the epoch-end check notices it, while saving the check before the next step does:
    # either way no step starts after the budget is spent
    assert evals[0]["step"] == 3


def test_freeze_bn_after_is_the_small_recipes_and_checked():
    assert config().freeze_bn_after == 0.2  # from scratch on < 5,000 images: the small-data recipe
    assert config(num_train=10_000).freeze_bn_after is None  # NVIDIA's recipe never freezes
    assert config("--freeze-bn-after", "1").freeze_bn_after == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match="--freeze-bn-after"):
            config("--freeze-bn-after", bad)


def test_a_budgeted_run_does_not_freeze_bn_in_its_first_steps():
    """Under --time-budget the fraction is estimated from the speed so far: a slow start put 20% of it at
    step 4, and that run ended at AP50 0.01. The freeze waits for BN_FREEZE_MIN_STEPS."""
    from types import SimpleNamespace

    from training.loop import BN_FREEZE_MIN_STEPS, freeze_bn_if_due

    def run_at(step):
        return SimpleNamespace(cfg=SimpleNamespace(freeze_bn_after=0.2, freezes_bn=True, benchmark=False),
                               budget=object(), budget_fraction=0.5, step=step, steps_this_run=step,
                               bn_frozen=False, bn_frozen_saved=None, ema=None, info=SimpleNamespace(is_main=False),
                               bn_layers=[])

    for step, frozen in ((4, False), (BN_FREEZE_MIN_STEPS - 1, False), (BN_FREEZE_MIN_STEPS, True)):
        run = run_at(step)
        freeze_bn_if_due(run)
        assert run.bn_frozen == frozen, step


def test_bn_statistics_stop_moving_once_frozen(tiny, tmp_path):
    import torch

    out = tmp_path / "out"
    # 6 images, batch 2: 3 steps per epoch, 9 in all; at 0.4 the freeze comes before step 5, inside epoch 1,
    # and epoch 2 starts with net.train(), which the freeze must undo again
    log = train_tiny(tiny, out, "--epochs", "3", "--freeze-bn-after", "0.4", "--save-checkpoint-interval", "1",
                     "--eval-interval", "0", "--pictures", "0", "--model-ema")
    frozen = [(e["step"], e["resumed"], e["ema_restarted"]) for e in log if e["event"] == "bn_frozen"]
    assert frozen == [(4, False, True)]
    states = [torch.load(out / f, weights_only=False)
              for f in ("checkpoint_000.pth", "checkpoint_001.pth", "last.pth")]
    # the EMA restarted before step 5: it has averaged steps 5-6 by the end of epoch 1 and 5-9 by the end
    assert [s["ema"]["updates"] for s in states] == [3, 2, 5]
    before, frozen, last = (s["model"] for s in states)
    stats = [k for k in last if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in last if k.endswith("conv_pw.weight")]
    assert stats and weights
    assert not all(torch.equal(before[k], frozen[k]) for k in stats)  # step 4 still trained BN in train mode
    assert all(torch.equal(frozen[k], last[k]) for k in stats)  # epoch 2 left them as they were after step 4
    assert not all(torch.equal(frozen[k], last[k]) for k in weights)  # while the weights kept training


def test_benchmark_measures_the_frozen_step_too_where_the_recipe_freezes(tmp_path, capsys):
    """--benchmark: the first --benchmark-steps with batch-statistics BN (the start of a run, NVIDIA's figure),
    then as many with BN frozen, the step most of a small-recipe run takes; one figure where nothing freezes."""
    tiny = generate_synthetic(tmp_path / "data", **{**TINY, "num_train": 12})  # batch 2: 6 steps in the epoch
    flags = ("--benchmark", "--benchmark-steps", "3", "--pictures", "0")
    log = train_tiny(tiny, tmp_path / "a", *flags, "--freeze-bn-after", "0.2")
    assert [(e["step"], e["fraction"]) for e in log if e["event"] == "bn_frozen"] == [(3, None)]
    (bench,) = [e for e in log if e["event"] == "benchmark"]
    assert bench["train_img_per_s"] > 0 and bench["train_img_per_s_bn_frozen"] > 0
    assert bench["measured_steps"] == bench["measured_steps_bn_frozen"] == 2  # 3 steps each, 1 of them warm-up
    log = train_tiny(tiny, tmp_path / "b", *flags, "--freeze-bn-after", "1")
    (bench,) = [e for e in log if e["event"] == "benchmark"]
    assert not any(e["event"] == "bn_frozen" for e in log) and "train_img_per_s_bn_frozen" not in bench

    # resumed from a run already past its freeze: NVIDIA's figure is still taken with batch statistics
    train_tiny(tiny, tmp_path / "c", "--epochs", "3", "--freeze-bn-after", "0.2", "--stop-after", "1",
               "--eval-interval", "0", "--pictures", "0")  # frozen before step 5 of 18, saved after step 6
    log = train_tiny(tiny, tmp_path / "c", *flags, "--epochs", "3", "--freeze-bn-after", "0.2", "--resume")
    resumed = log[max(i for i, e in enumerate(log) if e["event"] == "start"):]
    assert [e["step"] for e in resumed if e["event"] == "bn_frozen"] == [9]  # unfrozen for steps 7-9

    # too few steps: a one-line error, up front for the flag, at the end where --max-steps cut it short
    with pytest.raises(ValueError, match="--benchmark-steps must be >= 3, got 0"):
        config("--benchmark", "--benchmark-steps", "0")
    argv = ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"], "--output",
            str(tmp_path / "d"), "--input_size", "128", "-b", "2", "--workers", "0", "--device", "cpu", *flags,
            "--max-steps", "2"]
    capsys.readouterr()
    assert train.main(argv) == 2 and "--benchmark needs at least 3 steps, got 2" in capsys.readouterr().err


def test_resume_past_the_freeze_is_bit_identical_and_keeps_the_restarted_ema(tiny, tmp_path):
    """A checkpoint records that BN is frozen: the resumed run neither freezes again nor restarts the EMA."""
    import torch

    flags = ("--epochs", "2", "--freeze-bn-after", "0.3", "--model-ema", "--eval-interval", "0", "--pictures", "0")
    a, b = tmp_path / "a", tmp_path / "b"
    train_tiny(tiny, a, *flags)
    train_tiny(tiny, b, *flags, "--stop-after", "1")  # 3 steps per epoch: frozen after step 2, in epoch 0
    log = train_tiny(tiny, b, *flags, "--resume")
    assert [(e["step"], e["ema_restarted"]) for e in log if e["event"] == "bn_frozen"] == [(2, True)]
    sa, sb = (torch.load(d / "last.pth", weights_only=False) for d in (a, b))
    assert sa["step"] == sb["step"] == 6 and sa["bn_frozen"] and sb["bn_frozen"]
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 4  # steps 3-6
    for part in ("model", "ema"):
        ta, tb = (sa[part], sb[part]) if part == "model" else (sa[part]["module"], sb[part]["module"])
        assert all(torch.equal(v, tb[k]) for k, v in ta.items()), part


def test_run_fraction_follows_the_budget_when_there_is_one():
    from types import SimpleNamespace

    from training.loop import run_fraction

    run = SimpleNamespace(budget=None, step=30, steps_per_epoch=10, cfg=config("--epochs", "6"),
                          info=SimpleNamespace(distributed=False))
    assert run_fraction(run) == 0.5  # 30 of 6 x 10 scheduled steps
    run.budget = SimpleNamespace(fraction=lambda: 0.85)
    assert run_fraction(run) == 0.85


def test_budgeted_freeze_reuses_the_stop_checks_fraction(monkeypatch):
    """A distributed budgeted step agrees on the budget's fraction once (one all-reduce), for the stop check
    and the BN freeze alike."""
    from types import SimpleNamespace

    import torch

    import training.loop as loop

    reduces = []
    monkeypatch.setattr(loop.dist, "all_reduce_max", lambda t: reduces.append(t) or t)
    bn = torch.nn.BatchNorm2d(3).train()
    run = SimpleNamespace(budget=SimpleNamespace(fraction=lambda: 0.85), step=loop.BN_FREEZE_MIN_STEPS,
                          steps_this_run=7,
                          cfg=config("--freeze-bn-after", "0.8"), bn_frozen=False, bn_layers=[bn],
                          budget_fraction=0.0, ema=None, bn_frozen_saved=None,
                          info=SimpleNamespace(distributed=True, device=torch.device("cpu"), is_main=False))
    assert not loop.budget_spent(run)  # the stop check before step 8
    loop.freeze_bn_if_due(run)
    assert run.bn_frozen and not bn.training and len(reduces) == 1


def test_fresh_run_keeps_the_earlier_log_and_resumed_ema_starts_from_the_resumed_weights(tiny, tmp_path):
    """A fresh run into a used --output writes its own log.jsonl (the earlier one kept as log.jsonl.1; appending
    drew both runs as one curve), a resumed run appends; EMA turned on at a resume starts from the resumed
    weights (it kept the initial ones it was built from)."""
    import torch

    out = tmp_path / "out"
    flags = ("--epochs", "2", "--eval-interval", "0", "--pictures", "0")
    train_tiny(tiny, out, *flags, "--stop-after", "1", "--no-model-ema")
    first = (out / "log.jsonl").read_text()
    log = train_tiny(tiny, out, *flags, "--resume", "--model-ema", "--max-steps", "1")
    assert (out / "log.jsonl").read_text().startswith(first) and not (out / "log.jsonl.1").exists()
    state = torch.load(out / "last.pth", weights_only=False)
    ema, model = state["ema"]["module"], state["model"]
    assert state["ema"]["updates"] == 1
    far = max((ema[k].float() - v.float()).abs().max().item() for k, v in model.items() if v.is_floating_point())
    assert far < 0.05, far  # one warm-up update after a restart from the resumed weights: close to them
    train_tiny(tiny, out, "--epochs", "1", "--eval-interval", "0", "--pictures", "0")
    assert (out / "log.jsonl.1").read_text().startswith(first)
    events = [json.loads(x)["event"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("start") == 1


def test_batch_of_one_at_128_px_is_one_line(tiny, tmp_path, capsys):
    """BN in training needs two values per channel: batch 1 at 128 px has a 1x1 P7 map (it was a traceback)."""
    argv = ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
            "--output", str(tmp_path), "--input_size", "128", "-b", "1", "--workers", "0", "--device", "cpu"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one value per channel" in err and "--batch-size" in err, err


def test_resume_says_the_optimizer_keeps_its_learning_rate(tiny, tmp_path, capsys):
    """--lr / --weight-decay given at a resume do not reach the resumed optimizer (its state holds them): said."""
    out = tmp_path / "out"
    flags = ("--epochs", "2", "--eval-interval", "0", "--pictures", "0", "--lr", "0.001")
    train_tiny(tiny, out, *flags, "--stop-after", "1")
    capsys.readouterr()
    train_tiny(tiny, out, *flags[:-1], "0.01", "--resume")
    said = " ".join(capsys.readouterr().out.split())
    assert "keeps the run's --lr 0.001" in said, said


def test_max_steps_on_the_last_scheduled_step_ends_the_run_as_scheduled(tiny, tmp_path):
    """--max-steps reached on the run's last step: evaluated and ended, not saved as an interrupted run."""
    log = train_tiny(tiny, tmp_path / "out", "--epochs", "1", "--max-steps", "3", "--pictures", "0")  # 3 steps/epoch
    events = [e["event"] for e in log]
    assert "eval" in events and events[-1] == "end" and "interrupted" not in events, events
    assert (tmp_path / "out" / "best.pth").exists()
