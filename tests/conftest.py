"""Test set-up shared by the whole suite.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before ``triton``
is first imported, so it happens here, at the top of the first file pytest imports.
"""
import os

try:  # decide before anything imports triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EFFDET_KERNEL_BACKEND", "auto")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("EFFDET_RUN_SLOW", "0") not in ("", "0")
    skip_slow = pytest.mark.skip(reason="slow test: set EFFDET_RUN_SLOW=1 to run it")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none present); runs automatically on a CUDA machine")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def cuda_device():
    if not _HAS_CUDA:
        pytest.skip("needs a CUDA GPU (none present)")
    return torch.device("cuda")
