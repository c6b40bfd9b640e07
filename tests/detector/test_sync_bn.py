"""The worker-synchronized BatchNorm equals BatchNorm2d when there is one worker (gloo, CPU)."""
import copy

import torch
import torch.distributed as dist

from detector.layers import BatchNormAct, convert_sync_batchnorm


def test_sync_bn_matches_batchnorm_in_one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        for ref in (torch.nn.BatchNorm2d(5, eps=1e-3, momentum=0.1), BatchNormAct(5, eps=1e-3, momentum=0.1)):
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
                ref.bias.uniform_(-0.2, 0.2)
            sync = convert_sync_batchnorm(copy.deepcopy(ref))
            assert type(sync).__name__.startswith("Sync")
            x = (torch.randn(3, 5, 7, 6) * 0.1 + 30.0).requires_grad_()  # a large mean: a one-pass E[x^2] - E[x]^2 fails this
            xs = x.detach().clone().requires_grad_()
            y, ys = ref.train()(x), sync.train()(xs)
            torch.testing.assert_close(ys, y, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(sync.running_mean, ref.running_mean)
            g = torch.randn_like(y)
            (gx,) = torch.autograd.grad(y, x, g)
            (gxs,) = torch.autograd.grad(ys, xs, g)
            torch.testing.assert_close(gxs, gx, rtol=1e-3, atol=1e-3)
            assert int(sync.num_batches_tracked) == 1
    finally:
        dist.destroy_process_group()
