"""Image decoding: any Pillow-readable file, bytes or stream to the RGB image a model's recipe starts from.

By default the pixels are exactly those of the original LLaVA code, ``Image.open(path).convert("RGB")``: the
image as stored (an EXIF orientation is not applied), every mode converted as Pillow converts it (alpha
dropped, so the colours stored under transparent pixels show; 16-bit and float values clipped to 0..255; CMYK
by Pillow's formula), at its full size (the family's own resize is the only one). What a user may ask for
instead is an :class:`ImageOptions`: ``upright`` (turn by the EXIF orientation first), ``alpha_background``
(composite transparency onto a colour first) and ``fast_decode`` (large JPEGs decoded by libjpeg at 1/2, 1/4
or 1/8 scale: faster, different pixels). :func:`open_image` returns the image with what was done to it
(:meth:`Picture.fields`, the rows' ``upright`` / ``alpha`` / ``decode_scale``); :class:`ImageNotes` tells a
run once about inputs whose EXIF orientation or transparency the recipe ignores.

Decompression bombs are refused above ``Image.MAX_IMAGE_PIXELS`` (never resized), and damaged files become a
one-line MediaError.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image, ImageColor, UnidentifiedImageError

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




# --------------------------------------------------------------------------------------------------------
# what a user may ask for instead of the recipe's pixels
# --------------------------------------------------------------------------------------------------------

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that shows the image upright (the EXIF table Pillow's exif_transpose uses)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# --fast-decode keeps the short side at least this long: more than any LLaVA input needs (LLaVA-1.6's largest
# pinpoint side is 1008 px; LLaVA-1.5 needs 336 on the long side (pad) or the short side (crop)).
FAST_DECODE_MIN_SIDE = 1008

# the row fields that say what was done to an image's pixels (see Picture.fields)
PIXEL_FIELDS = ("upright", "alpha", "decode_scale")


def parse_colour(text: str) -> tuple[int, int, int]:
    """A colour name (the CSS names: ``white``, ``black``, ``grey``...) or ``#rgb`` / ``#rrggbb`` as ``(r, g, b)``.

    Raises ValueError (one line) for anything else, and for a colour with its own transparency.
    """
    value = str(text).strip()
    try:
        rgb = ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(f"unknown colour {text!r} (use a name such as white or black, or #rrggbb)") from None
    if len(rgb) != 3:
        raise ValueError(f"colour {text!r} has its own transparency; give an opaque one (#rrggbb)")
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def colour_hex(rgb: tuple[int, int, int]) -> str:
    """``(r, g, b)`` as ``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass(frozen=True)
class ImageOptions:
    """How a user's image becomes pixels, when not exactly as the model's original code opens it.

    The default (every field off) is the recipe: ``Image.open(p).convert("RGB")``. ``upright``: turn the image
    by its EXIF orientation first. ``alpha_background``: composite transparent pixels onto this colour first
    (``(r, g, b)``, or a name / ``#rrggbb`` string, parsed here). ``fast_decode``: decode a large JPEG at 1/2,
    1/4 or 1/8 scale (libjpeg's DCT scaling) while its short side stays >= ``FAST_DECODE_MIN_SIDE``; faster,
    but the pixels differ from the recipe's. Picklable and hashable: it crosses to Ray workers as it is.
    """

    upright: bool = False
    alpha_background: tuple[int, int, int] | None = None
    fast_decode: bool = False

    def __post_init__(self) -> None:
        colour = self.alpha_background
        if isinstance(colour, str):
            colour = parse_colour(colour)
        elif colour is not None:
            colour = tuple(int(c) for c in colour)
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise ValueError(f"alpha_background must be (r, g, b) in 0..255, got {self.alpha_background!r}")
        object.__setattr__(self, "alpha_background", colour)
        object.__setattr__(self, "upright", bool(self.upright))
        object.__setattr__(self, "fast_decode", bool(self.fast_decode))

    @property
    def exact(self) -> bool:
        """Whether every image gets exactly the recipe's pixels (no option on)."""
        return not (self.upright or self.alpha_background is not None or self.fast_decode)

    def record(self) -> dict[str, Any]:
        """The options that are on, for a run's record (``{}`` by default, so older records still match)."""
        out: dict[str, Any] = {}
        if self.upright:
            out["upright"] = True
        if self.alpha_background is not None:
            out["alpha_background"] = colour_hex(self.alpha_background)
        if self.fast_decode:
            out["fast_decode"] = True
        return out


EXACT = ImageOptions()


@dataclass(frozen=True)
class Picture:
    """A decoded image and what was done to it.

    ``orientation``: the EXIF orientation as stored (1 when absent or already upright); ``transparent``: some
    pixel is not opaque; ``upright`` / ``alpha_background`` / ``decode_scale``: what the options did to it.
    """

    image: Image.Image
    orientation: int = 1
    transparent: bool = False
    upright: bool = False
    alpha_background: tuple[int, int, int] | None = None
    decode_scale: float | None = None

    def fields(self) -> dict[str, Any]:
        """The row fields (:data:`PIXEL_FIELDS`).

        ``upright``: None (nothing to turn), True (turned by its EXIF orientation), False (it has one, not
        applied: the model saw the pixels as stored). ``alpha``: None (every pixel opaque), ``"dropped"`` (the
        recipe's conversion dropped the transparency), or the ``#rrggbb`` it was composited onto.
        ``decode_scale``: None (full decode), else the JPEG's reduced decode scale (``--fast-decode``).
        """
        alpha = None
        if self.transparent:
            alpha = colour_hex(self.alpha_background) if self.alpha_background is not None else "dropped"
        return {"upright": None if self.orientation == 1 else self.upright, "alpha": alpha,
                "decode_scale": self.decode_scale}


class ImageNotes:
    """One note per run about inputs the recipe feeds differently from how a viewer shows them.

    ``see`` takes a row's (or :meth:`Picture.fields`') fields: the first image with an EXIF orientation left
    unapplied, and the first with transparency dropped, each get one line through ``say`` naming the option
    that changes it; later ones are quiet. ``say`` None: silent.
    """

    def __init__(self, say: Callable[[str], None] | None) -> None:
        self.say = say
        self.told: set[str] = set()

    def see(self, fields: Mapping[str, Any], source: Any = None) -> None:
        """Note ``fields`` of the image ``source`` (a path or id, for the message), once per kind."""
        if self.say is None:
            return
        name = "an input" if source is None else str(source)
        if fields.get("upright") is False and "upright" not in self.told:
            self.told.add("upright")
            self.say(f"{name} has an EXIF orientation that is not applied: the model sees the pixels as stored, "
                     "as its original code feeds them; --upright turns images by their EXIF orientation first "
                     "(noted once per run)")
        if fields.get("alpha") == "dropped" and "alpha" not in self.told:
            self.told.add("alpha")
            self.say(f"{name} has transparency, dropped as the model's original code does (the colours stored "
                     "under transparent pixels show); --alpha-background COLOUR composites it onto a colour first "
                     "(noted once per run)")


# --------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------


def _orientation(im: Image.Image, name: str) -> int:
    """The image's EXIF orientation (2..8), or 1 when it has none, an upright one or an unreadable one."""
    try:
        value = im.getexif().get(ORIENTATION_TAG)
    except Exception as e:  # noqa: BLE001 - broken EXIF must not cost an otherwise good image
        log.debug("%s: ignoring unreadable EXIF: %s", name, e)
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _transparent(im: Image.Image) -> bool:
    """Whether some pixel of ``im`` is not fully opaque (an alpha band, or a transparent colour / palette index)."""
    if im.mode in _ALPHA_MODES:
        band = im.getchannel(len(im.getbands()) - 1)
    elif im.info.get("transparency") is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's advice about palette transparency in bytes
                band = im.convert("RGBA").getchannel("A")
        except (ValueError, OSError):
            return False
    else:
        return False
    return band.getextrema()[0] < 255


def _to_rgb(im: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """``im.convert("RGB")`` as the recipe does it, or transparency composited onto ``background`` first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's advice about palette transparency in bytes: not the user's
        if background is None:
            # convert() returns a fresh copy even for RGB input, so the result never references a file.
            return im.convert("RGB")
        canvas = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(canvas, im.convert("RGBA")).convert("RGB")


def _fast_decode_size(width: int, height: int) -> tuple[int, int] | None:
    """The size to ask libjpeg for (its DCT scaling keeps at least it), or None when no reduction is possible."""
    scale = FAST_DECODE_MIN_SIDE / min(width, height)
    if scale > 0.5:  # not even a halving keeps the short side long enough
        return None
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def load_image(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes],
               options: ImageOptions | None = None) -> Image.Image:
    """The fully loaded RGB ``PIL.Image`` of a file, bytes or stream: exactly ``Image.open(p).convert("RGB")``
    unless ``options`` asks otherwise (see :func:`open_image`, which also says what was done)."""
    return open_image(path_or_bytes, options).image


def open_image(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes],
               options: ImageOptions | None = None) -> Picture:
    """Decode an image to the RGB pixels a model's recipe starts from, and say what was done to it.

    Raises MediaError (one line, naming the file) for anything that is not a readable, sane image, and for
    one above ``Image.MAX_IMAGE_PIXELS`` (refused, never resized).
    """
    options = options or EXACT
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = bytes(path_or_bytes)
        if not data:
            raise MediaError(f"{name}: empty input")
        return _decode_image(io.BytesIO(data), name, options)
    if hasattr(path_or_bytes, "read"):
        name = str(getattr(path_or_bytes, "name", "<stream>"))
        return _decode_image(path_or_bytes, name, options)  # type: ignore[arg-type]

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
        return _decode_image(fh, name, options)


def _decode_image(fh: IO[bytes], name: str, options: ImageOptions) -> Picture:
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
        decode_scale = None
        try:
            if options.fast_decode and im.format == "JPEG" and (size := _fast_decode_size(w, h)) is not None:
                im.draft(None, size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping at least ``size``
                if im.size != (w, h):
                    decode_scale = 1 / round(w / im.size[0])
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_error(name, e) from None
        except _DECODE_ERRORS as e:
            raise MediaError(f"{name}: corrupt or truncated image ({describe(e)})") from None

        orientation = _orientation(im, name)
        transparent = _transparent(im)
        background = options.alpha_background if transparent else None
        try:
            rgb = _to_rgb(im, background)
        except (ValueError, OSError) as e:
            raise MediaError(f"{name}: unsupported image mode {im.mode} ({describe(e)})") from None

    upright = options.upright and orientation != 1
    if upright:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return Picture(rgb, orientation=orientation, transparent=transparent, upright=upright,
                   alpha_background=background, decode_scale=decode_scale)
