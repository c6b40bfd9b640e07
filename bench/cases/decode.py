"""Benchmark cases for kernels.decode_boxes and kernels.decode_topk (post-processing)."""
from __future__ import annotations

import torch

from bench.harness import Case


def _anchors(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 200 + 4
    return torch.cat([xy, xy + wh], 1).to(device)


def _effdet():
    try:
        import effdet.anchors as ea
        import effdet.bench as eb
        return ea, eb
    except Exception:
        return None, None


def _boxes_case(label, batch, n, dtype, device, quick):
    from kernels.decode import decode_boxes, decode_boxes_reference

    g = torch.Generator().manual_seed(1)
    deltas = (torch.randn(batch, n, 4, generator=g) * 0.5).to(device=device, dtype=dtype)
    anchors = _anchors(n, device)
    hw = (512, 512)
    providers = {"triton": lambda: decode_boxes(deltas, anchors, hw, backend="triton"),
                 "reference": lambda: decode_boxes_reference(deltas, anchors, hw)}
    if not quick:
        compiled = torch.compile(decode_boxes_reference)
        providers["compiled"] = lambda: compiled(deltas, anchors, hw)
    ea, _ = _effdet()
    if ea is not None:   # effdet decodes yxyx anchors, one (M, 4) batch, no clamp/clip
        anchors_yxyx = anchors[:, [1, 0, 3, 2]].repeat(batch, 1)
        flat = deltas.reshape(-1, 4).float()
        providers["peer:effdet"] = lambda: ea.decode_box_outputs(flat, anchors_yxyx, output_xyxy=True)
    m = batch * n
    return Case(op="decode_boxes", shape=label, providers=providers,
                bytes_moved=m * 4 * deltas.element_size() + n * 16 + m * 16,
                setup=f"deltas {tuple(deltas.shape)} {str(dtype).replace('torch.', '')}, clip to {hw}")


def _topk_case(label, batch, n, classes, k, dtype, device, quick):
    from kernels.decode import decode_topk, decode_topk_reference

    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(batch, n, classes, generator=g) * 2 - 4).to(device=device, dtype=dtype)
    deltas = (torch.randn(batch, n, 4, generator=g) * 0.5).to(device=device, dtype=dtype)
    anchors = _anchors(n, device)
    providers = {"triton": lambda: decode_topk(logits, deltas, anchors, k, backend="triton"),
                 "reference": lambda: decode_topk_reference(logits, deltas, anchors, k)}
    if not quick:
        compiled = torch.compile(decode_topk_reference)
        providers["compiled"] = lambda: compiled(logits, deltas, anchors, k)
    ea, eb = _effdet()
    if eb is not None:
        anchors_yxyx = anchors[:, [1, 0, 3, 2]]
        cls_l = [logits.reshape(batch, n * classes, 1, 1)]
        box_l = [deltas.reshape(batch, n * 4, 1, 1)]

        def peer_fn():   # effdet's top-k selection + its per-image decode + sigmoid
            cls_top, box_top, idx, cls_idx = eb._post_process(cls_l, box_l, 1, classes, max_detection_points=k)
            out = [ea.decode_box_outputs(box_top[b].float(), anchors_yxyx[idx[b]], output_xyxy=True)
                   for b in range(batch)]
            return out, cls_top.float().sigmoid(), cls_idx
        providers["peer:effdet"] = peer_fn
    kk = min(k, n * classes)
    return Case(op="decode_topk", shape=label, providers=providers,
                bytes_moved=logits.numel() * logits.element_size()
                + batch * kk * (4 * deltas.element_size() + 16 + 16 + 4 + 8 + 8),
                setup=f"logits {tuple(logits.shape)} {str(dtype).replace('torch.', '')}, k={k}, no clip")


def cases(quick: bool, device) -> list[Case]:
    device = torch.device(device)
    if quick:
        return [_boxes_case("tiny 2x500", 2, 500, torch.float32, device, quick),
                _topk_case("tiny 2x200x10 k=50", 2, 200, 10, 50, torch.float32, device, quick)]
    return [_boxes_case("D0 infer b8 512px", 8, 49104, torch.float32, device, quick),
            _boxes_case("D4 infer b8 1024px", 8, 196416, torch.float32, device, quick),
            _topk_case("D0 infer b8 512px k=5000", 8, 49104, 90, 5000, torch.float32, device, quick),
            _topk_case("D0 infer b8 512px k=5000 fp16", 8, 49104, 90, 5000, torch.float16, device, quick),
            _topk_case("D4 infer b8 1024px k=5000 fp16", 8, 196416, 90, 5000, torch.float16, device, quick)]
