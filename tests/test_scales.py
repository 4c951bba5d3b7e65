import numpy as np
import pytest
import torch

from m3cli.matryoshka.policy import make_ladder
from m3cli.matryoshka.scales import (
    BudgetError,
    budget_to_scale,
    nested_scales,
    parse_budget,
    pool,
    pool_np,
    scale_sides,
)


def test_nested_scales_of_llava_grid():
    assert scale_sides(24) == [24, 12, 6, 3, 1]
    assert nested_scales(24) == [576, 144, 36, 9, 1]
    assert nested_scales(12) == [144, 36, 9, 1]
    assert nested_scales(7) == [49, 1]
    assert nested_scales(16) == [256, 64, 16, 4, 1]


@pytest.mark.parametrize(
    "budget,scale,rounded",
    [(576, 576, False), (1000, 576, True), (575, 144, True), (144, 144, False), (100, 36, True),
     (36, 36, False), (35, 9, True), (9, 9, False), (8, 1, True), (1, 1, False), ("36", 36, False)],
)
def test_budget_rounding_table(budget, scale, rounded):
    b = budget_to_scale(budget, 24)
    assert b.scale == scale
    assert b.rounded is rounded


@pytest.mark.parametrize("bad", [0, -3, 2.5, "abc", "", None, True, "9.5"])
def test_bad_budgets_are_errors(bad):
    with pytest.raises(BudgetError):
        parse_budget(bad)


def test_budget_error_is_a_usage_error_and_a_value_error():
    from m3cli.errors import UsageError

    with pytest.raises(UsageError, match="whole number") as err:
        parse_budget("abc")
    assert isinstance(err.value, ValueError) and err.value.exit_code == 2


@pytest.mark.parametrize("scale", [576, 144, 36, 9, 1])
def test_pool_shapes(scale):
    grid = torch.randn(576, 10)
    assert pool(grid, scale).shape == (scale, 10)
    assert pool(grid[None].repeat(3, 1, 1), scale).shape == (3, scale, 10)
    assert pool_np(grid.numpy(), scale).shape == (scale, 10)


def test_pool_exact_averages_on_hand_made_grid():
    # value of token (r, c) in channel 0 is r*24 + c; channel 1 is constant 7
    rc = torch.arange(576, dtype=torch.float64)
    grid = torch.stack([rc, torch.full_like(rc, 7.0)], dim=1)
    p9 = pool(grid, 9)  # 3x3 windows of 8x8
    # window (0,0): rows 0-7, cols 0-7 -> mean r = 3.5, mean c = 3.5 -> 3.5*24 + 3.5
    assert p9[0, 0].item() == pytest.approx(3.5 * 24 + 3.5)
    # window (2,1): rows 16-23 (mean 19.5), cols 8-15 (mean 11.5), row-major index 2*3+1
    assert p9[7, 0].item() == pytest.approx(19.5 * 24 + 11.5)
    assert torch.all(p9[:, 1] == 7.0)
    assert pool(grid, 1)[0, 0].item() == pytest.approx(rc.mean().item())
    p144 = pool(grid, 144)
    # 2x2 window at pooled (1, 2): rows 2-3, cols 4-5
    assert p144[1 * 12 + 2, 0].item() == pytest.approx(2.5 * 24 + 4.5)
    assert torch.equal(pool(grid, 576), grid)


@pytest.mark.parametrize("scale", [576, 144, 36, 9, 1])
def test_torch_and_numpy_agree(scale):
    grid = torch.randn(2, 576, 16)
    np.testing.assert_allclose(pool(grid, scale).numpy(), pool_np(grid.numpy(), scale), rtol=1e-5, atol=1e-6)


def test_pool_matches_repeated_2x2_then_3x3():
    # The paper describes repeated 2x2 pooling then 3x3; for disjoint windows it is one avg_pool2d.
    grid = torch.randn(576, 4)
    img = grid.T.reshape(1, 4, 24, 24)
    twice = torch.nn.functional.avg_pool2d(torch.nn.functional.avg_pool2d(img, 2), 2)
    assert torch.allclose(pool(grid, 36), twice.reshape(4, 36).T, atol=1e-6)


def test_pool_rejects_non_scales():
    with pytest.raises(ValueError):
        pool(torch.randn(576, 4), 100)
    with pytest.raises(ValueError):
        pool(torch.randn(575, 4), 1)


def test_pool_keeps_half_precision_dtype():
    grid = torch.randn(576, 8).to(torch.bfloat16)
    out = pool(grid, 9)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), pool(grid.float(), 9), atol=1e-2)


def test_ladder_with_cap():
    assert list(make_ladder(24)) == [1, 9, 36, 144, 576]  # scales.ladder was a copy of policy.make_ladder
    assert list(make_ladder(24, cap=100)) == [1, 9, 36]
