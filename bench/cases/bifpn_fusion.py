"""Benchmark cases for kernels.bifpn_fusion: one BiFPN node, forward + backward (training)."""
from __future__ import annotations

import torch

from bench.harness import Case


def _effdet_node(C, sizes, out_size, modes, dtype, device, pool_padding):
    """effdet's eager modules for the same node: FpnCombine (fastattn) -> SiLU -> conv_dw."""
    try:
        from effdet.efficientdet import FpnCombine, SeparableConv2d
    except Exception:
        return None
    pad_type = "same" if pool_padding == "same" else ""
    info = [dict(num_chs=C, size=s) for s in sizes]
    combine = FpnCombine(info, C, tuple(range(len(sizes))), output_size=out_size, pad_type=pad_type,
                         weight_method="fastattn").to(device)
    conv_dw = SeparableConv2d(C, C, 3, padding=pad_type, bias=False, act_layer=None).conv_dw.to(device, dtype)
    act = torch.nn.SiLU()
    if dtype != torch.float32:  # effdet casts its edge weights to the input dtype itself
        combine = combine.to(dtype)
    return lambda xs: conv_dw(act(combine(xs)))


def _make(label, B, C, out_size, in_sizes, modes, dtype, device, quick, pool_padding="symmetric"):
    from kernels.bifpn_fusion import bifpn_fusion, bifpn_fusion_reference

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, C, *s, generator=g).to(device=device, dtype=dtype)
          .contiguous(memory_format=torch.channels_last).requires_grad_() for s in in_sizes]
    ew = torch.ones(len(xs), device=device, requires_grad=True)
    dw = (torch.randn(C, 1, 3, 3, generator=g) * 0.3).to(device).requires_grad_()
    grad = torch.randn(B, C, *out_size, generator=g).to(device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    params = [*xs, ew, dw]

    def run(fn):
        return lambda: torch.autograd.grad(fn(xs, modes, ew, dw, out_size, "fast", pool_padding), params, grad)

    providers = {
        "triton": run(lambda *a: bifpn_fusion(*a, backend="triton")),
        "reference": run(bifpn_fusion_reference),
    }
    if not quick:
        providers["compiled"] = run(torch.compile(bifpn_fusion_reference))
    node = _effdet_node(C, in_sizes, out_size, modes, dtype, device, pool_padding)
    if node is not None:
        def peer():
            out = node(xs)
            return torch.autograd.grad(out, xs, grad)
        providers["peer:effdet-eager"] = peer
    esz = xs[0].element_size()
    n_in = sum(x.numel() for x in xs)
    n_out = B * C * out_size[0] * out_size[1]
    # the minimum any implementation moves: fwd reads the inputs and writes out; bwd reads the output gradient
    # and writes the input gradients (the Triton kernels also write/read a float32 f and dL/df, and re-read
    # the inputs: that is their cost, not part of the minimum)
    bytes_moved = esz * (2 * n_in + 2 * n_out)
    return Case(op="bifpn_fusion", shape=label, providers=providers, bytes_moved=bytes_moved,
                setup=f"fwd+bwd, {len(xs)} inputs {modes} -> {(B, C, *out_size)}, {str(dtype).replace('torch.', '')}, "
                      f"channels_last, fast-normalized, {pool_padding} pool padding")


def cases(quick: bool, device) -> list[Case]:
    device = torch.device(device)
    if quick:
        return [_make("tiny P3 same+up", 2, 8, (8, 8), [(8, 8), (4, 4)], ("same", "up"), torch.float32, device, quick),
                _make("tiny P4 same+same+down", 2, 8, (4, 4), [(4, 4), (4, 4), (8, 8)], ("same", "same", "down"),
                      torch.float32, device, quick)]
    half = torch.float16 if device.type == "cuda" else torch.float32
    return [
        _make("D0 train b32 P3 64x64 same+up", 32, 64, (64, 64), [(64, 64), (32, 32)], ("same", "up"), half,
              device, quick),
        _make("D0 train b32 P4 32x32 same+same+down", 32, 64, (32, 32), [(32, 32), (32, 32), (64, 64)],
              ("same", "same", "down"), half, device, quick),
        _make("D4 train b8 P3 128x128 same+up", 8, 224, (128, 128), [(128, 128), (64, 64)], ("same", "up"), half,
              device, quick),
        _make("D4 train b8 P4 64x64 same+same+down (tf same pad)", 8, 224, (64, 64), [(64, 64), (64, 64), (128, 128)],
              ("same", "same", "down"), half, device, quick, pool_padding="same"),
    ]
