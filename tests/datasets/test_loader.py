"""collate, build_loader (ordering, epochs, workers) and DevicePrefetcher on the CPU."""
import numpy as np
import pytest
import torch

from datasets.coco import CocoDetection
from datasets.loader import IMAGENET_MEAN, IMAGENET_STD, DevicePrefetcher, EpochSampler, build_loader, collate
from datasets.transforms import EvalTransform, TrainTransform


def sample(n_boxes, image_id, hw=(8, 6), scale=1.5):
    rng = np.random.default_rng(image_id)
    return {"image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            "boxes": rng.uniform(0, 5, (n_boxes, 4)).astype(np.float32),
            "labels": np.arange(n_boxes, dtype=np.int64) + 1, "image_id": image_id,
            "orig_size": (hw[0] * 2, hw[1] * 3), "scale": scale}


def test_collate_shapes_and_padding():
    ss = [sample(0, 1), sample(3, 2), sample(1, 3, scale=0.25)]
    b = collate(ss)
    assert b["images"].shape == (3, 8, 6, 3) and b["images"].dtype == torch.uint8
    assert b["boxes"].shape == (3, 3, 4) and b["boxes"].dtype == torch.float32
    assert b["labels"].shape == (3, 3) and b["labels"].dtype == torch.int64
    assert b["image_id"].tolist() == [1, 2, 3] and b["image_id"].dtype == torch.int64
    assert b["scale"].dtype == torch.float32 and b["scale"].tolist() == [1.5, 1.5, 0.25]
    assert b["orig_size"].dtype == torch.int64 and b["orig_size"].tolist() == [[16, 18]] * 3
    assert b["labels"].tolist() == [[-1, -1, -1], [1, 2, 3], [1, -1, -1]]
    assert (b["boxes"][0] == 0).all() and (b["boxes"][2, 1:] == 0).all()
    np.testing.assert_array_equal(b["boxes"][1].numpy(), ss[1]["boxes"])
    np.testing.assert_array_equal(b["images"][2].numpy(), ss[2]["image"])


def test_collate_no_boxes_at_all_and_errors():
    b = collate([sample(0, 1), sample(0, 2)])
    assert b["boxes"].shape == (2, 1, 4) and b["labels"].tolist() == [[-1], [-1]]
    with pytest.raises(ValueError, match="differ in shape"):
        collate([sample(0, 1), sample(0, 2, hw=(8, 7))])
    with pytest.raises(ValueError, match="empty"):
        collate([])


class FakeLoader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("channels_last", [False, True])
def test_prefetcher_normalizes_on_cpu(channels_last):
    batches = [collate([sample(2, 1), sample(0, 2)]), collate([sample(1, 3)])]
    pf = DevicePrefetcher(FakeLoader(batches), "cpu", channels_last=channels_last)
    out = list(pf)
    assert len(out) == 2 and len(pf) == 2
    for got, src in zip(out, batches):
        x = got["images"]
        assert x.dtype == torch.float32 and x.shape == (src["images"].shape[0], 3, 8, 6)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        want = (src["images"].permute(0, 3, 1, 2).double() - mean.double()) / std.double()
        torch.testing.assert_close(x.double(), want, rtol=1e-6, atol=1e-5)
        assert got["boxes"] is not None and torch.equal(got["labels"], src["labels"])
        assert isinstance(got["data_time"], float) and got["data_time"] >= 0
    assert pf.total_data_time >= pf.last_data_time >= 0
    np.testing.assert_allclose(IMAGENET_MEAN, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(IMAGENET_STD, [58.395, 57.12, 57.375])


@pytest.fixture(scope="module")
def train_set(tiny_synthetic):
    p = tiny_synthetic["train"]
    return CocoDetection(p["ann_file"], p["image_dir"], transform=TrainTransform(48, seed=11))


def batches_of(loader, epoch, skip=0):
    loader.set_epoch(epoch, skip_batches=skip)
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_loader_order_is_seeded_per_epoch(train_set):
    loader = build_loader(train_set, batch_size=3, train=True, workers=0, seed=4)
    assert loader.drop_last and len(loader) == 2
    e0, e0b, e1 = batches_of(loader, 0), batches_of(loader, 0), batches_of(loader, 1)
    ids = lambda bs: [i for b in bs for i in b["image_id"].tolist()]  # noqa: E731
    assert ids(e0) == ids(e0b) and ids(e0) != ids(e1)
    assert len(set(ids(e0))) == 6
    for a, b in zip(e0, e0b):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["boxes"], b["boxes"])
    resumed = batches_of(loader, 0, skip=1)  # resume after the first batch: the rest is identical
    assert len(resumed) == 1 and torch.equal(resumed[0]["images"], e0[1]["images"])
    other = build_loader(train_set, batch_size=3, train=True, workers=0, seed=5)
    assert ids(batches_of(other, 0)) != ids(e0)


def test_eval_loader_keeps_order_and_last_batch(tiny_synthetic):
    p = tiny_synthetic["val"]
    ds = CocoDetection(p["ann_file"], p["image_dir"], transform=EvalTransform(48))
    loader = build_loader(ds, batch_size=3, train=False, workers=0, seed=0)
    bs = batches_of(loader, 0)
    assert [b["image_id"].tolist() for b in bs] == [[1, 2, 3], [4]]


def test_workers_give_identical_batches(train_set):
    ref = batches_of(build_loader(train_set, batch_size=4, train=True, workers=0, seed=1), 2)
    loader = build_loader(train_set, batch_size=4, train=True, workers=2, seed=1)
    assert loader.persistent_workers
    got = batches_of(loader, 2)
    got3 = batches_of(loader, 3)  # persistent workers still see the new epoch
    ref3 = batches_of(build_loader(train_set, batch_size=4, train=True, workers=0, seed=1), 3)
    for a, b in zip(ref + ref3, got + got3):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_distributed_sampler(train_set, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = build_loader(train_set, batch_size=2, train=True, workers=0, seed=3, distributed=True)
        single = build_loader(train_set, batch_size=2, train=True, workers=0, seed=3)
        a = [b["image_id"].tolist() for b in batches_of(loader, 0)]
        assert a == [b["image_id"].tolist() for b in batches_of(single, 0)]
        c = [b["image_id"].tolist() for b in batches_of(loader, 1)]
        assert a != c and len(a) == 4
        ev = build_loader(train_set, batch_size=5, train=False, workers=0, seed=3, distributed=True)
        assert [b["image_id"].tolist() for b in batches_of(ev, 0)] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    finally:
        dist.destroy_process_group()


def test_training_shards_split_each_global_batch():
    """Rank r of W with batch B gets the r-th slice of every global batch of B*W: the same samples per step
    as one process with batch B*W, whatever the worker count."""
    one = [i for i, _ in EpochSampler(11, shuffle=True, seed=5, block=4)]
    ranks = [[i for i, _ in EpochSampler(11, shuffle=True, seed=5, shard=(r, 2), block=2)] for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4] and len(EpochSampler(11, True, 5, shard=(1, 2), block=2)) == 4
    merged = [i for g in range(2) for r in range(2) for i in ranks[r][2 * g:2 * g + 2]]
    assert merged == one[:8]


def test_eval_sharding_has_no_duplicates():
    shards = [EpochSampler(10, shuffle=False, seed=0, shard=(r, 3)) for r in range(3)]
    got = [[i for i, _ in s] for s in shards]
    assert got == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]] and [len(s) for s in shards] == [4, 3, 3]
    shuffled = [[i for i, _ in EpochSampler(10, shuffle=True, seed=2, shard=(r, 3))] for r in range(3)]
    assert sorted(sum(shuffled, [])) == list(range(10))


@pytest.mark.cuda
def test_prefetcher_cuda(cuda_device):
    batches = [collate([sample(2, i), sample(1, i + 1)]) for i in range(3)]
    out = list(DevicePrefetcher(FakeLoader(batches), cuda_device, channels_last=True))
    torch.cuda.synchronize()
    ref = list(DevicePrefetcher(FakeLoader(batches), "cpu", channels_last=True))
    for g, r in zip(out, ref):
        assert g["images"].is_cuda and g["images"].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g["images"].cpu(), r["images"])
        assert torch.equal(g["labels"].cpu(), r["labels"])
