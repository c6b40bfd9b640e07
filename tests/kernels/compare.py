"""Shared comparison for the kernel tests: design.md section 5 tolerances, first mismatches printed."""
import torch

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def assert_close(actual, expected, rtol, atol, what):
    """Elementwise ``|a - e| <= atol + rtol * |e|``, NaN only where the expected value is NaN."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad &= ~(actual.isnan() & expected.isnan())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [f"  at {i}: got {actual[tuple(i)].item():.9g}, expected {expected[tuple(i)].item():.9g}"
                 for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(rtol {rtol}, atol {atol}); first:\n" + "\n".join(lines))
