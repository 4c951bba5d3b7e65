"""LLaVA-NeXT "anyres" maths with M3 pooling per crop: layout, crops, unpadding, packing, token counts.

Pure functions, no model and no transformers. Every size here is ``(height, width)``, as in
transformers (``image_sizes``, ``image_grid_pinpoints``); use :func:`image_hw` for a PIL image, whose
``.size`` is ``(width, height)``.

Two reference implementations exist and differ in two small ways, selected by ``flavour``:

- ``"hf"``: transformers' ``LlavaNextForConditionalGeneration`` / ``LlavaNextImageProcessor``. Pinpoints
  are ``[height, width]``; ``unpad_image`` computes the kept side as ``int(round(x, 7))``.
- ``"original"``: haotian-liu/LLaVA ``llava/mm_utils.py`` + ``llava_arch.py`` (and its M3 fork, which only
  adds the per-crop pool). Pinpoints are read as ``[width, height]`` (convert them with
  :func:`pinpoints_hw` ``order="wh"``); ``unpad_image`` truncates with ``int(x)``.

The arithmetic of the best-resolution choice, the aspect-kept resize (``ceil``), the centred black
padding, the row-major tiles and the squashed base crop is the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from m3cli.matryoshka.scales import BudgetError, grid_side, parse_budget

Flavour = Literal["hf", "original"]
HW = tuple[int, int]

# LLaVA-1.6's pinpoints as its configs store them. The list is symmetric, so it is the same set of
# resolutions read as (h, w) or (w, h), but the ORDER differs, and the order breaks ties (see select_best_resolution).
V16_PINPOINTS: tuple[HW, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

NESTED_SCALES: tuple[int, ...] = (576, 144, 36, 9, 1)

BLACK = (0, 0, 0)
# CLIP's mean as LLaVA-1.5's "pad" mode writes it: tuple(int(x * 255) for x in image_mean). Neither anyres
# implementation pads with it; it is here for experiments (pad_color=CLIP_MEAN_RGB).
CLIP_MEAN_RGB = (122, 116, 104)


def image_hw(image: Image.Image) -> HW:
    """``(height, width)`` of a PIL image (whose ``.size`` is ``(width, height)``)."""
    return image.height, image.width


def pinpoints_hw(pinpoints: Iterable[Sequence[int]], order: Literal["hw", "wh"] = "hw") -> list[HW]:
    """Config pinpoints as ``(height, width)`` pairs, in their config order.

    ``order="wh"`` is for the original LLaVA code's configs (``llava_llama``), which read each pair as
    ``(width, height)``: swapping each pair (and keeping the order) makes every function here choose the
    resolution that code chooses, ties included. An HF conversion of such a config should store the swapped list.
    """
    out: list[HW] = []
    for pair in pinpoints:
        a, b = (int(v) for v in pair)
        if a < 1 or b < 1:
            raise ValueError(f"pinpoint sides must be >= 1, got {list(pair)}")
        out.append((a, b) if order == "hw" else (b, a))
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    return out


def select_best_resolution(image_size: HW, pinpoints: Iterable[Sequence[int]]) -> HW:
    """The ``(h, w)`` pinpoint keeping most of the image after an aspect-kept downscale; ties: least waste.

    ``image_size`` and ``pinpoints`` are ``(height, width)``. The effective resolution is the area of the
    image scaled to fit the pinpoint (sides truncated with ``int``), capped at the original area, so
    upscaling earns nothing; the waste is the pinpoint area minus that. The first pinpoint wins an exact tie.
    """
    height, width = _check_size(image_size)
    best: HW | None = None
    best_effective = 0
    best_waste = math.inf
    for cand_h, cand_w in pinpoints_hw(pinpoints):
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_h, cand_w), effective, waste
    assert best is not None  # the first candidate always wins against nothing (its waste beats inf)
    return best


@dataclass(frozen=True)
class Layout:
    """Where an image's anyres crops come from: the chosen resolution and its tile grid."""

    best_hw: HW
    tiles_high: int
    tiles_wide: int

    @property
    def tiles(self) -> int:
        return self.tiles_high * self.tiles_wide

    @property
    def crops(self) -> int:
        """Crops through the tower: the base image and every tile."""
        return self.tiles + 1


def layout(image_size: HW, pinpoints: Iterable[Sequence[int]], tile_size: int) -> Layout:
    """The anyres layout of an ``(h, w)`` image: best resolution and ``tiles_high x tiles_wide`` tiles."""
    if tile_size < 1:
        raise ValueError(f"tile size must be >= 1, got {tile_size}")
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    # Both references cut tiles with range(0, side, tile) but reshape features with side // tile; they only
    # agree when the pinpoints are whole multiples of the tile, so anything else is refused here.
    if best_h % tile_size or best_w % tile_size:
        raise ValueError(f"pinpoint {best_h}x{best_w} is not a multiple of the {tile_size}px tile")
    return Layout((best_h, best_w), best_h // tile_size, best_w // tile_size)


def grid_shape(image_size: HW, pinpoints: Iterable[Sequence[int]], tile_size: int) -> HW:
    """``(tiles_high, tiles_wide)``: transformers' ``get_anyres_image_grid_shape`` for an ``(h, w)`` image."""
    lay = layout(image_size, pinpoints, tile_size)
    return lay.tiles_high, lay.tiles_wide


def crop_count(image_size: HW, pinpoints: Iterable[Sequence[int]], tile_size: int) -> int:
    """Crops the tower encodes (tiles + base): transformers' ``image_size_to_num_patches``."""
    return layout(image_size, pinpoints, tile_size).crops


def fit_size(image_size: HW, target: HW) -> HW:
    """``(h, w)`` of the image resized to fit ``target`` with its aspect kept (the free side rounded up)."""
    height, width = _check_size(image_size)
    target_h, target_w = target
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_crops(
    image: Image.Image,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    *,
    pad_color: tuple[int, int, int] = BLACK,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> list[Image.Image]:
    """The crops the model encodes, in its order: the base image first, then the tiles row-major.

    The image is resized to fit the best resolution (aspect kept), pasted centred on a ``pad_color``
    canvas of that resolution (both references pad black; the odd pixel of padding goes right/bottom) and
    cut into ``tile_size`` squares. The base crop is the whole image squashed to ``tile_size`` square (aspect
    NOT kept) in both references; the CLIP resize + centre crop that follows is then a no-op. PIL bicubic
    is what the original code and transformers' PIL backend (``LlavaNextImageProcessorPil``, also what
    ``LlavaNextImageProcessor`` falls back to without torchvision) use: the crops equal its pixels exactly.
    Its torchvision backend resizes tensors with torch's bicubic instead, so pixels may differ slightly
    there. Returns RGB uint8 images.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    lay = layout(image_hw(rgb), pinpoints, tile_size)
    best_h, best_w = lay.best_hw
    new_h, new_w = fit_size(image_hw(rgb), lay.best_hw)
    canvas = Image.new("RGB", (best_w, best_h), tuple(pad_color))
    canvas.paste(rgb.resize((new_w, new_h), resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
    tiles = [
        canvas.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, best_h, tile_size)
        for left in range(0, best_w, tile_size)
    ]
    return [rgb.resize((tile_size, tile_size), resample), *tiles]


def unpad_bounds(grid_hw: HW, image_size: HW, flavour: Flavour = "hf") -> tuple[slice, slice]:
    """Rows and columns of a padded feature grid that hold the image, as ``(row_slice, col_slice)``.

    ``grid_hw`` is the merged grid (``tiles_high * side``, ``tiles_wide * side``), ``image_size`` the
    ORIGINAL image's ``(h, w)``. The band of padding along the longer-than-needed side is removed, the same
    amount from both ends (so an odd remainder keeps one extra row or column). ``flavour`` picks the
    rounding of the kept side: ``"hf"`` ``int(round(x, 7))``, ``"original"`` ``int(x)``.
    """
    height, width = _check_size(image_size)
    cur_h, cur_w = grid_hw
    if width / height > cur_w / cur_h:
        kept = _kept(height * (cur_w / width), flavour)
        pad = (cur_h - kept) // 2
        return slice(pad, cur_h - pad), slice(0, cur_w)
    kept = _kept(width * (cur_h / height), flavour)
    pad = (cur_w - kept) // 2
    return slice(0, cur_h), slice(pad, cur_w - pad)


def unpadded_shape(grid_hw: HW, image_size: HW, flavour: Flavour = "hf") -> HW:
    """``(rows, cols)`` left of a ``grid_hw`` grid after :func:`unpad_bounds`."""
    rows, cols = unpad_bounds(grid_hw, image_size, flavour)
    return rows.stop - rows.start, cols.stop - cols.start


def unpad(grid: Any, image_size: HW, *, channels_first: bool = True, flavour: Flavour = "hf") -> Any:
    """Remove the padding rows/columns of a ``(C, H, W)`` (or ``(H, W, C)``) tensor or array; a view."""
    if channels_first:
        rows, cols = unpad_bounds((grid.shape[1], grid.shape[2]), image_size, flavour)
        return grid[:, rows, cols]
    rows, cols = unpad_bounds((grid.shape[0], grid.shape[1]), image_size, flavour)
    return grid[rows, cols]


def pack_pooled_crops(
    pooled_base: Any,
    pooled_tiles: Any,
    tiles_high: int,
    tiles_wide: int,
    image_size: HW,
    image_newline: Any = None,
    *,
    flavour: Flavour = "hf",
) -> Any:
    """The LM's visual sequence ``(N, D)`` from pooled crops: base tokens, then the unpadded tile grid.

    ``pooled_base`` is ``(s, D)``; ``pooled_tiles`` is ``(tiles, s, D)`` or a list of ``(s, D)`` in row-major
    tile order; each crop's tokens are its ``side x side`` pooled grid, row-major (side = sqrt(s)). The
    tiles are merged into one ``(tiles_high*side, tiles_wide*side)`` grid, unpadded against the original
    ``(h, w)`` ON THAT POOLED GRID, and ``image_newline`` (``(D,)``; None for none) is appended after each
    row. Works on torch tensors (autograd kept) and on NumPy arrays (no torch needed).
    """
    is_np = isinstance(pooled_base, np.ndarray)
    if isinstance(pooled_tiles, (list, tuple)):
        tiles = np.stack(pooled_tiles) if is_np else _torch().stack(list(pooled_tiles))
    else:
        tiles = pooled_tiles
    n, s, dim = tiles.shape
    if n != tiles_high * tiles_wide:
        raise ValueError(f"{n} tiles do not fill a {tiles_high}x{tiles_wide} layout")
    if tuple(pooled_base.shape) != (s, dim):
        raise ValueError(f"base crop {tuple(pooled_base.shape)} does not match tiles of {(s, dim)}")
    side = grid_side(s)
    # (th, tw, side, side, D) -> (th, side, tw, side, D): row r of tile row i is grid row i*side + r
    blocks = tiles.reshape(tiles_high, tiles_wide, side, side, dim)
    blocks = blocks.transpose(0, 2, 1, 3, 4) if is_np else blocks.permute(0, 2, 1, 3, 4)
    grid = blocks.reshape(tiles_high * side, tiles_wide * side, dim)
    grid = unpad(grid, image_size, channels_first=False, flavour=flavour)
    if image_newline is not None:
        rows = grid.shape[0]
        if is_np:
            newline = np.broadcast_to(np.asarray(image_newline, dtype=grid.dtype), (rows, 1, dim))
            grid = np.concatenate([grid, newline], axis=1)
        else:
            newline = image_newline.to(device=grid.device, dtype=grid.dtype).expand(rows, 1, dim)
            grid = _torch().cat([grid, newline], dim=1)
    flat = grid.reshape(-1, dim)
    if is_np:
        return np.concatenate([pooled_base, flat], axis=0)
    return _torch().cat([pooled_base, flat], dim=0)


def visual_token_count(
    image_size: HW,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    s: int,
    newline: bool = True,
    *,
    flavour: Flavour = "hf",
) -> int:
    """Visual tokens the LM receives for an ``(h, w)`` image at ``s`` tokens per crop.

    ``s`` (base crop) + the unpadded pooled tile grid + one newline per kept row. A 2x2 layout with no
    padding to remove (e.g. a 672x672 image on LLaVA-1.6's pinpoints) gives 2928 / 744 / 192 / 51 / 7 at
    s = 576 / 144 / 36 / 9 / 1, and the paper's 2880 / 720 / 180 / 45 / 5 with ``newline=False``.
    """
    side = grid_side(s)
    lay = layout(image_size, pinpoints, tile_size)
    rows, cols = unpadded_shape((lay.tiles_high * side, lay.tiles_wide * side), image_size, flavour)
    return s + rows * cols + (rows if newline else 0)


def max_visual_token_count(pinpoints: Iterable[Sequence[int]], tile_size: int, s: int, newline: bool = True) -> int:
    """The most visual tokens any image can take at ``s`` per crop: the base crop plus the largest pinpoint's
    tile grid kept whole (unpadding only removes rows or columns) and its newlines; what a context must hold."""
    side = grid_side(s)
    return max(s + (h // tile_size) * (w // tile_size) * s + ((h // tile_size) * side if newline else 0)
               for h, w in pinpoints_hw(pinpoints))


def largest_scale_within(
    total_cap: object,
    image_size: HW,
    pinpoints: Iterable[Sequence[int]],
    tile_size: int,
    scales: Sequence[int] = NESTED_SCALES,
    newline: bool = True,
    *,
    flavour: Flavour = "hf",
) -> int:
    """The largest per-crop scale whose total visual tokens for this image fit ``total_cap``.

    For ``--max-visual-tokens``: the cap is on everything the LM receives (base, tiles, newlines).
    Raises :class:`~m3cli.matryoshka.scales.BudgetError` when even the smallest scale does not fit.
    """
    cap = parse_budget(total_cap)
    pins = pinpoints_hw(pinpoints)
    totals = {s: visual_token_count(image_size, pins, tile_size, s, newline, flavour=flavour) for s in scales}
    for s in sorted(scales, reverse=True):
        if totals[s] <= cap:
            return s
    smallest = min(scales)
    raise BudgetError(
        f"a cap of {cap} visual tokens is below the {totals[smallest]} this image needs at {smallest} per crop"
    )


def _kept(value: float, flavour: Flavour) -> int:
    if flavour == "hf":
        return int(round(value, 7))  # transformers rounds first so 47.9999999 counts as 48
    if flavour == "original":
        return int(value)
    raise ValueError(f"flavour must be 'hf' or 'original', got {flavour!r}")


def _check_size(size: Sequence[int]) -> HW:
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return height, width


def _torch() -> Any:
    import torch

    return torch
