"""Benchmark cases for kernels.focal_loss: forward + backward (what a training step pays)."""
from __future__ import annotations

import torch

from bench.harness import Case


def _inputs(batch, anchors, classes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(batch, anchors, classes, generator=g) * 3 - 4).to(device=device, dtype=dtype)
    u = torch.rand(batch, anchors, generator=g)
    targets = torch.full((batch, anchors), -1, dtype=torch.int64)
    pos = u < 0.002
    targets[pos] = torch.randint(0, classes, (int(pos.sum()),), generator=g)
    targets[(u >= 0.002) & (u < 0.012)] = -2
    targets = targets.to(device)
    normalizer = (targets >= 0).sum().float() + 1.0         # stays on the device
    return logits.requires_grad_(True), targets, normalizer


def _make(label, batch, anchors, classes, dtype, device, quick):
    from kernels.focal_loss import focal_loss, focal_loss_reference

    x, t, norm = _inputs(batch, anchors, classes, dtype, device)
    alpha, gamma = 0.25, 1.5

    def triton_fn():
        return torch.autograd.grad(focal_loss(x, t, norm, alpha, gamma, backend="triton"), x)

    def reference_fn():
        return torch.autograd.grad(focal_loss_reference(x, t, norm, alpha, gamma), x)

    providers = {"triton": triton_fn, "reference": reference_fn}
    if not quick:
        compiled_ref = torch.compile(focal_loss_reference)
        providers["compiled"] = lambda: torch.autograd.grad(compiled_ref(x, t, norm, alpha, gamma), x)
    try:
        from torchvision.ops import sigmoid_focal_loss

        def peer_fn():  # the peer needs a dense one-hot target, built inside the timed region
            onehot = torch.nn.functional.one_hot(t.clamp(min=0), classes).float() * (t >= 0).unsqueeze(-1)
            per = sigmoid_focal_loss(x.float(), onehot, alpha=alpha, gamma=gamma, reduction="none")
            loss = (per * (t != -2).unsqueeze(-1)).sum() / norm
            return torch.autograd.grad(loss, x)
        providers["peer:torchvision"] = peer_fn
    except ImportError:
        pass
    n = x.numel()
    # forward: logits in, targets in (once per anchor), fp32 gradient out; backward: fp32 gradient in,
    # gradient in the logits dtype out (the partial sums, a few KB, are left out)
    bytes_moved = n * x.element_size() + t.numel() * t.element_size() + n * 4 + n * 4 + n * x.element_size()
    return Case(op="focal_loss", shape=label, providers=providers, bytes_moved=bytes_moved,
                setup=f"fwd+bwd, logits {tuple(x.shape)} {str(dtype).replace('torch.', '')}, "
                      f"targets int64, ~0.2% positive, ~1% ignored, alpha {alpha}, gamma {gamma}")


def cases(quick: bool, device) -> list[Case]:
    device = torch.device(device)
    if quick:
        return [_make("tiny 2x300x10 fp32", 2, 300, 10, torch.float32, device, quick),
                _make("tiny 1x129x7 fp16", 1, 129, 7, torch.float16, device, quick)]
    return [_make("D0 train b32 512px fp32", 32, 49104, 90, torch.float32, device, quick),
            _make("D0 train b32 512px fp16 (AMP)", 32, 49104, 90, torch.float16, device, quick),
            _make("D4 train b8 1024px fp16 (AMP)", 8, 196416, 90, torch.float16, device, quick)]
