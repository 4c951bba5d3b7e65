"""Image files of every kind a user brings, made at run time, and the recipe's own pixels for them.

The reference is written here from the original LLaVA code's steps, without ``m3cli``: every entry point opens an
image as ``Image.open(path).convert("RGB")`` (no EXIF orientation, alpha dropped, no resize), then LLaVA-1.5 pads
it to a square of the CLIP mean colour (``expand2square``) or CLIP crops it, and LLaVA-NeXT cuts its anyres crops
(``reference_next.reference_crops``). Images are procedural (high-frequency patterns, so any extra resampling
shows) and few: the large ones take a second or two each to write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import reference_llava15 as ref
import reference_next as rn
from PIL import Image

ORIENTATION = 0x0112


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 image with detail at every scale and no symmetry (a flip or turn shows)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * 3 + y + seed * 17) % 256
    g = ((x // 5) * 29 + (y // 3) * 13 + (x * y) // 97) % 256
    b = np.where((x // 40 + y // 25) % 2 == 0, (x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1))
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def exif_jpeg(folder: Path, orientation: int, size: tuple[int, int] = (60, 36)) -> Path:
    """An RGB JPEG whose EXIF says to show it turned (``orientation`` 1..8)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = folder / f"exif-{orientation}.jpg"
    Image.fromarray(pattern(*size, seed=orientation)).save(path, exif=exif, quality=92)
    return path


def rgba_png(folder: Path, size: tuple[int, int] = (70, 40)) -> Path:
    """RGBA: opaque, half-transparent and fully transparent areas, with colours stored under all of them."""
    rgb = pattern(*size, seed=3)
    w, h = size
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3] = 0
    alpha[:, w // 3: 2 * w // 3] = 128
    alpha[h // 2:, 2 * w // 3:] = 37
    path = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return path


def la_png(folder: Path, size: tuple[int, int] = (50, 30)) -> Path:
    """Grey with alpha (LA)."""
    grey = pattern(*size, seed=4)[..., 0]
    alpha = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
    path = folder / "la.png"
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(path)
    return path


def palette_png(folder: Path, size: tuple[int, int] = (45, 64)) -> Path:
    """A palette image whose index 0 is transparent (its stored colour is dark red)."""
    index = (pattern(*size, seed=5)[..., 1] % 16).astype(np.uint8)
    im = Image.fromarray(index, "P")
    palette = [120, 0, 0] + [c for i in range(1, 256) for c in (i * 15 % 256, i * 40 % 256, 255 - i * 9 % 256)]
    im.putpalette(palette)
    path = folder / "palette.png"
    im.save(path, transparency=0)
    return path


def gray16_png(folder: Path, size: tuple[int, int] = (40, 52)) -> Path:
    """16-bit grey over the whole 0..65535 range (most of it above 255)."""
    w, h = size
    values = (np.arange(w * h, dtype=np.int64).reshape(h, w) * 65535 // (w * h - 1)).astype(np.uint16)
    values[0, :8] = [0, 1, 100, 200, 255, 256, 300, 65535]
    path = folder / "gray16.png"
    Image.fromarray(values).save(path)
    return path


def cmyk_file(folder: Path, fmt: str, size: tuple[int, int] = (48, 30)) -> Path:
    """A CMYK JPEG or TIFF."""
    c, m, y = (pattern(*size, seed=6)[..., i] for i in range(3))
    k = np.tile(np.linspace(0, 120, size[0]).astype(np.uint8), (size[1], 1))
    path = folder / f"cmyk.{'jpg' if fmt == 'JPEG' else 'tif'}"
    Image.fromarray(np.dstack([c, m, y, k]), "CMYK").save(path, format=fmt)
    return path


def large_file(folder: Path, width: int, height: int, fmt: str) -> Path:
    """A large PNG or JPEG (fast settings: these are written in every run)."""
    path = folder / f"large-{width}x{height}.{'png' if fmt == 'PNG' else 'jpg'}"
    im = Image.fromarray(pattern(width, height, seed=width % 97))
    if fmt == "PNG":
        im.save(path, compress_level=1)
    else:
        im.save(path, quality=90)
    return path


# (name, maker): the small kinds, every EXIF orientation, and three large images (old pre-shrink threshold 2048)
LARGE_SIZES = ((3000, 1100, "PNG"), (2049, 3000, "JPEG"), (8000, 2049, "JPEG"))


def small_cases(folder: Path) -> dict[str, Path]:
    """Every small image kind, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {f"exif-{n}": exif_jpeg(folder, n) for n in range(2, 9)}
    out |= {"rgba": rgba_png(folder), "la": la_png(folder), "palette": palette_png(folder),
            "gray16": gray16_png(folder), "cmyk-jpeg": cmyk_file(folder, "JPEG"),
            "cmyk-tiff": cmyk_file(folder, "TIFF")}
    return out


def large_cases(folder: Path) -> dict[str, Path]:
    """The large images, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    return {f"{fmt.lower()}-{w}x{h}": large_file(folder, w, h, fmt) for w, h, fmt in LARGE_SIZES}


# --------------------------------------------------------------------------- the recipe's pixels


def recipe_image(path) -> Image.Image:
    """What every original LLaVA entry point feeds: ``Image.open(path).convert('RGB')``."""
    return Image.open(path).convert("RGB")


def tower_uint8(image: Image.Image, mean, size: int, *, pad: bool) -> np.ndarray:
    """LLaVA-1.5's tower image as uint8 ``(size, size, 3)``: ``expand2square`` with the mean colour (``pad``),
    CLIP's bicubic short-side resize (long side ``int()``-truncated), centre crop."""
    img = image
    if pad:
        img = ref.expand2square(img, ref.mean_background(mean))
    img = img.resize(ref.clip_resize_size(*img.size, size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def next_crops_uint8(image: Image.Image, pinpoints, order: str, tile: int) -> list[np.ndarray]:
    """LLaVA-NeXT's crops (base first, then the tiles) as uint8 ``(tile, tile, 3)`` arrays."""
    crops, _ = rn.reference_crops(image, pinpoints, order, tile)
    return [np.asarray(c) for c in crops]


def normalise(arr: np.ndarray, mean, std) -> np.ndarray:
    """``(3, H, W)`` float32: /255, minus the mean, over the std (CLIP's processor)."""
    x = arr.astype(np.float64) / 255.0
    x = (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return x.astype(np.float32).transpose(2, 0, 1)
