"""Reading GGUF headers: the magic check and the (memory-mapped) ``GGUFReader``."""

from __future__ import annotations

import os
from typing import Any

GGUF_MAGIC = b"GGUF"


def has_gguf_magic(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the GGUF magic; raises ``OSError`` when it cannot be read."""
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def open_reader(path: str | os.PathLike[str]):
    """A read-only ``gguf.GGUFReader`` on ``path`` (raises ImportError without the gguf package, and
    whatever the reader raises on a malformed file)."""
    from gguf import GGUFReader

    return GGUFReader(os.fspath(path), "r")


def field_value(reader, key: str) -> Any:
    """The decoded value of one key/value field, or None when the file lacks it."""
    field = reader.fields.get(key)
    return field.contents() if field is not None else None
