"""Compile Triton kernels for a Hopper GPU (sm_90) with the real Triton compiler, without a GPU.

Used by the kernel tests: it catches code that the interpreter accepts but the compiler rejects. A thin
front of ``bench/static.py`` (the one ahead-of-time compile helper: worker subprocess without
``TRITON_INTERPRET``, a timeout, results cached by kernel source).
"""
import pytest
import torch

from bench import static as st


def aot_compile(module, specs, arch: int = 90, timeout: float = 300.0):
    """``specs``: ``[(kernel name, {arg: triton type}, {constexpr arg: value}), ...]`` of ``module``."""
    if torch.cuda.is_available():
        pytest.skip("real CUDA present: the cuda-marked tests compile and run the kernels")
    variants = [st.Variant.from_spec(module, name, sig, const) for name, sig, const in specs]
    results = st.compile_variants(variants, archs=(arch,), workers=1, timeout=timeout)
    errors = [f"{r['variant'].qualname} [{r['variant'].summary()}]: {r['error']}" for r in results if r.get("error")]
    if errors and all("ptxas" in e.lower() and "not found" in e.lower() for e in errors):
        pytest.skip("this Triton cannot compile ahead of time here: " + errors[0][-300:])
    assert not errors, "\n".join(errors)
