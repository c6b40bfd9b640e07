"""NVIDIA's published command lines run here unchanged, apart from paths, the launcher and the GPU count.

Each ``LINES`` entry is the exact flag list of one of NVIDIA's scripts (NVIDIA/DeepLearningExamples,
``PyTorch/Detection/Efficientdet/<path>``), with the data root, checkpoints, output folder and worker count
as ``{placeholders}``. The launcher (``./distributed_train.sh 8``, ``python -m bind_launch --nproc_per_node``,
``srun ... python3``) becomes a direct call of our script in this process. To run on a CPU in seconds, the test
then appends ``SMALL`` (a tiny input size and batch, and ``--max-steps``), and for the Waymo fine-tune one epoch
with its evaluation, whose Waymo numbers are checked. Scripts whose flag names repeat an earlier script's (only
the values differ) carry the ``slow`` marker: ``EFFDET_RUN_SLOW=1`` runs them too.
"""
import json
import os
import shutil

import pytest
import torch

import evaluate
import train
from datasets.synthetic import generate_synthetic

D0_TRAIN = {  # scripts/D0/*.sh and *.sub: train.py flag lists
    "scripts/D0/train_AMP_8xA100-80G.sh":
        "{coco} --model efficientdet_d0 -b 150 --lr 1.63 --amp --opt fusedmomentum --warmup-epochs 50 "
        "--lr-noise 0.4 0.9 --output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 300 --resume --smoothing 0.0 --pretrained-backbone-path {backbone} "
        "--memory-format nchw --sync-bn --fused-focal-loss --seed 12711",
    "scripts/D0/train_AMP_8xV100-32G.sh":
        "{coco} --model efficientdet_d0 -b 60 --lr 0.65 --amp --opt fusedmomentum --warmup-epochs 20 "
        "--lr-noise 0.4 0.9 --output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 300 --resume --smoothing 0.0 --pretrained-backbone-path {backbone} "
        "--memory-format nchw --sync-bn --fused-focal-loss --seed 12711",
    "scripts/D0/train_FP32_8xV100-32G.sh":
        "{coco} --model efficientdet_d0 -b 30 --lr 0.375 --amp --opt fusedmomentum --warmup-epochs 20 "
        "--lr-noise 0.4 0.9 --output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 300 --resume --smoothing 0.0 --pretrained-backbone-path {backbone} "
        "--memory-format nchw --sync-bn --fused-focal-loss --seed 12711",
    "scripts/D0/train_TF32_8xA100-80G.sh":
        "{coco} --model efficientdet_d0 -b 80 --lr 0.9 --opt fusedmomentum --warmup-epochs 50 "
        "--lr-noise 0.4 0.9 --output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 300 --resume --smoothing 0.0 --pretrained-backbone-path {backbone} "
        "--memory-format nchw --sync-bn --fused-focal-loss --seed 12711",
    "scripts/D0/train_AMP_32xV100-32G.sub":
        "{coco} --model efficientdet_d0 -b 60 --lr 2.42 --amp --sync-bn --opt fusedmomentum --warmup-epochs 90 "
        "--output {out} --lr-noise 0.55 0.9 --workers {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 400 --resume --pretrained-backbone-path {backbone} --smoothing 0.0 "
        "--fused-focal-loss --seed 31",
    "scripts/D0/train_FP32_32xV100-32G.sub":
        "{coco} --model efficientdet_d0 -b 30 --lr 1.5 --sync-bn --opt fusedmomentum --warmup-epochs 120 "
        "--output {out} --lr-noise 0.55 0.9 --workers {workers} --fill-color mean --model-ema --model-ema-decay 0.999 "
        "--eval-after 200 --epochs 400 --resume --pretrained-backbone-path {backbone} --smoothing 0.0 "
        "--fused-focal-loss --seed 31",
}
_BENCH = ("{coco} --model efficientdet_d0 -b %s --lr %s %s--opt fusedmomentum --warmup-epochs 50 --lr-noise 0.4 0.9 "
          "--output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 --eval-after 200 "
          "--epochs %s --resume --smoothing 0.0 --pretrained-backbone-path {backbone} --memory-format nchw "
          "--sync-bn --fused-focal-loss --seed 12711 --benchmark-steps 500 --benchmark")
D0_BENCHMARK = {  # scripts/D0/train-benchmark_*.sh
    "scripts/D0/train-benchmark_AMP_A100-80G.sh": _BENCH % (150, 1.63, "--amp ", 5),
    "scripts/D0/train-benchmark_AMP_V100-32G.sh": _BENCH % (60, 1.63, "--amp ", 300),
    "scripts/D0/train-benchmark_FP32_V100-32G.sh": _BENCH % (30, 0.9, "", 5),
    "scripts/D0/train-benchmark_TF32_A100-80G.sh": _BENCH % (80, 0.9, "", 5),
}
D0_VALIDATE = {  # scripts/D0/validation_*.sh and inference_*.sh: validate.py flag lists
    "scripts/D0/validation_AMP_V100-32G.sh":
        "{coco} --model efficientdet_d0 -b 8 --torchscript --use-ema --amp --checkpoint {ckpt}",
    "scripts/D0/validation_TF32_A100-80G.sh":
        "{coco} --model efficientdet_d0 -b 8 --torchscript --use-ema --checkpoint {ckpt}",
    "scripts/D0/inference_AMP_V100-32G.sh":
        "{coco} --model efficientdet_d0 -b 8 --torchscript --use-ema --amp --checkpoint {ckpt} --inference",
    "scripts/D0/inference_FP32_V100-32G.sh":
        "{coco} --model efficientdet_d0 -b 8 --torchscript --use-ema --checkpoint {ckpt} --inference",
    "scripts/D0/inference_TF32_A100-80G.sh":
        "{coco} --model efficientdet_d0 -b 8 --torchscript --use-ema --checkpoint {ckpt} --inference",
}
# scripts/D0/validation_AMP_A100-80G.sh passes --model efficientdet_d4 with a D0 checkpoint: refused, clearly
D4_WITH_D0_CHECKPOINT = "{coco} --model efficientdet_d4 -b 8 --torchscript --use-ema --amp --checkpoint {ckpt}"
WAYMO_TRAIN = (  # scripts/waymo/train_waymo_AMP_8xA100-80G.sh
    "{waymo} --model efficientdet_d0 -b 8 --amp --lr 0.2 --sync-bn --opt fusedmomentum --warmup-epochs 1 "
    "--output {out} --worker {workers} --fill-color mean --model-ema --model-ema-decay 0.999 --eval-after 24 "
    "--epochs 24 --save-checkpoint-interval 1 --smoothing 0.0 --waymo --remove-weights class_net box_net anchor "
    "--input_size 1536 --num_classes 3 --resume --freeze-layers backbone --waymo-train {waymo}/training/images "
    "--waymo-val {waymo}/validation/images --waymo-val-annotation {waymo}/validation/annotations/annotations.json "
    "--waymo-train-annotation {waymo}/training/annotations/annotations.json --initial-checkpoint {ckpt}")
WAYMO_VALIDATE = (  # scripts/waymo/validation_AMP_8xA100-80G.sh
    "{waymo} --model efficientdet_d0 -b 10 --amp --waymo --use-ema --input_size 1536 --num_classes 3 "
    "--waymo-val {waymo}/validation/images --waymo-val-annotation {waymo}/validation/annotations/annotations.json "
    "--checkpoint {ckpt} --torchscript")

# appended for a CPU run in seconds (later flags win): small images and batches, one or a few steps
SMALL = ["--input_size", "128", "-b", "2", "--device", "cpu", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny COCO-2017 root, a tiny Waymo set (3 classes as NVIDIA's converter names them) and a backbone."""
    root = tmp_path_factory.mktemp("nvidia")
    syn = generate_synthetic(root / "syn", seed=3, num_train=6, num_val=2, image_size=64, num_classes=3,
                             min_object=12, max_object=40, workers=1)
    coco, waymo = root / "coco", root / "waymo"
    for split, folder in (("train", "training"), ("val", "validation")):
        shutil.copytree(syn[split]["image_dir"], coco / f"{split}2017")
        shutil.copytree(syn[split]["image_dir"], waymo / folder / "images")
        (coco / "annotations").mkdir(exist_ok=True)
        shutil.copy(syn[split]["ann_file"], coco / "annotations" / f"instances_{split}2017.json")
        ann = json.load(open(syn[split]["ann_file"]))
        for c, name in zip(ann["categories"], ("vehicle", "pedestrian", "cyclist")):
            c["name"] = name
        (waymo / folder / "annotations").mkdir()
        json.dump(ann, open(waymo / folder / "annotations" / "annotations.json", "w"))
    from detector import create_model

    backbone = root / "jocbackbone_statedict_B0.pth"
    torch.save(create_model("efficientdet_d0", num_classes=3, image_size=128).backbone.state_dict(), backbone)
    return {"coco": str(coco), "waymo": str(waymo), "backbone": str(backbone), "workers": "0", "root": root}


_runs = {}


def run_train(name: str, line: str, data, *extra) -> str:
    """Run one of NVIDIA's train.py lines (once per test module); returns its output folder."""
    if name not in _runs:
        out = data["root"] / "runs" / name.replace("/", "_")
        argv = line.format(**data, out=out, ckpt=d0_checkpoint(data) if "{ckpt}" in line else "").split()
        assert train.main(argv + SMALL + list(extra)) == 0
        _runs[name] = out
    return _runs[name]


def d0_checkpoint(data) -> str:
    name = "scripts/D0/train_AMP_8xA100-80G.sh"
    return str(run_train(name, D0_TRAIN[name], data, "--max-steps", "1") / "last.pth")


def distinct(lines: dict) -> list:
    """Every script as a test; one whose flag names repeat an earlier script's (only values differ, or only
    ``--amp``: without CUDA fp16 runs as fp32, so on a CPU such lines run the same code) is marked slow, so the
    default run covers each distinct flag list once."""
    seen, params = set(), []
    for name in sorted(lines):
        names = tuple(t for t in lines[name].split() if t.startswith("-") and t != "--amp")
        params.append(pytest.param(name, marks=[pytest.mark.slow] if names in seen else []))
        seen.add(names)
    return params


@pytest.mark.parametrize("name", distinct(D0_TRAIN))
def test_d0_training_scripts(name, data):
    out = run_train(name, D0_TRAIN[name], data, "--max-steps", "1")
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["step"] == 1 and state["ema"] is not None  # --model-ema
    assert state["args"]["opt"] == "fusedmomentum" and tuple(state["args"]["lr_noise"]) in ((0.4, 0.9), (0.55, 0.9))


@pytest.mark.parametrize("name", distinct(D0_BENCHMARK))
def test_d0_benchmark_scripts(name, data):
    out = run_train(name, D0_BENCHMARK[name], data, "--max-steps", "3")
    bench = [e for e in map(json.loads, open(out / "log.jsonl")) if e["event"] == "benchmark"]
    assert len(bench) == 1 and bench[0]["train_img_per_s"] > 0


@pytest.mark.parametrize("name", distinct(D0_VALIDATE))
def test_d0_validation_and_inference_scripts(name, data, tmp_path):
    argv = D0_VALIDATE[name].format(**data, ckpt=d0_checkpoint(data)).split()
    results = tmp_path / "results.json"
    assert evaluate.main(argv + ["--device", "cpu", "--output", str(tmp_path), "--results", str(results)]) == 0
    assert json.load(open(results))  # detections in COCO results format
    scored = [json.loads(line) for line in open(tmp_path / "eval.jsonl")][-1]
    assert ("AP" in scored) == ("--inference" not in argv)


def test_d4_line_with_a_d0_checkpoint_is_refused_clearly(data, tmp_path, capsys):
    argv = D4_WITH_D0_CHECKPOINT.format(**data, ckpt=d0_checkpoint(data)).split()
    capsys.readouterr()
    assert evaluate.main(argv + ["--device", "cpu", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds efficientdet_d0, not efficientdet_d4" in err[0], err


def test_torchscript_gives_the_same_detections(data, tmp_path):
    argv = D0_VALIDATE["scripts/D0/validation_TF32_A100-80G.sh"].format(**data, ckpt=d0_checkpoint(data)).split()
    dets = {}
    for ts in (True, False):
        path = tmp_path / f"ts{ts}.json"
        args = argv if ts else [a for a in argv if a != "--torchscript"]
        evaluate.main(args + ["--device", "cpu", "--output", str(tmp_path), "--results", str(path)])
        dets[ts] = json.load(open(path))
    assert len(dets[True]) == len(dets[False]) > 0
    for a, b in zip(dets[True], dets[False]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_waymo_scripts_report_waymo_metrics(data, tmp_path):
    """The fine-tune line for one epoch with its evaluation, then the validation line on its checkpoint:
    both report AP per class at IoU 0.7 (vehicle) / 0.5 (pedestrian, cyclist) and their mean."""
    out = run_train("scripts/waymo/train_waymo_AMP_8xA100-80G.sh", WAYMO_TRAIN, data,
                    "--epochs", "1", "--eval-after", "0")
    ev = [json.loads(line) for line in open(out / "log.jsonl") if '"event": "eval"' in line]
    assert len(ev) == 1 and set(ev[0]["per_class_iou"]) == {"vehicle", "pedestrian", "cyclist"}
    assert 0.0 <= ev[0]["mAP_iou_by_class"] <= 1.0
    argv = WAYMO_VALIDATE.format(**data, ckpt=out / "last.pth").split()
    assert evaluate.main(argv + SMALL[:2] + ["--device", "cpu", "--output", str(tmp_path)]) == 0
    line = [json.loads(x) for x in open(tmp_path / "eval.jsonl")][-1]
    assert set(line["per_class_iou"]) == {"vehicle", "pedestrian", "cyclist"} and "mAP_iou_by_class" in line
    frozen = torch.load(out / "last.pth", weights_only=True)
    start = torch.load(d0_checkpoint(data), weights_only=True)
    k = next(k for k in frozen["model"] if k.startswith("backbone.") and k.endswith("weight"))
    assert torch.equal(frozen["model"][k], start["model"][k])  # --freeze-layers backbone


def test_local_rank_and_launchers(data):
    """torch.distributed.launch passes --local-rank=N, NVIDIA's bind_launch --local_rank=N."""
    from training.config import eval_parser, train_parser

    assert train_parser().parse_args(["--local_rank=0"]).local_rank == 0
    assert train_parser().parse_args(["--local-rank=1"]).local_rank == 1
    assert eval_parser().parse_args(["--local_rank", "0"]).local_rank == 0
