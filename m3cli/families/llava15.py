"""LLaVA-1.5 (HF and original layouts, and the M3 release): one crop, a flat row-major token grid.

* Crops: one, the ``pad`` or ``crop`` tower image (:func:`m3cli.families.preprocess.tower_image`).
* Visual tokens: the crop's pooled ``side x side`` grid flattened row-major, as the tower emits patches and
  M3's ``avg_pool2d`` keeps them: ``n = s``, no newline tokens.
* Prompt: the spec's recipe (``hf_template`` for llava-hf directories, ``vicuna_v1`` for original
  checkpoints and their conversions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from m3cli.families.base import FamilyBase, flat_grid
from m3cli.families.preprocess import tower_image


class Llava15Family(FamilyBase):
    """The LLaVA-1.5 family."""

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """One crop: the image padded (or centre-cropped) and resized to the tower's size."""
        return [tower_image(image, self.spec)]

    def visual_tokens(self, pooled_crops: Sequence[Any], *, image_hw: tuple[int, int] | None = None,
                      newline: Any = None) -> Any:
        """The single crop's pooled grid as ``(s, D)`` row-major (a ``(side, side, D)`` grid is flattened)."""
        if len(pooled_crops) != 1:
            raise ValueError(f"LLaVA-1.5 takes one crop per image, got {len(pooled_crops)}")
        return flat_grid(pooled_crops[0])

    def n_visual_tokens(self, scale: int, *, image_hw: tuple[int, int] | None = None) -> int:
        """``scale``: one token per pooled cell, no newlines."""
        return int(scale)
