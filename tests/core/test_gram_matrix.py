"""The Gramian every gradient method reads: float64, symmetric, and exact to the product's
precision whatever the rows' dtype and magnitude (``mtopt.core.gradients.gram_matrix``)."""

from __future__ import annotations

import pytest
import torch

from mtopt.core.gradients import gram_matrix


def _reference(rows: torch.Tensor) -> torch.Tensor:
    r = rows.double().reshape(rows.shape[0], -1)
    return r @ r.T


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scales", [(1.0, 100.0, 3000.0), (1e-20, 1.0, 1e20), (1e-30, 1e30, 1.0)])
def test_no_overflow_no_underflow(dtype, scales):
    gen = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    rows = torch.randn(3, 500, generator=gen, dtype=torch.float64) * torch.tensor(scales)[:, None]
    rows = rows.clamp(-info.max / 2, info.max / 2).to(dtype)  # representable in the dtype
    rows = rows[torch.isfinite(rows).all(dim=1) & (rows.abs().amax(dim=1) > 0)]
    M = gram_matrix(rows)
    ref = _reference(rows)
    assert M.dtype == torch.float64
    assert torch.equal(M, M.T)
    work = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = 500 * work * torch.outer(ref.diagonal().sqrt(), ref.diagonal().sqrt())
    assert bool(((M - ref).abs() <= bound).all())


def test_the_common_case_is_the_plain_product():
    rows = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    direct = (rows @ rows.T).double()
    torch.testing.assert_close(gram_matrix(rows), 0.5 * (direct + direct.T), rtol=0, atol=0)


def test_zero_rows_stay_exactly_zero_and_tiny_rows_are_not_zero():
    rows = torch.zeros(3, 10)
    rows[1] = 1.0
    rows[2] = 1e-30  # squares underflow float32 (1e-60), the row is not zero
    M = gram_matrix(rows)
    assert M[0].abs().sum() == 0
    assert M[:, 0].abs().sum() == 0
    assert M[2, 2].item() == pytest.approx(10 * 1e-60, rel=1e-6)


def test_non_finite_rows_give_a_non_finite_gramian():
    rows = torch.ones(2, 4)
    rows[1, 2] = float("nan")
    assert not bool(torch.isfinite(gram_matrix(rows)).all())
