"""train.py and evaluate.py end to end on a tiny generated set (CPU, short)."""
import json
import os

import pytest
import torch

import evaluate
import train
from datasets.synthetic import generate_synthetic

TINY = dict(seed=5, num_train=8, num_val=4, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def base_args(tiny, out, *extra):
    return ["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
            "--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
            "--output", str(out), "--input_size", "128", "-b", "2", "--workers", "0", "--log-interval", "1",
            "--device", "cpu", "--pictures", "0", "--kernel-backend", "torch", *extra]


def events(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def test_train_then_evaluate(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--epochs", "1", "--pictures", "2")) == 0
    tr = events(out, "train")
    assert len(tr) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in tr)
    assert {"step", "epoch", "loss", "cls_loss", "box_loss", "lr", "img_per_s", "data_time"} <= set(tr[0])
    ev = events(out, "eval")
    assert len(ev) == 1 and 0.0 <= ev[0]["AP"] <= 1.0 and "per_class" in ev[0]
    assert set(events(out, "start")[0]["data_fixes"]) == {"train", "val"}  # clipped / dropped boxes, counted
    for f in ("last.pth", "best.pth", "curves.png", "log.jsonl"):
        assert (out / f).stat().st_size > 0, f
    assert len(list((out / "pictures").glob("*.png"))) == 2
    # evaluate.py on the checkpoint: detections file, table, json line, pictures
    assert evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
                          "--checkpoint", str(out / "last.pth"), "--use-ema", "--output", str(out),
                          "--workers", "0", "--device", "cpu", "--visualize", "1"]) == 0
    dets = json.load(open(out / "detections.json"))
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    line = [json.loads(l) for l in open(out / "eval.jsonl")][-1]
    assert "AP" in line and line["img_per_s"] > 0
    assert (line["epoch"], line["step"]) == (0, tr[-1]["step"])  # what the checkpoint was trained for
    # --detections scores that file without a model, with the same numbers
    assert evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--detections", str(out / "detections.json"),
                          "--output", str(out)]) == 0
    again = [json.loads(l) for l in open(out / "eval.jsonl")][-1]
    assert again["AP"] == line["AP"] and again["AP50"] == line["AP50"]
    assert "step" not in again and "epoch" not in again  # no model, so no training step to name
    # no data flag: the val set the checkpoint's run used (it records its flags), not the built-in set
    assert evaluate.main(["--output", str(out), "--use-ema", "--workers", "0", "--device", "cpu"]) == 0
    recorded = [json.loads(l) for l in open(out / "eval.jsonl")][-1]
    assert recorded["annotations"] == tiny["val"]["ann_file"] and recorded["use_ema"]
    assert recorded["images"] == TINY["num_val"] and recorded["AP"] == line["AP"]
    state = torch.load(out / "best.pth", weights_only=True)  # a file of an older version: fewer recorded flags
    state["args"] = {k: v for k, v in state["args"].items() if not k.startswith("waymo")}
    torch.save(state, out / "best.pth")
    assert evaluate.main(["--output", str(out), "--use-ema", "--workers", "0", "--device", "cpu"]) == 0
    assert [json.loads(l) for l in open(out / "eval.jsonl")][-1]["annotations"] == tiny["val"]["ann_file"]


def test_evaluate_stats_equal_pycocotools(tiny, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = json.load(open(tiny["val"]["ann_file"]))
    g = torch.Generator().manual_seed(0)
    dets = []
    for a in gt["annotations"]:  # jittered true boxes plus some junk
        x, y, w, h = a["bbox"]
        j = (torch.rand(4, generator=g) - 0.5) * 6
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + j[0].item(), y + j[1].item(), w + j[2].item(), h + j[3].item()],
                     "score": float(torch.rand(1, generator=g))})
        dets.append({"image_id": a["image_id"], "category_id": gt["categories"][0]["id"],
                     "bbox": [1.0, 2.0, 10.0, 12.0], "score": 0.3})
    path = tmp_path / "dets.json"
    json.dump(dets, open(path, "w"))
    assert evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--detections", str(path),
                          "--output", str(tmp_path)]) == 0
    ours = [json.loads(l) for l in open(tmp_path / "eval.jsonl")][-1]
    coco = COCO(tiny["val"]["ann_file"])
    e = COCOeval(coco, coco.loadRes(str(path)), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [round(ours[n], 10) for n in names] == [round(float(v), 10) for v in e.stats]


RESUME_RUN = ["--epochs", "2", "--drop-path", "0.1", "--model-ema", "--eval-interval", "9"]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The output folder of one uninterrupted RESUME_RUN: the reference both resume tests compare with."""
    a = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(base_args(tiny, a, *RESUME_RUN)) == 0
    return a


def test_resume_is_bit_identical(tiny, tmp_path, uninterrupted):
    common = RESUME_RUN
    a, b = uninterrupted, tmp_path / "b"
    train.main(base_args(tiny, b, *common, "--stop-after", "1"))
    first = torch.load(b / "last.pth", weights_only=True)
    assert first["epoch"] == 0
    train.main(base_args(tiny, b, *common, "--resume"))
    sa = torch.load(a / "last.pth", weights_only=True)
    sb = torch.load(b / "last.pth", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 1 and sa["step"] == sb["step"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ema"]["module"].items():
        assert torch.equal(v, sb["ema"]["module"][k]), k
    resumed = events(b, "resumed")  # the log says where the run continued
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1 and resumed[0]["step"] == first["step"]


def test_nproc2_gives_the_loss_of_one_process(tiny, tmp_path):
    """Also with --freeze-bn-after: both runs freeze BN before step 2 of 2, the workers alike."""
    common = ["--epochs", "1", "--drop-path", "0", "--eval-interval", "9", "--sync-bn", "--model-ema",
              "--opt", "momentum", "--lr", "0.01",  # SGD: Adam would magnify rounding-level gradient noise
              "--freeze-bn-after", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(base_args(tiny, one, *common, "-b", "4"))
    train.main(base_args(tiny, two, *common, "-b", "2", "--nproc", "2"))
    for key in ("loss", "cls_loss", "box_loss"):
        l1 = [e[key] for e in events(one, "train")]
        l2 = [e[key] for e in events(two, "train")]
        assert len(l1) == len(l2) == 2
        assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5), key
    assert [e["step"] for e in events(one, "bn_frozen")] == [e["step"] for e in events(two, "bn_frozen")] == [1]
    m1 = torch.load(one / "last.pth", weights_only=True)["model"]
    m2 = torch.load(two / "last.pth", weights_only=True)["model"]
    # updated by step 1 only: equal to rounding (measured: up to 3.5e-5 apart; 0.5 apart when the two-process
    # run does not freeze, in 193 of the tensors)
    for k in (k for k in m1 if k.endswith(("running_mean", "running_var"))):
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    e1 = torch.load(one / "last.pth", weights_only=True)["ema"]["module"]
    e2 = torch.load(two / "last.pth", weights_only=True)["ema"]["module"]
    for k, v in e1.items():  # the EMA starts from the same (rank 0) weights on every worker
        if v.is_floating_point():
            torch.testing.assert_close(e2[k], v, rtol=1e-3, atol=1e-4, msg=k)


def _flaky_loss(monkeypatch, bad_calls):
    from training import loop

    real = loop.compute_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        res = real(*a, **k)
        calls["n"] += 1
        if bad_calls(calls["n"]):
            res["loss"] = res["loss"] * float("nan")
        return res

    monkeypatch.setattr(loop, "compute_loss", flaky)


def test_a_nan_loss_is_skipped_and_leaves_no_trace(tiny, tmp_path, monkeypatch):
    _flaky_loss(monkeypatch, lambda n: n == 2)
    out = tmp_path / "nan1"
    train.main(base_args(tiny, out, "--epochs", "1", "--eval-interval", "9"))
    assert [e["skipped_total"] for e in events(out, "nonfinite_loss")] == [1]
    assert len(events(out, "train")) == 3
    state = torch.load(out / "last.pth", weights_only=True)
    for k, v in state["model"].items():
        assert torch.isfinite(v.float()).all(), k  # BN statistics of the bad step were rolled back


def test_nan_losses_in_a_row_stop_the_run(tiny, tmp_path, monkeypatch, capsys):
    _flaky_loss(monkeypatch, lambda n: n == 2 or n >= 4)
    out = tmp_path / "nan"
    assert train.main(base_args(tiny, out, "--epochs", "3", "--max-nonfinite-steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "3 steps in a row" in err[0], err
    assert "(-, loss): lower --lr" in err[0]
    skipped = events(out, "nonfinite_loss")
    assert [e["skipped_total"] for e in skipped] == [1, 2, 3, 4]
    assert len(events(out, "train")) == 2  # steps 1 and 3 trained


def test_scheduler_restart_position():
    from training.config import TrainConfig
    from training.schedule import lr_lambda, seek_scheduler

    args = TrainConfig(warmup_epochs=1, epochs=10, lr=0.1, warmup_lr=1e-4, min_lr=1e-5, sched="cosine")
    f = lr_lambda(args, steps_per_epoch=5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seek_scheduler(sched, 23)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * f(23))
    assert f(0) == pytest.approx(1e-3) and f(5) == pytest.approx(1.0) and f(50) == pytest.approx(1e-4)


def test_effdet_checkpoint_loads_into_evaluate(tiny, tmp_path):
    """A 90-class effdet checkpoint keeps its 90 classes (no silent cut to the data's 3) and maps class i to
    category id i + 1, the TF/effdet COCO convention."""
    effdet = pytest.importorskip("effdet", reason="effdet (optional peer) not installed")
    torch.manual_seed(0)
    m = effdet.create_model("efficientdet_d0", pretrained=False, pretrained_backbone=False,
                            image_size=(128, 128), num_classes=90)
    path = tmp_path / "effdet_d0.pth"
    torch.save(m.state_dict(), path)
    assert evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
                          "--checkpoint", str(path), "--model", "efficientdet_d0", "--input_size", "128",
                          "--output", str(tmp_path), "--workers", "0", "--device", "cpu"]) == 0
    dets = json.load(open(tmp_path / "detections.json"))
    cat_ids = {c["id"] for c in json.load(open(tiny["val"]["ann_file"]))["categories"]}
    assert dets and {d["category_id"] for d in dets} <= cat_ids
    with pytest.raises(Exception, match="no EMA"):
        evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
                       "--checkpoint", str(path), "--model", "efficientdet_d0", "--use-ema",
                       "--output", str(tmp_path), "--workers", "0", "--device", "cpu", "--debug"])


def test_waymo_flags_are_checked(tiny, tmp_path):
    with pytest.raises(ValueError, match="--waymo-train-annotation"):
        train.main(base_args(tiny, tmp_path, "--waymo", "--debug"))
    with pytest.raises(ValueError, match="--waymo-val-annotation"):
        evaluate.main(["--waymo", "--output", str(tmp_path), "--debug"])


def test_slurm_allocation_without_srun_is_one_process(monkeypatch):
    from training import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.init("cpu").world_size == 1


def test_evaluate_refuses_checkpoint_of_another_model(tiny, tmp_path):
    from detector import create_model
    from detector.checkpoint import CheckpointError

    path = tmp_path / "d1.pth"
    torch.save(create_model("efficientdet_d1", num_classes=3, image_size=128).state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        evaluate.main(["--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"],
                       "--checkpoint", str(path), "--model", "efficientdet_d0", "--input_size", "128",
                       "--output", str(tmp_path), "--workers", "0", "--device", "cpu", "--debug"])


def test_empty_validation_set_is_a_clear_error(tiny, tmp_path):
    ann = json.load(open(tiny["val"]["ann_file"]))
    ann["images"], ann["annotations"] = [], []
    path = tmp_path / "empty.json"
    json.dump(ann, open(path, "w"))
    args = base_args(tiny, tmp_path / "o", "--epochs", "1", "--debug")
    args[args.index("--val-ann") + 1] = str(path)
    with pytest.raises(ValueError, match="empty.json"):
        train.main(args)


def test_interrupt_inside_an_epoch_then_resume_is_bit_identical(tiny, tmp_path, monkeypatch, uninterrupted):
    """Ctrl-C / SIGTERM in the middle of an epoch saves a checkpoint after the current step; --resume then
    finishes that epoch and the run ends with the weights of an uninterrupted run."""
    import signal

    from training import loop

    common = RESUME_RUN
    a, b = uninterrupted, tmp_path / "b"
    real, calls = loop.compute_loss, {"n": 0}

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # second step of the second epoch (4 steps per epoch)
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(loop, "compute_loss", interrupting)
    train.main(base_args(tiny, b, *common))
    mid = torch.load(b / "last.pth", weights_only=True)
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 2, 6)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(loop, "compute_loss", real)
    train.main(base_args(tiny, b, *common, "--resume"))
    sa = torch.load(a / "last.pth", weights_only=True)
    sb = torch.load(b / "last.pth", weights_only=True)
    assert sb["batch_in_epoch"] is None and sa["step"] == sb["step"] == 8
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ema"]["module"].items():
        assert torch.equal(v, sb["ema"]["module"][k]), k


def test_eval_after_counts_epochs_as_nvidia_does(tiny, tmp_path):
    """NVIDIA's train.py evaluates (with --model-ema) when the 0-based ``epoch >= args.eval_after``:
    --eval-after 1 skips the evaluation after the first epoch and evaluates after the second."""
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--epochs", "2", "--eval-interval", "1", "--eval-after", "1",
                                "--model-ema")) == 0
    assert [e["epoch"] for e in events(out, "eval")] == [1]


def test_eval_after_past_the_last_epoch_is_said_at_the_start(tiny, tmp_path, capsys):
    """--eval-after beyond the run's epochs: nothing is evaluated during training and no best.pth is written,
    as in NVIDIA's train.py; the run says so before it starts instead of leaving the user to find out."""
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--epochs", "1", "--eval-after", "3")) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "--eval-after 3: the run's last epoch is 0 (counted from 0), so nothing is evaluated" in said, said
    assert not events(out, "eval") and not (out / "best.pth").exists() and (out / "last.pth").exists()


def test_start_epoch_trains_the_rest_of_the_schedule(tiny, tmp_path, capsys):
    """--start-epoch 1 of 2: one epoch trained, its steps numbered after epoch 0's, and the closing line counts
    the steps of this run (it said the global step number, as if all of them had run)."""
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--epochs", "2", "--start-epoch", "1")) == 0
    per_epoch = TINY["num_train"] // 2  # -b 2, the last partial batch dropped
    assert [e["step"] for e in events(out, "train")] == list(range(per_epoch + 1, 2 * per_epoch + 1))
    assert {e["epoch"] for e in events(out, "train")} == {1}
    said = " ".join(capsys.readouterr().out.split())
    assert f": {per_epoch} steps (step {2 * per_epoch});" in said, said


def test_eval_event_names_the_training_step_the_checkpoint_records():
    import numpy as np

    assert evaluate.trained_for({"epoch": 4, "step": 90}) == {"epoch": 4, "step": 90}  # ours
    assert evaluate.trained_for({"epoch": np.int64(3), "state_dict": {}}) == {"epoch": 3}  # NVIDIA's, numpy int
    assert evaluate.trained_for({"epoch": True, "step": 2.5}) == {} and evaluate.trained_for({}) == {}
