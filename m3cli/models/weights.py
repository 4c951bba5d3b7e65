"""Cheap checks of a model folder's weight files before a loader touches them.

A truncated or empty ``*.safetensors`` file (an interrupted download or copy) would otherwise fail deep in
the loader with a library traceback. Only headers are read: the 8-byte header length, the JSON header, and
the file size against the largest data offset it declares.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from m3cli.errors import ModelError

_MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts


class WeightFileError(ModelError):
    """A weight file is empty, truncated or not in the format its name says (one line)."""


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`WeightFileError` unless ``path`` is a complete safetensors file (header and data)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise WeightFileError(f"{path}: empty weights file (an interrupted download or copy?)")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{path}: truncated weights file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightFileError(f"{path}: not a complete safetensors file (header of {n} bytes in a "
                                      f"{size}-byte file)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError):
        raise WeightFileError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: not a safetensors file (unreadable header)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise WeightFileError(f"{path}: not a safetensors file (bad entry {name!r})") from None
    if 8 + n + end > size:
        raise WeightFileError(f"{path}: truncated weights file ({size} bytes, its header needs {8 + n + end}); "
                              "download or copy it again")


def check_weight_files(folder: str | Path) -> None:
    """Check every safetensors file of a model folder (those its index lists, else all ``*.safetensors``)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    names: list[str] = []
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise WeightFileError(f"{index}: unreadable weight index") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightFileError(f"{folder}: weight file {missing[0]} listed in {index.name} is missing")
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    for name in names:
        check_safetensors(folder / name)
