"""How many visual embeddings a request gives the language model, and the largest scale under a total cap.

Shared by both backends (the count is the family's, not the backend's): LLaVA-1.5 gives the per-crop scale
itself; LLaVA-NeXT gives the base crop, the unpadded tile grid and one newline per row, which depends on the
image's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from m3cli.matryoshka.scales import budget_to_scale


def visual_token_count(family: Any, scale: int, image_hw: tuple[int, int] | None = None) -> int:
    """Visual embeddings at per-crop ``scale`` for an ``(h, w)`` image; without ``image_hw`` the most any image
    can take (LLaVA-NeXT: the pinpoint whose tile grid, kept whole, is the largest)."""
    if family.spec.family != "llavanext":
        return int(scale)
    if image_hw is not None:
        return family.n_visual_tokens(scale, image_hw=image_hw)
    return family.max_visual_tokens(scale)


def scale_within(family: Any, max_visual_tokens: int, image_hw: tuple[int, int] | None, scales: Sequence[int],
                 grid_side: int) -> int:
    """The largest per-crop scale whose total visual tokens for this image fit ``max_visual_tokens``
    (``--max-visual-tokens``); raises :class:`~m3cli.matryoshka.scales.BudgetError` when none does."""
    if family.spec.family != "llavanext":
        return budget_to_scale(max_visual_tokens, grid_side).scale
    return family.scale_within(max_visual_tokens, image_hw, scales)
