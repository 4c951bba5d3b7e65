"""The exact square bitmap the vision tower sees, shared by both backends, and its normalisation.

``tower_image`` does the geometry on uint8 PIL images as transformers' CLIP image processor (PIL backend)
does; afterwards the torch backend only rescales and normalises (:func:`pixel_array`) and llama.cpp gets a
bitmap of exactly the tower's size (its own resize and crop are then no-ops; mtmd only normalises).

* ``pad`` (``image_aspect_ratio: pad``, haotian-liu/LLaVA ``mm_utils.expand2square``): the image pasted on a
  square of ``tuple(int(x * 255) for x in image_mean)`` whose side is the longer edge, at
  ``(0, (w - h) // 2)`` when wide and ``((h - w) // 2, 0)`` when tall; then the CLIP path below (the resize
  makes it exactly ``size`` x ``size``, the crop is a no-op). transformers' ``LlavaImageProcessor(do_pad=True)``
  pads with the same colour and offsets (``pad_to_square``).
* ``crop`` (CLIP's default): the short side resized to ``shortest_edge`` with the long side
  ``int(shortest_edge * long / short)`` (truncated, not rounded: 300x480 becomes 336x537), bicubic on the uint8
  image, then a centre crop at ``((h - size) // 2, (w - size) // 2)``; a side shorter than the crop is
  zero-padded first as transformers' ``center_crop`` does.
"""

from __future__ import annotations

from math import ceil

import numpy as np
from PIL import Image

from m3cli.families.spec import FamilySpec, ImageSpec


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """The original LLaVA's ``expand2square``: centre ``image`` on a square of ``color`` (the longer side)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def resize_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after CLIP's shortest-edge resize: the long side follows with ``int()``."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def clip_resize_crop(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """CLIP's resize (shortest edge, or straight to ``size`` x ``size``) and centre crop to ``size``."""
    if spec.shortest_edge is not None:
        new = resize_size(image.width, image.height, spec.shortest_edge)
    else:
        new = (spec.size, spec.size)
    if new != image.size:
        image = image.resize(new, resample=Image.Resampling(spec.resample))
    return center_crop(image, spec.size)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """transformers' ``center_crop`` to ``size`` x ``size`` (zero-padded first where a side is shorter)."""
    w, h = image.size
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:
        return image if (w, h) == (size, size) else image.crop((left, top, left + size, top + size))
    arr = np.asarray(image)
    new_h, new_w = max(size, h), max(size, w)
    canvas = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    pad_top, pad_left = ceil((new_h - h) / 2), ceil((new_w - w) / 2)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = arr
    top, left = top + pad_top, left + pad_left
    out = canvas[max(0, top):min(new_h, top + size), max(0, left):min(new_w, left + size)]
    return Image.fromarray(np.ascontiguousarray(out))


def tower_image(image: Image.Image, spec: FamilySpec | ImageSpec, mode: str | None = None) -> Image.Image:
    """The RGB uint8 ``size`` x ``size`` image the vision tower sees (``pad`` or ``crop``).

    ``spec`` is the model's :class:`FamilySpec` (its ``preprocess`` is the mode) or an :class:`ImageSpec` with
    ``mode`` given. ``anyres`` images are cut into several crops by the NeXT family instead.
    """
    if isinstance(spec, FamilySpec):
        mode = mode or spec.preprocess
        spec = spec.image
    if image.mode != "RGB":
        raise ValueError(f"tower_image needs an RGB image, got mode {image.mode}")
    if mode == "pad":
        image = expand_to_square(image, spec.pad_color)
    elif mode != "crop":
        raise ValueError(f"tower_image: preprocessing {mode!r} is not pad or crop")
    return clip_resize_crop(image, spec)


def pixel_array(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """``(3, H, W)`` float32 pixels of a tower image, rescaled and normalised bit-for-bit as transformers does.

    (``rescale``: float64 multiply, then float32; ``normalize``: float32 ``(x - mean) / std``.)
    """
    arr = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    out: np.ndarray = arr.astype(np.float32)
    if spec.do_rescale:
        out = (arr.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        mean = np.array(spec.mean, dtype=np.float32)
        std = np.array(spec.std, dtype=np.float32)
        out = ((out.T - mean) / std).T
    return np.ascontiguousarray(out, dtype=np.float32)
