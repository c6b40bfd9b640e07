"""Compiled-code evidence, no GPU needed: every Triton kernel variant that one EfficientDet-D0 training step
(forward, loss, backward, EMA update) and one inference pass (model + decode_topk + batched_nms) launch,
at 128 x 128 and 128 x 256 px (D0 sizes must be multiples of 128; the second keeps the interpreter run
short), batch 2, on the Triton path, compiled for sm_90 and sm_80 with the real Triton compiler.

Asserted: at most 24 distinct variants (one size, and both sizes together: a new input size must not
compile new kernels), no spills (cuobjdump STACK 0 and LOCAL 0), at most 255 registers, every compile under
20 CPU seconds on this machine. A failure lists the offending variants. ``python bench/kernels.py --static`` prints the
same evidence as a table. Compile results are cached (``bench/static.py``), so only changed kernels are
compiled again.
"""
import os

import pytest
import torch

from bench import static as st

SIZES = (128, (128, 256))
BATCH = 2
COMPILE_TIMEOUT_S = 25.0   # CPU seconds: a variant still compiling then has failed the 20 s limit anyway


@pytest.fixture(scope="module")
def captures():
    return st.cached_d0_captures(SIZES, BATCH, (SIZES[0],))


@pytest.fixture(scope="module")
def compiled(captures):
    variants = st.union(captures.values())
    return st.rows(st.compile_variants(variants, st.ARCHS, workers=2, timeout=COMPILE_TIMEOUT_S))


def _listing(variants) -> str:
    return "\n".join(f"  {v.qualname} ({v.launches} launches): {v.summary()}" for v in variants)


if st.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["skip"])
    def _probe_kernel(x_ptr, y_ptr, n, one, skip, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n + one + skip
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * scale, mask=m)


@pytest.mark.skipif(not st.triton_importable(), reason="needs triton")
def test_launch_specialization_mirrors_a_cuda_launch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(64, device=device)
    y = torch.zeros(64, device=device)
    with st.capture_launches() as cap:
        _probe_kernel[(1,)](x, y, 32, 1, 48, 2.0, BLOCK=32)          # aligned pointers, n % 16 == 0
        _probe_kernel[(1,)](x[1:], y, 33, 1, 7, 2.0, BLOCK=32)        # misaligned x, n % 16 != 0
        _probe_kernel[(1,)](x, y, 48, 1, 5, 3.0, BLOCK=32)            # same variant as the first
    assert cap.launches == 3 and not cap.errors, cap.errors
    assert len(cap.variants) == 2, _listing(cap.variants.values())
    first, second = cap.variants.values()
    assert first.launches == 2 and second.launches == 1
    names = list(first.signature)
    const = {names[p[0]]: v for p, v in first.constexprs}
    div = {names[p[0]] for p, a in first.attrs if a == [["tt.divisibility", 16]]}
    assert const == {"one": 1, "BLOCK": 32}                          # an int equal to 1 becomes a constant
    assert first.signature["x_ptr"] == "*fp32" and first.signature["scale"] == "fp32"
    assert first.signature["skip"] == "i32"
    assert div == {"x_ptr", "y_ptr", "n"}                            # skip is do_not_specialize: no D16
    div2 = {names[p[0]] for p, a in second.attrs if a}
    assert div2 == {"y_ptr"}
    assert first.options["num_warps"] == 4 and first.options["num_stages"] == 3
    assert first.elems_per_program == 32
    assert first.max_bytes == 2 * 64 * 4 and first.max_elems == 64


def test_no_launch_failed_to_specialize(captures):
    for size, cap in captures.items():
        assert cap.launches > 0, f"{st.size_label(size)} px: no Triton launch recorded (is the Triton path on?)"
        assert not cap.errors, f"{st.size_label(size)} px:\n" + "\n".join(cap.errors)


def test_at_most_24_variants_at_one_size(captures):
    cap = captures[SIZES[0]]
    assert len(cap.variants) <= st.MAX_VARIANTS, (
        f"{len(cap.variants)} kernel variants (> {st.MAX_VARIANTS}) for one D0 train step + inference at "
        f"{SIZES[0]} px:\n" + _listing(st.union([cap])))


def test_a_second_size_compiles_nothing_new(captures):
    variants = st.union(captures.values())
    first = set(captures[SIZES[0]].variants)
    new = [v for v in variants if v.key() not in first]
    assert len(variants) <= st.MAX_VARIANTS, (
        f"{len(variants)} variants over {', '.join(map(st.size_label, SIZES))} px (> {st.MAX_VARIANTS}); the "
        f"{len(new)} that only {st.size_label(SIZES[1])} px launches:\n" + _listing(new))


def test_variants_compile_without_spills_fast_and_within_255_registers(compiled):
    assert compiled, "nothing compiled"
    bad = st.problems(compiled, max_regs=st.MAX_REGS, max_compile_s=st.MAX_COMPILE_S)
    assert not bad, f"{len(bad)} problems in {len(compiled)} compiles (variant x arch):\n" + "\n".join(bad)


@pytest.mark.skipif(not st.triton_importable(), reason="needs triton")
def test_probe_kernel_compiles_and_its_cubin_is_read(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("real CUDA present: the D0 tests compile on the GPU's own toolchain")
    x = torch.zeros(64)
    with st.capture_launches() as cap:
        _probe_kernel[(1,)](x, x, 32, 1, 48, 2.0, BLOCK=32)
    results = st.compile_variants(list(cap.variants.values()), archs=(90, 80), workers=1, timeout=60,
                                  cache_dir=tmp_path)
    assert [r["arch"] for r in results] == [90, 80]
    for r in results:
        assert r["error"] is None, r["error"]
        assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["local"] == 0, r
        assert r["sass"] > 10 and r["compile_s"] > 0 and not r["cached"]
    assert len(list(tmp_path.glob("*.json"))) == 2                      # cached on disk
    again = st.compile_variants(list(cap.variants.values()), archs=(90,), workers=1, cache_dir=tmp_path)
    assert again[0]["cached"] and again[0]["regs"] == results[0]["regs"]
    rows = st.rows(results)
    assert rows[0]["sass_per_elem"] == pytest.approx(rows[0]["sass"] / 32)
    assert rows[0]["bytes_per_elem"] == pytest.approx(64 * 4 / 64)     # x passed twice is counted once
    from rich.console import Console
    console = Console(width=250, record=True)
    st.print_table(rows, "probe", console)
    text = console.export_text()
    assert "_probe_kernel" in text and "sm_90" in text and "sm_80" in text and "per tile" in text


def test_problems_name_each_offence():
    base = {"kernel": "k", "variant": "v", "arch": "sm_90", "error": None, "stack": 0, "local": 0, "regs": 40,
            "compile_s": 1.0}
    assert st.problems([base]) == []
    bad = st.problems([dict(base, stack=16), dict(base, local=8, arch="sm_80"), dict(base, regs=256),
                       dict(base, compile_s=25.0), dict(base, error="timeout: compile took more than 60 CPU s")])
    assert len(bad) == 5
    assert "spills (STACK 16 B" in bad[0] and bad[1].startswith("sm_80 k [v]: spills")
    assert "256 registers > 255" in bad[2] and "25.0 s >= 20 s" in bad[3] and "timeout" in bad[4]
