"""What ``--fast-decode`` buys: image decoding plus each family's crops, exact against reduced JPEG decoding.

Photo-like JPEGs of the given sizes are written procedurally (the same bytes for a size on every machine with
the same Pillow) into a temporary directory. For each size and each preprocessing at the real geometry (CLIP
ViT-L/14 at 336 px: LLaVA-1.5 ``pad`` and ``crop``, LLaVA-NeXT ``anyres`` with LLaVA-1.6's pinpoints), one
timed run is :func:`m3cli.media.open_image` plus the family's ``crops``, with the default options (the
recipe's pixels) or with ``fast_decode``; the two are interleaved run by run so that a change in the machine's
load hits both alike. The difference is taken over the normalised pixels the tower receives, every crop.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from m3cli.errors import UsageError

log = logging.getLogger(__name__)

# 12, 24 and 48 MP: a phone photo, an APS-C and a high-resolution camera
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((4032, 3024), (6000, 4000), (8000, 6000))
JPEG_QUALITY = 90
PREPROCESSING = ("LLaVA-1.5 pad", "LLaVA-1.5 crop", "LLaVA-NeXT anyres")


@dataclass(frozen=True)
class Spread:
    """Milliseconds of repeated runs: median, min and max."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)


@dataclass(frozen=True)
class DecodeRow:
    """One JPEG through one preprocessing, decoded exactly and with ``--fast-decode``."""

    width: int
    height: int
    file_bytes: int
    preprocessing: str
    crops: int
    decode_scale: float | None       # None: --fast-decode left this image whole
    exact: Spread
    fast: Spread
    max_abs: float                   # over the normalised pixels of every crop
    mean_abs: float
    changed: float                   # share of those values that differ

    @property
    def speedup(self) -> float:
        return self.exact.median / self.fast.median


@dataclass(frozen=True)
class DecodeReport:
    rows: list[DecodeRow]
    warm_up: int
    repeat: int
    load_before: tuple[float, float, float] | None
    load_after: tuple[float, float, float] | None
    machine: str = ""  # the machine line at the start (m3cli.bench.stats.machine_words)


def check_sizes(sizes: Sequence[tuple[int, int]]) -> None:
    """Refuse, in one line, a size ``open_image`` would refuse (decompression-bomb limit) or cannot be a JPEG."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    for w, h in sizes:
        if max(w, h) > 65_500:
            raise UsageError(f"--sizes {w}x{h}: a JPEG side is at most 65500 px")
        if limit is not None and w * h > limit:
            raise UsageError(f"--sizes {w}x{h}: {w * h} pixels is above the decoder's limit ({limit})")


def photo_jpeg(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    """Write a deterministic photo-like ``width`` x ``height`` JPEG (quality 90, 4:2:0): smooth colour regions,
    mid-scale texture and fine grain, so the entropy-coded size per pixel is that of a busy photograph."""
    import numpy as np
    from PIL import Image, ImageChops

    rng = np.random.default_rng(seed)

    def noise(w: int, h: int, bands: int) -> Image.Image:
        arr = rng.integers(0, 256, size=(h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
        return Image.fromarray(arr, "RGB" if bands > 1 else "L")

    # colour regions: a coarse random field blown up smoothly (skies, walls, out-of-focus areas)
    base = noise(max(2, width // 160), max(2, height // 160), 3).resize((width, height), Image.Resampling.BICUBIC)
    # texture at a few pixels' scale (foliage, fabric), centred on zero
    texture = noise(max(2, width // 3), max(2, height // 3), 1).resize((width, height), Image.Resampling.BILINEAR)
    # sensor grain: one random tile repeated (a whole-image random array would cost seconds and gigabytes)
    tile = noise(251, 241, 1)
    grain = Image.new("L", (width, height))
    for y in range(0, height, tile.height):
        for x in range(0, width, tile.width):
            grain.paste(tile, (x, y))
    detail = Image.blend(texture, grain, 0.3)
    detail = Image.merge("RGB", (detail, detail, detail))
    # base + (detail - 128) / 4: detail of +-32 levels on the smooth colours
    image = ImageChops.add(base, ImageChops.multiply(detail, Image.new("RGB", (width, height), (64, 64, 64))),
                           scale=1.0, offset=-32)
    out = Path(path)
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out


def _families() -> dict[str, Callable]:
    """Each preprocessing's ``crops`` at the real geometry: CLIP ViT-L/14-336 and LLaVA-1.6's pinpoints."""
    from m3cli.families import FamilySpec, family_for
    from m3cli.families.anyres import V16_PINPOINTS
    from m3cli.families.original_layout import KNOWN_TOWERS

    clip = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]

    def spec(family: str, preprocess: str, **extra) -> FamilySpec:
        return FamilySpec(name=f"{family}-bench", family=family, layout="hf", preprocess=preprocess,  # type: ignore[arg-type]
                          image=clip, prompt_recipe="vicuna_v1", model_dir=Path("bench-decode"),
                          architecture="bench", **extra)

    made = [family_for(spec("llava15", "pad")), family_for(spec("llava15", "crop")),
            family_for(spec("llavanext", "anyres", grid_pinpoints=V16_PINPOINTS, anyres_flavour="hf"))]
    return {name: fam.crops for name, fam in zip(PREPROCESSING, made, strict=True)}


def _difference(exact: list, fast: list) -> tuple[float, float, float]:
    """Max and mean absolute difference and the share of differing values, over the normalised crops."""
    import numpy as np

    from m3cli.families import pixel_array
    from m3cli.families.original_layout import KNOWN_TOWERS

    clip = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
    if len(exact) != len(fast):
        return float("nan"), float("nan"), float("nan")  # a different crop layout: not comparable value by value
    a = np.stack([pixel_array(c, clip) for c in exact])
    b = np.stack([pixel_array(c, clip) for c in fast])
    diff = np.abs(a - b)
    return float(diff.max()), float(diff.mean()), float(np.count_nonzero(diff) / diff.size)


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def decode_comparison(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, repeat: int = 5,
                      warm_up: int = 1) -> DecodeReport:
    """Time default decoding against ``--fast-decode`` (each with every preprocessing's crops) per JPEG size."""
    from m3cli.media import ImageOptions, open_image

    check_sizes(sizes)
    families = _families()
    exact_opts, fast_opts = ImageOptions(), ImageOptions(fast_decode=True)
    from m3cli.bench.stats import machine_words

    machine = machine_words("1 decode thread", "cpu")  # Pillow decodes and resizes one image on one core
    load_before = _load()
    rows: list[DecodeRow] = []
    with tempfile.TemporaryDirectory(prefix="m3-bench-decode-") as tmp:
        for i, (w, h) in enumerate(sizes):
            path = photo_jpeg(Path(tmp) / f"photo-{w}x{h}.jpg", w, h, seed=i)
            for name, crops_of in families.items():
                log.info("bench decode: %dx%d, %s", w, h, name)

                def run(options: ImageOptions, crops_of=crops_of, path=path) -> tuple[float, list, float | None]:
                    start = time.perf_counter()
                    picture = open_image(path, options)
                    crops = crops_of(picture.image)
                    return (time.perf_counter() - start) * 1000, crops, picture.decode_scale

                for _ in range(warm_up):
                    run(exact_opts)
                    run(fast_opts)
                exact_ms, fast_ms = [], []
                for _ in range(repeat):  # interleaved: load changes during the run hit both paths alike
                    ms, exact_crops, _ = run(exact_opts)
                    exact_ms.append(ms)
                    ms, fast_crops, scale = run(fast_opts)
                    fast_ms.append(ms)
                max_abs, mean_abs, changed = _difference(exact_crops, fast_crops)
                rows.append(DecodeRow(w, h, path.stat().st_size, name, len(exact_crops), scale,
                                      Spread(tuple(exact_ms)), Spread(tuple(fast_ms)), max_abs, mean_abs, changed))
    return DecodeReport(rows, warm_up, repeat, load_before, _load(), machine)
