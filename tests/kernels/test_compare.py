"""The shared comparison itself: NaN and +-inf compared exactly, finite values within the tolerance."""
import pytest
import torch

from .compare import assert_close

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("actual,expected", [
    ([INF], [-INF]), ([-INF], [INF]),          # infinities of opposite sign
    ([1.0], [INF]), ([-1.0], [-INF]),          # a finite value where an infinity is expected
    ([3e38], [INF]), ([1e300], [INF]),         # however large
    ([INF], [1.0]), ([-INF], [-3e38]),         # an infinity where a finite value is expected
    ([NAN], [INF]), ([INF], [NAN]),            # NaN and inf are different
    ([NAN], [1.0]), ([1.0], [NAN]),
    ([0.0, INF, 2.0], [0.0, INF, 2.5]),        # one finite mismatch beside a matching infinity
])
def test_mismatches_are_reported(actual, expected):
    with pytest.raises(AssertionError, match="differ"):
        assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                     1e-5, 1e-6, "case")


def test_mismatch_with_a_per_element_tolerance():
    with pytest.raises(AssertionError, match="differ"):
        assert_close(torch.tensor([1.0, INF]), torch.tensor([1.0, -INF]), 1e-5, torch.tensor([1e-6, 1e3]), "case")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_are_accepted(dtype):
    actual = torch.tensor([INF, -INF, NAN, 1.0 + 1e-7, 0.0, -2.0], dtype=torch.float64).to(dtype)
    expected = torch.tensor([INF, -INF, NAN, 1.0, 5e-7, -2.0], dtype=torch.float64).to(dtype)
    assert_close(actual, expected, 1e-5, 1e-6, "case")
    assert_close(actual, expected, 1e-5, torch.full((6,), 1e-6), "case, per-element atol")
