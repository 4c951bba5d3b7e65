"""Which paths are media (by extension), and whether a named file can be handed to a decoder."""

from __future__ import annotations

import os
import stat
from typing import Literal

from m3cli.errors import MediaError, describe

# Lower-case, with the leading dot. GIF is an image on purpose: animated GIFs use their first frame.
IMAGE_EXTS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp",
        ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k",
    }
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


def check_readable_file(name: str) -> None:
    """Turn missing/directory/empty/unreadable paths into MediaError before a decoder sees them."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise MediaError(f"{name}: file not found") from None
    except PermissionError:
        raise MediaError(f"{name}: permission denied") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot access ({describe(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{name}: is a directory, not a file")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise MediaError(f"{name}: empty file")
    if not os.access(name, os.R_OK):
        raise MediaError(f"{name}: permission denied")
