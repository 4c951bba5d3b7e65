"""Image decoding: any Pillow-readable file, bytes or stream to a fully loaded RGB image.

EXIF orientation is applied, every mode (alpha, palette, 16-bit, float, CMYK) becomes RGB, decompression
bombs are refused above ``Image.MAX_IMAGE_PIXELS`` and damaged files become a one-line MediaError.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m3cli.errors import MediaError, describe
from m3cli.media.files import AVIF_EXTS, HEIF_EXTS, check_readable_file

log = logging.getLogger(__name__)

# Catch-all for decoder failures on damaged files; Pillow and its plugins raise a mix of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError)

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

# ISO-BMFF brands (bytes 8..12, after "ftyp") of HEIF/HEIC and AVIF files, to spot them whatever their name.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_PLUGINS: dict[str, bool] = {}


def _container_kind(name: str, head: bytes) -> str | None:
    """``"heif"`` or ``"avif"`` for a file of that family (by its ftyp brand, else its extension), else None."""
    if head[4:8] == b"ftyp":
        if head[8:12] in _AVIF_BRANDS:
            return "avif"
        if head[8:12] in _HEIF_BRANDS:
            return "heif"
    ext = os.path.splitext(name)[1].lower()
    return "avif" if ext in AVIF_EXTS else "heif" if ext in HEIF_EXTS else None


def _ensure_decoder(kind: str | None, name: str) -> None:
    """Make sure Pillow can open a HEIF or AVIF image (registering a plugin once), or say what to install."""
    if kind is None or _PLUGINS.get(kind):
        return
    from PIL import features

    if kind == "avif" and features.check("avif"):
        _PLUGINS[kind] = True
        return
    try:
        if kind == "heif":
            import pillow_heif

            pillow_heif.register_heif_opener()
        else:
            import pillow_avif  # noqa: F401 - registers itself with Pillow
    except ImportError:
        need = "the pillow-heif package (pip install 'm3cli[heif]')" if kind == "heif" else \
            "Pillow >= 11.3 built with AVIF (pip install -U pillow) or pillow-avif-plugin"
        raise MediaError(f"{name}: a {kind.upper()} image, which needs {need}") from None
    _PLUGINS[kind] = True


def _bomb_error(name: str, exc: BaseException | None, pixels: int | None = None) -> MediaError:
    if pixels is None and exc is not None:
        m = _BOMB_PIXELS.search(str(exc))
        pixels = int(m.group(1)) if m else None
    n = str(pixels) if pixels is not None else "?"
    return MediaError(f"{name}: refused, image too large ({n} pixels > {Image.MAX_IMAGE_PIXELS})")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale high-bit-depth single-channel images (I;16*, I, F) to 8-bit without clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        # Full 16-bit range maps onto 0..255 with rounding: 65535 -> 255, 32768 -> 128.
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
    else:
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0  # float images in [0, 1] are the common convention
        elif im.mode == "I" and lo >= 0 and hi <= 255:
            scaled = a  # already 8-bit values stored in 32-bit ints
        elif im.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = a * (255.0 / 65535.0)  # 16-bit data that Pillow widened to "I"
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))  # arbitrary range: stretch rather than clip
        else:
            scaled = np.zeros_like(a)
        out = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # convert() returns a fresh copy even for RGB input, so the result never references a file.
    return im.convert("RGB")


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes], max_side: int = 2048
) -> Image.Image:
    """Decode an image to a fully loaded RGB ``PIL.Image`` whose longer side is at most ``max_side``.

    Raises MediaError (one line, naming the file) for anything that is not a readable, sane image.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = bytes(path_or_bytes)
        if not data:
            raise MediaError(f"{name}: empty input")
        return _decode_image(io.BytesIO(data), name, max_side)
    if hasattr(path_or_bytes, "read"):
        name = str(getattr(path_or_bytes, "name", "<stream>"))
        return _decode_image(path_or_bytes, name, max_side)  # type: ignore[arg-type]

    name = os.fspath(path_or_bytes)  # type: ignore[arg-type]
    check_readable_file(name)
    try:
        fh = open(name, "rb")  # closed by the with-block below
    except IsADirectoryError:
        raise MediaError(f"{name}: is a directory, not a file") from None
    except PermissionError:
        raise MediaError(f"{name}: permission denied") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot open ({describe(e)})") from None
    with fh:
        return _decode_image(fh, name, max_side)


def _decode_image(fh: IO[bytes], name: str, max_side: int) -> Image.Image:
    head = b""
    try:
        if getattr(fh, "seekable", lambda: False)():
            head = fh.read(16)
            fh.seek(0)
    except (OSError, ValueError, AttributeError):
        head = b""
    _ensure_decoder(_container_kind(name, head), name)
    try:
        # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; we refuse above 1x.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(name, e) from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not a recognised image format") from None
    except _DECODE_ERRORS as e:
        raise MediaError(f"{name}: cannot read image ({describe(e)})") from None

    with im:
        w, h = im.size
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            raise _bomb_error(name, None, w * h)  # belt and braces if a plugin skipped the check
        try:
            if im.format == "JPEG" and max(w, h) > max_side:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: far cheaper than full decode + resize.
                s = max_side / max(w, h)
                im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_error(name, e) from None
        except _DECODE_ERRORS as e:
            raise MediaError(f"{name}: corrupt or truncated image ({describe(e)})") from None

        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception as e:  # broken EXIF must not cost us an otherwise good image
            log.debug("%s: ignoring unusable EXIF orientation: %s", name, e)
            oriented = im
        try:
            rgb = _to_rgb(oriented)
        except (ValueError, OSError) as e:
            raise MediaError(f"{name}: unsupported image mode {im.mode} ({describe(e)})") from None

    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb
