"""--fill-color, --interpolation / --train-interpolation and --dist-bn do what NVIDIA's do."""
import numpy as np
import pytest
import torch

from datasets.transforms import EvalTransform, TrainTransform


def sample(h=20, w=40):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "boxes": np.array([[2, 2, 10, 10.]]),
            "labels": np.array([1])}


def test_fill_color_pads_with_it():
    out = EvalTransform((40, 40), fill=(0, 0, 0))(sample())
    assert (out["image"][25:] == 0).all()
    out = EvalTransform((40, 40))(sample())
    assert (out["image"][25:] == (124, 116, 104)).all()  # "mean"


def test_interpolation_changes_pixels_and_random_is_bilinear():
    """NVIDIA's data/transforms.py resizes "random" (its --train-interpolation default) and "" bilinear: its
    _pil_interp has no case for them (tests/fixtures/nvidia/flags.json records what it returns per name)."""
    def resized(name, train=False):
        if train:
            t = TrainTransform((64, 64), seed=1, scale_range=(1.0, 1.0), flip_prob=0.0, interpolation=name)
            return [t(sample(), index=i)["image"] for i in range(4)]
        return [EvalTransform((64, 64), interpolation=name)(sample())["image"]]

    for train in (False, True):
        bilinear = resized("bilinear", train)
        for same in ("random", ""):
            assert all(np.array_equal(a, b) for a, b in zip(resized(same, train), bilinear)), same
        for other in ("bicubic", "nearest", "lanczos", "hamming"):
            assert not np.array_equal(resized(other, train)[0], bilinear[0]), other
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform((64, 64), interpolation="box")


def _bn_worker(rank, path, reduce, out):
    import torch.distributed as dist

    from training.distributed import distribute_bn

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank + 1))
    bn.running_var.fill_(float(10 * (rank + 1)))
    distribute_bn(bn, reduce=reduce)
    torch.save(bn.state_dict(), f"{out}_{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("reduce, mean, var", [(True, 1.5, 15.0), (False, 1.0, 10.0)])
def test_dist_bn_reduce_averages_broadcast_copies_rank0(tmp_path, reduce, mean, var):
    import torch.multiprocessing as mp

    mp.spawn(_bn_worker, args=(str(tmp_path / "pg"), reduce, str(tmp_path / "bn")), nprocs=2, join=True)
    for rank in range(2):
        sd = torch.load(tmp_path / f"bn_{rank}.pt", weights_only=True)
        assert torch.allclose(sd["running_mean"], torch.full((3,), mean))
        assert torch.allclose(sd["running_var"], torch.full((3,), var))


def test_waymo_iou_thresholds():
    from training.evaluation import waymo_iou_by_class

    names = ["vehicle", "TYPE_VEHICLE", "pedestrian", "Cyclist", "car", "scar"]
    assert list(waymo_iou_by_class([{"name": n} for n in names]).values()) == [0.7, 0.7, 0.5, 0.5, 0.7, 0.5]
