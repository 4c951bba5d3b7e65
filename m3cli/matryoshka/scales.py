"""The M3 maths: nested scales of a square token grid, budgets, and pooling.

Pure functions, no model: M3 average-pools the projected G x G grid of visual tokens into
nested scales whose sides form the chain G, G/2, ... (while the side divides G) and 1.
For LLaVA-1.5 (G = 24) that is 576, 144, 36, 9 and 1 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from m3cli.errors import UsageError

if TYPE_CHECKING:  # torch is imported lazily so the maths stays usable without it
    import torch


class BudgetError(UsageError, ValueError):
    """A token budget that no scale can satisfy (not an integer, or below 1).

    Still a ValueError: the batch runner turns a bad per-item budget (a JSONL ``tokens``) into an error row
    by catching ValueError.
    """


def scale_sides(grid: int) -> list[int]:
    """Sides of the nested pooled grids, largest first: 24 -> [24, 12, 6, 3, 1].

    The chain halves the side while it stays a whole divisor of ``grid``, then ends at 1,
    which always divides. Every side divides ``grid``, so pooling windows never overlap.
    """
    if grid < 1:
        raise ValueError(f"grid side must be >= 1, got {grid}")
    sides = [grid]
    while sides[-1] % 2 == 0 and sides[-1] // 2 >= 1:
        sides.append(sides[-1] // 2)
    if sides[-1] != 1:
        sides.append(1)
    return sides


def nested_scales(grid: int = 24) -> list[int]:
    """Token counts of the nested scales, largest first: 24 -> [576, 144, 36, 9, 1]."""
    return [side * side for side in scale_sides(grid)]


def side_of(scale: int, grid: int) -> int:
    """The pooled grid side for a token count; raises ValueError if it is not a nested scale."""
    side = math.isqrt(scale)
    if side * side != scale or side not in scale_sides(grid):
        raise ValueError(f"{scale} is not a nested scale of a {grid}x{grid} grid ({nested_scales(grid)})")
    return side


@dataclass(frozen=True)
class Budget:
    """A requested token budget and the nested scale it resolved to."""

    requested: int
    scale: int

    @property
    def rounded(self) -> bool:
        return self.requested != self.scale


def parse_budget(value: object) -> int:
    """Validate a user budget: a whole number >= 1 (ints, or strings such as "36")."""
    if isinstance(value, bool):
        raise BudgetError(f"token budget must be a whole number >= 1, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    else:
        raise BudgetError(f"token budget must be a whole number >= 1, got {value!r}")
    if number < 1:
        raise BudgetError(f"token budget must be >= 1, got {number}")
    return number


def budget_to_scale(budget: object, grid: int = 24) -> Budget:
    """Map a budget to the largest nested scale <= budget: 100 -> 36, 576 -> 576, 5000 -> 576."""
    requested = parse_budget(budget)
    for scale in nested_scales(grid):
        if scale <= requested:
            return Budget(requested=requested, scale=scale)
    raise BudgetError(f"token budget {requested} is below the smallest scale 1")  # unreachable: 1 <= n


def grid_side(n_tokens: int) -> int:
    """Side of a square token grid; raises ValueError for a non-square count."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} visual tokens do not form a square grid")
    return side


# ``pool`` and ``pool_np`` are deliberate twins: the torch backend pools tensors on the model's device (and the
# trainer needs gradients through the pool), while the llama.cpp backend reads the grid back as a NumPy array
# and must work in an install without torch. tests/test_scales.py checks that they agree.


def pool(grid: torch.Tensor, scale: int) -> torch.Tensor:
    """Average-pool projected visual tokens to ``scale`` tokens (torch).

    ``grid`` is ``(N, D)`` or ``(B, N, D)`` with N = G*G in row-major order (as the vision
    tower emits patches). Returns ``(scale, D)`` or ``(B, scale, D)``. This is M3's
    ``avg_pool2d`` with kernel = stride = G / side, applied after the projector.
    """
    import torch.nn.functional as F

    squeeze = grid.dim() == 2
    batch = grid.unsqueeze(0) if squeeze else grid
    b, n, d = batch.shape
    g = grid_side(n)
    side = side_of(scale, g)
    if side == g:
        pooled = batch
    else:
        k = g // side
        image = batch.transpose(1, 2).reshape(b, d, g, g)
        # float32 accumulation keeps bf16/fp16 grids from losing precision in the mean
        pooled_img = F.avg_pool2d(image.float(), kernel_size=k, stride=k).to(batch.dtype)
        pooled = pooled_img.reshape(b, d, side * side).transpose(1, 2)
    return pooled[0] if squeeze else pooled


def pool_np(grid: np.ndarray, scale: int) -> np.ndarray:
    """NumPy twin of :func:`pool` for backends without torch (e.g. llama.cpp)."""
    squeeze = grid.ndim == 2
    batch = grid[None] if squeeze else grid
    b, n, d = batch.shape
    g = grid_side(n)
    side = side_of(scale, g)
    if side == g:
        pooled = batch
    else:
        k = g // side
        blocks = batch.reshape(b, side, k, side, k, d).astype(np.float64)
        pooled = blocks.mean(axis=(2, 4)).reshape(b, side * side, d).astype(batch.dtype)
    return pooled[0] if squeeze else pooled


def budget_note(tokens: int | None, grid: int) -> str | None:
    """The note for a ``--tokens`` budget that is not itself a nested scale (None when it is, or unset)."""
    if tokens is None:
        return None
    budget = budget_to_scale(tokens, grid)
    if not budget.rounded:
        return None
    return f"--tokens {budget.requested} rounded down to {budget.scale}, the largest nested scale <= it"
