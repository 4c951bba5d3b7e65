"""LLaVA-NeXT (1.6, anyres; HF and original layouts, and the M3 release): base crop plus tiles, one newline per row.

* Crops: the whole image squashed to the tower's size first, then the tiles of the image resized (aspect kept)
  and padded black to the best pinpoint, row-major (:func:`m3cli.families.anyres.anyres_crops`). The spec's
  ``anyres_flavour`` says whose arithmetic to follow: ``"hf"`` (transformers) or ``"original"``
  (haotian-liu/LLaVA, whose config pinpoints detection has already turned into ``(h, w)``).
* Visual tokens: M3 pools EVERY crop to the same per-crop scale ``s``; the base crop's ``s`` tokens come first,
  then the tiles' pooled grids arranged into one ``(tiles_high*side) x (tiles_wide*side)`` grid, unpadded
  against the original image ON THAT POOLED GRID, with the learned ``image_newline`` after each row
  (:func:`m3cli.families.anyres.pack_pooled_crops`). At ``s = 576`` this is transformers' ``pack_image_features``.
* Prompt: the spec's recipe, as for LLaVA-1.5 (``vicuna_v1`` for the Vicuna NeXT and the M3 release,
  ``mistral_instruct`` for the Mistral one, ``chatml_direct`` for the 34B, ``hf_template`` for llava-hf dirs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from m3cli.errors import ModelError
from m3cli.families import anyres
from m3cli.families.base import FamilyBase, flat_grid
from m3cli.families.prompts import PromptRecipe
from m3cli.families.spec import FamilySpec
from m3cli.matryoshka.scales import grid_side, nested_scales

FLAVOURS = ("hf", "original")


class LlavaNextFamily(FamilyBase):
    """The LLaVA-NeXT family: anyres crops, M3 pooling per crop, spatial_unpad packing with newlines."""

    def __init__(self, spec: FamilySpec, recipe: PromptRecipe | None = None):
        super().__init__(spec, recipe)
        if spec.preprocess != "anyres":
            raise ModelError(f"{spec.model_dir.name}: LLaVA-NeXT needs anyres preprocessing, not {spec.preprocess}")
        if not spec.grid_pinpoints:
            raise ModelError(f"{spec.model_dir.name}: LLaVA-NeXT without image_grid_pinpoints")
        flavour = spec.anyres_flavour or "hf"
        if flavour not in FLAVOURS:
            raise ModelError(f"{spec.model_dir.name}: unknown anyres flavour {flavour!r} (known: hf, original)")
        self.flavour: anyres.Flavour = flavour  # type: ignore[assignment]
        self.tile = spec.image.size
        self.pinpoints: list[anyres.HW] = anyres.pinpoints_hw(spec.grid_pinpoints)
        for h, w in self.pinpoints:
            if h % self.tile or w % self.tile:
                raise ModelError(f"{spec.model_dir.name}: pinpoint {h}x{w} is not a multiple of the "
                                 f"{self.tile}px tile")

    # -- geometry ------------------------------------------------------------------------------------------
    @property
    def grid(self) -> int | None:
        """Patches per side of one crop's grid (24 for CLIP-L/14 at 336), when the patch size is known."""
        return self.spec.image.grid_side

    def scales(self, grid: int | None = None) -> list[int]:
        """The per-crop nested scales, largest first (576, 144, 36, 9, 1 for a 24x24 grid)."""
        side = grid or self.grid
        if not side:
            raise ModelError(f"{self.spec.model_dir.name}: the tower's patch size is unknown")
        return nested_scales(side)

    def layout(self, image_hw: tuple[int, int]) -> anyres.Layout:
        """The anyres layout of an ``(h, w)`` image: best pinpoint and tile grid (``.crops`` = tiles + 1)."""
        return anyres.layout(image_hw, self.pinpoints, self.tile)

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """The base crop, then the tiles row-major; every crop is exactly the tower's size, RGB."""
        resample = Image.Resampling(self.spec.image.resample)
        return anyres.anyres_crops(image, self.pinpoints, self.tile, resample=resample)

    # -- tokens --------------------------------------------------------------------------------------------
    def visual_tokens(self, pooled_crops: Sequence[Any], *, image_hw: tuple[int, int] | None = None,
                      newline: Any = None) -> Any:
        """The LM's visual sequence ``(n, D)``: base crop tokens, then the unpadded tile grid, a newline per row.

        ``pooled_crops`` are the crops in :meth:`crops` order, each ``(s, D)`` or ``(side, side, D)`` at one
        per-crop scale. ``image_hw`` (the ORIGINAL image's (height, width)) and ``newline`` (``(D,)``, the
        model's learned ``image_newline``) are required: spatial_unpad always appends it.
        """
        if image_hw is None:
            raise ValueError("LLaVA-NeXT needs the original image's (height, width) to unpad the tile grid")
        if newline is None:
            raise ValueError("LLaVA-NeXT needs the model's image_newline embedding")
        lay = self.layout(image_hw)
        if len(pooled_crops) != lay.crops:
            raise ValueError(f"a {lay.tiles_high}x{lay.tiles_wide} layout has {lay.crops} crops, "
                             f"got {len(pooled_crops)}")
        flat = [flat_grid(c) for c in pooled_crops]
        sizes = {tuple(c.shape) for c in flat}
        if len(sizes) != 1:
            raise ValueError(f"every crop must be pooled to the same scale, got shapes {sorted(sizes)}")
        grid_side(flat[0].shape[0])  # a non-square count is not a pooled grid
        return anyres.pack_pooled_crops(flat[0], list(flat[1:]), lay.tiles_high, lay.tiles_wide, image_hw,
                                        newline, flavour=self.flavour)

    def n_visual_tokens(self, scale: int, *, image_hw: tuple[int, int] | None = None) -> int:
        """Tokens :meth:`visual_tokens` returns at per-crop ``scale``: base + unpadded tiles + one newline per row."""
        if image_hw is None:
            raise ValueError("LLaVA-NeXT's token count depends on the image size (image_hw)")
        return anyres.visual_token_count(image_hw, self.pinpoints, self.tile, int(scale), True, flavour=self.flavour)

    def max_visual_tokens(self, scale: int) -> int:
        """The most visual tokens any image can take at per-crop ``scale``: base crop, the largest pinpoint's tile
        grid kept whole (no unpadding) and its newlines; what a context must hold for every image."""
        return anyres.max_visual_token_count(self.pinpoints, self.tile, int(scale))

    def tokens_per_scale(self, image_hw: tuple[int, int], scales: Sequence[int] | None = None) -> dict[int, int]:
        """``{per-crop scale: total visual tokens}`` for one image (what ``--max-visual-tokens`` chooses from)."""
        return {s: self.n_visual_tokens(s, image_hw=image_hw) for s in (scales or self.scales())}

    def scale_within(self, total_cap: object, image_hw: tuple[int, int], scales: Sequence[int] | None = None) -> int:
        """The largest per-crop scale whose TOTAL visual tokens for this image fit ``total_cap``.

        Raises :class:`~m3cli.matryoshka.scales.BudgetError` (a UsageError) when even the smallest scale is over it.
        """
        return anyres.largest_scale_within(total_cap, image_hw, self.pinpoints, self.tile,
                                           tuple(scales or self.scales()), True, flavour=self.flavour)


def fallback_recipe(config: Mapping[str, Any]) -> str:
    """The conversation of a NeXT checkpoint's language model, for a directory without a chat template.

    From its ``config.json`` (HF ``text_config`` or the original top level): Mistral -> ``mistral_instruct``,
    the 34B's Yi/ChatML -> ``chatml_direct``, else ``vicuna_v1`` (what the original evaluation scripts use).
    Pass it to :func:`m3cli.families.detect_family` as ``fallback_recipe``.
    """
    text = config.get("text_config") or config
    names = [text.get("model_type"), text.get("_name_or_path"), *(text.get("architectures") or []),
             config.get("model_type"), *(config.get("architectures") or [])]
    words = set(re.split(r"[^a-z0-9]+", " ".join(str(v).lower() for v in names if v)))
    if any(w.startswith("mistral") for w in words):
        return "mistral_instruct"
    if "yi" in words or "hermes" in words:
        return "chatml_direct"
    return "vicuna_v1"

