"""Comparing floating-point results: bitwise where the project promises it, a dtype-fitted tolerance elsewhere.

The rule (tests/README.md says why):
- Same inputs, same shapes, same process, or an exact resume: the project promises bitwise equality, so
  compare with `torch.equal` (or `==`).
- Results computed from *different* inputs or shapes (other batch rows changed, another length, chunked vs
  whole, another process count, another thread count): BLAS and the vectorised kernels do not promise the same
  rounding, so compare with `assert_rounding_close`, whose tolerance is fitted to the dtype.
"""
import torch

# Relative tolerance per dtype: a few hundred to a few thousand units in the last place, far above what
# reordered sums of the tiny test models lose (float64: ~1e-15 observed) and far below any modelling error
# a test looks for (>= 1e-4 in the tests that use it).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rounding_tolerance(expected: torch.Tensor) -> float:
    """The largest difference accepted between `expected` and a result of the same quantity computed from
    other inputs or shapes: RTOL of the dtype times the largest magnitude in `expected` (rounding of a sum
    scales with the size of its terms, not of each element, so a value near 0 gets the same absolute slack)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return RTOL[expected.dtype] * max(scale, 1.0)


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """`actual` equals `expected` up to rounding (see the module docstring for when to use it)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    tol = rounding_tolerance(expected)
    diff = (actual.detach() - expected.detach()).abs().max().item() if expected.numel() else 0.0
    assert diff <= tol, f"{what}: differs by {diff:.3g} > {tol:.3g} ({expected.dtype} rounding tolerance)"


def moved_beyond_rounding(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """True when `actual` differs from `expected` by more than the rounding tolerance (a real change)."""
    return (actual.detach() - expected.detach()).abs().max().item() > rounding_tolerance(expected)
