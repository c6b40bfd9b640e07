"""training.evaluation.run_inference: the same COCO results as predicting batch by batch, duplicates of a
replaced corrupt image dropped, pictures kept, and no device -> host copy per batch."""
import json
import os
import sys

import pytest
import torch

import datasets as D
from datasets.synthetic import generate_synthetic
from detector.fuse import fuse_for_inference
from detector.model import create_model
from detector.pipeline import predict
from training.evaluation import run_inference

TINY = dict(seed=11, num_train=1, num_val=5, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    syn = generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)
    ann = json.load(open(syn["val"]["ann_file"]))
    second = sorted(ann["images"], key=lambda im: im["id"])[1]
    with open(os.path.join(syn["val"]["image_dir"], second["file_name"]), "wb") as f:
        f.write(b"not an image")  # replaced by the next good image under skip_bad_images
    torch.manual_seed(0)
    model = create_model("efficientdet_d0", num_classes=3, image_size=128, backend="torch").eval()
    return syn, model, second["id"]


def dataset(syn):
    ds = D.CocoDetection(syn["val"]["ann_file"], syn["val"]["image_dir"], skip_bad_images=True)
    ds.transform = D.EvalTransform(128)
    return ds


def per_batch_results(model, loader):
    """The former per-batch loop: predict, copy to the host, convert, first copy of each image id only."""
    fused = fuse_for_inference(model)
    out, done = [], set()
    for batch in D.DevicePrefetcher(loader, "cpu"):
        dets = predict(fused, batch["images"], image_scale=batch["scale"],
                       clip_size=batch["orig_size"] * batch["scale"][:, None], score_threshold=0.001,
                       backend="torch").float()
        fresh = torch.tensor([i not in done and not done.add(i) for i in batch["image_id"].tolist()])
        out += D.to_coco_results(dets[fresh, :, :4], dets[fresh, :, 4], dets[fresh, :, 5].long(),
                                 batch["image_id"][fresh], torch.ones(int(fresh.sum())),
                                 loader.dataset.label_to_cat_id, orig_sizes=batch["orig_size"][fresh])
    return out, sorted(done)


def test_results_duplicates_and_pictures(setup):
    syn, model, bad_id = setup
    loader = D.build_loader(dataset(syn), 2, train=False, workers=0, seed=0)
    results, timing, pictures = run_inference(model, loader, torch.device("cpu"), backend="torch",
                                              show_progress=False, keep_images=3)
    want, want_ids = per_batch_results(model, D.build_loader(dataset(syn), 2, train=False, workers=0, seed=0))
    assert results == want and len(results) > 0
    assert timing["image_ids"] == want_ids and bad_id not in want_ids and len(want_ids) == 4
    # 5 samples ran (the corrupt image's stand-in repeats a neighbour); 4 distinct images were scored
    assert timing["images"] == 4 and timing["img_per_s"] > 0 and timing["seconds"] >= timing["data_seconds"] >= 0
    assert len(pictures) == 3 and all(p[1].shape == (100, 6) for p in pictures)
    first_ids = [int(i) for b in loader for i in b["image_id"]][:3]
    assert [p[0] for p in pictures] == first_ids


def test_no_host_copy_per_batch(setup, monkeypatch):
    """run_inference's device -> host copies (``Tensor.cpu``/``.item``/``.tolist``/``.numpy``) do not grow with
    the number of batches: 5 batches of 1 image make as many as 1 batch of 5."""
    syn, model, _ = setup
    counts = {}

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(os.path.join("training", "evaluation.py")):  # not the CPU NMS reference (the spec)
                counts[name] = counts.get(name, 0) + 1
            return orig(self, *a, **k)
        return wrapper

    got = {}
    for bs in (1, 5):
        loader = D.build_loader(dataset(syn), bs, train=False, workers=0, seed=0)
        batches = list(loader)  # loading (collate) is not the loop under test
        loader = type("L", (), {"dataset": loader.dataset, "__iter__": lambda s: iter(batches),
                                "__len__": lambda s: len(batches)})()
        counts.clear()
        with monkeypatch.context() as m:
            for name in ("cpu", "item", "tolist", "numpy"):
                m.setattr(torch.Tensor, name, counting(name))
            run_inference(model, loader, torch.device("cpu"), backend="torch", show_progress=False)
        got[bs] = dict(counts)
    assert got[1] == got[5] and got[1].get("cpu") == 1, got


def test_ranks_results_merged_per_image(monkeypatch):
    """evaluate_model keeps, for each image, every detection of the first rank that ran it: another rank's
    copy of that image (the sampler's padding, or a corrupt image's replacement) is dropped even where its
    boxes differ in the last digits, and identical rows of one image (e.g. two boxes clipped to the same
    border line) are all kept. It matched rows by rounded values instead, which did neither."""
    import training.evaluation as E

    def row(image_id, x, score):
        return {"image_id": image_id, "category_id": 1, "bbox": [x, 0.0, 5.0, 5.0], "score": score}

    ranks = [([row(1, 0.0, 0.9), row(1, 0.0, 0.9), row(2, 1.0, 0.8)], [1, 2]),
             ([row(2, 1.0004, 0.8000001), row(3, 2.0, 0.7)], [2, 3])]
    parts = iter([[r for r, _ in ranks], [ids for _, ids in ranks]])
    monkeypatch.setattr(E.dist, "all_gather_objects", lambda obj: next(parts))
    monkeypatch.setattr(E, "run_inference", lambda *a, **k: ([], {"image_ids": []}, []))
    scored = {}
    monkeypatch.setattr(E.D, "evaluate_detections",
                        lambda gt, dets, iou_by_class=None, image_ids=None: scored.update(dets=dets, ids=image_ids))

    class Loader:
        class dataset:
            class coco:
                dataset = {}
    info = type("Info", (), {"device": torch.device("cpu"), "is_main": True})()
    E.evaluate_model(None, Loader, info)
    assert scored["ids"] == [1, 2, 3]
    assert [(r["image_id"], r["bbox"][0]) for r in scored["dets"]] == [(1, 0.0), (1, 0.0), (2, 1.0), (3, 2.0)]
