"""Shared comparison for the kernel tests: dtype-aware tolerances, first mismatches printed.

One rule for every op: a value's tolerance follows the *lowest-precision dtype it was computed from* (an
fp16 input's gradient is an fp16 quantity even when the kernel accumulates in fp32) and grows with the
square root of the number of terms accumulated into it (rounding errors of a sum of ``n`` terms grow like
``sqrt(n)`` on average).
"""
import math

import torch

TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


def tolerance(dtype: torch.dtype, n_accum: int = 1) -> tuple[float, float]:
    """``(rtol, atol)`` for a value computed from ``dtype`` inputs with ``n_accum`` accumulated terms."""
    rtol, atol = TOL[dtype]
    scale = math.sqrt(max(int(n_accum), 1))
    return rtol * scale, atol * scale


def lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype with the fewest mantissa bits among ``dtypes`` (bf16 < fp16 < fp32 < fp64)."""
    return min(dtypes, key=lambda d: torch.finfo(d).eps * -1)


def assert_close(actual, expected, rtol, atol, what):
    """Non-finite values exactly, finite ones within ``|a - e| <= atol + rtol * |e|``.

    Where either side is NaN or +-inf, both must hold the same: NaN where the expected value is NaN, an
    infinity of the same sign where it is infinite (a finite value, however large, never matches an
    infinity, and +inf never matches -inf). ``atol``: a number, or a tensor broadcast against the values (a
    tolerance per element)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    atol = atol.double().cpu() if torch.is_tensor(atol) else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = actual.isfinite() & expected.isfinite()
    # (inf - inf is NaN and |finite - inf| <= rtol * inf holds, so non-finite values never reach the formula)
    diff = torch.where(finite, actual - expected, 0.0).abs()
    within = diff <= atol + rtol * torch.where(finite, expected, 0.0).abs()
    same_special = (actual == expected) | (actual.isnan() & expected.isnan())   # inf == inf, same sign only
    bad = torch.where(finite, ~within, ~same_special)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [f"  at {i}: got {actual[tuple(i)].item():.9g}, expected {expected[tuple(i)].item():.9g}"
                 for i in idx]
        atol_s = f"{atol:.3g}" if not torch.is_tensor(atol) else f"per element, up to {atol.max().item():.3g}"
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(rtol {rtol}, atol {atol_s}; NaN and +-inf exactly); first:\n" + "\n".join(lines))
