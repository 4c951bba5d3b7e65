"""Which paths are media (by extension), and whether a named file can be handed to a decoder.

:func:`check_readable_file` is the media side of the one input-path check (:func:`m3cli.fileio.input_problem`):
a FIFO, device or socket is refused by its type before anything opens it, a URL is said to be one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableSet
from typing import Literal

from m3cli.errors import MediaError
from m3cli.fileio import escape_surrogates, input_problem

log = logging.getLogger(__name__)

# AVIF is read by Pillow itself (11.3+ wheels); HEIC/HEIF by the pillow-heif plugin (pip install 'm3cli[heif]').
# Both are walked even without their decoder, so a missing one is an error row that says what to install,
# never a silently skipped photo.
AVIF_EXTS: frozenset[str] = frozenset({".avif", ".avifs"})
HEIF_EXTS: frozenset[str] = frozenset({".heic", ".heif", ".heics", ".heifs", ".hif"})
# Lower-case, with the leading dot. GIF is an image on purpose: animated GIFs use their first frame.
IMAGE_EXTS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp",
        ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k",
    }
    | AVIF_EXTS
    | HEIF_EXTS
)  # fmt: skip
# ".ts" is deliberately absent: walking a source tree would pick up TypeScript files.
VIDEO_EXTS: frozenset[str] = frozenset(
    {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv"}
)


def media_kind(path: str | os.PathLike[str]) -> Literal["image", "video"] | None:
    """Classify a path by its (case-insensitive) extension; None when it is not media."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def note_skipped(path: str | os.PathLike[str], seen: MutableSet[str]) -> None:
    """Log that a folder walk skipped ``path`` for its unknown type: a WARNING the first time its extension is
    met (``seen`` holds those already reported, one set per walk), later ones of that extension at debug level."""
    name = escape_surrogates(os.fspath(path))  # a name that is not UTF-8 must not break the log line
    ext = os.path.splitext(name)[1].lower() or "(no extension)"
    if ext in seen:
        log.debug("skipped non-media file: %s", name)
        return
    seen.add(ext)
    log.warning("skipped non-media file: %s (%s is not a known image or video type; name a file explicitly to try "
                "it as an image)", name, ext)


def check_readable_file(name: str) -> None:
    """Turn missing / URL / directory / FIFO / device / empty / unreadable paths into MediaError before a decoder
    sees them (nothing is opened: a FIFO would block)."""
    problem = input_problem(name, empty_ok=False)
    if problem is not None:
        raise MediaError(f"{name}: {problem}")
