"""``--compile`` (torch.compile of the model) gives the same detections and trains; slow: compiling takes
minutes on a 2-core CPU, which is why the flag is off by default."""
import json

import pytest

import evaluate
import train
from datasets.synthetic import generate_synthetic

TINY = dict(seed=9, num_train=4, num_val=2, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def data_args(tiny):
    return ["--val-ann", tiny["val"]["ann_file"], "--val-images", tiny["val"]["image_dir"], "--workers", "0",
            "--device", "cpu"]


@pytest.mark.slow
def test_compiled_training_and_evaluation(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--train-ann", tiny["train"]["ann_file"], "--train-images", tiny["train"]["image_dir"],
                       *data_args(tiny), "--output", str(out), "--input_size", "128", "-b", "2", "--epochs", "1",
                       "--compile", "--pictures", "0", "--kernel-backend", "torch"]) == 0
    dets = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        res = tmp_path / f"{name}.json"
        assert evaluate.main([*data_args(tiny), "--checkpoint", str(out / "last.pth"), "--output", str(tmp_path),
                              "--results", str(res), *extra]) == 0
        dets[name] = json.loads(res.read_text())
    assert dets["eager"] and abs(len(dets["eager"]) - len(dets["compiled"])) <= 0.05 * len(dets["eager"])
    unmatched = [b for b in dets["compiled"] if not any(
        (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]) and abs(a["score"] - b["score"]) < 1e-3
        and max(abs(u - v) for u, v in zip(a["bbox"], b["bbox"])) < 0.05 for a in dets["eager"])]
    assert len(unmatched) <= 0.05 * len(dets["compiled"])  # rounding may reorder near-equal candidates
