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


# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: str | os.PathLike[str], *, max_array: int = 64) -> dict[str, Any]:
    """The key/values of a GGUF file's header, without touching its tensors (a few ms even for a 7B model).

    Strings are decoded, arrays of up to ``max_array`` items become lists; longer arrays (the vocabulary,
    its scores and merges) are skipped and left out. Raises ``ValueError`` on a malformed or non-GGUF file
    and ``OSError`` when it cannot be read.
    """
    import struct

    with open(path, "rb") as fh:
        def take(n: int) -> bytes:
            data = fh.read(n)
            if len(data) != n:
                raise ValueError("truncated GGUF header")
            return data

        def scalar(kind: int) -> Any:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string(keep: bool = True) -> str | None:
            (n,) = struct.unpack("<Q", take(8))
            if not keep:
                fh.seek(n, os.SEEK_CUR)
                return None
            return take(n).decode("utf-8", errors="replace")

        def value(kind: int, keep: bool) -> Any:
            if kind == _STRING:
                return string(keep)
            if kind in _SCALARS:
                return scalar(kind)
            if kind != _ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            (sub,) = struct.unpack("<I", take(4))
            (count,) = struct.unpack("<Q", take(8))
            keep = keep and count <= max_array
            if sub in _SCALARS and not keep:
                fh.seek(count * struct.calcsize("<" + _SCALARS[sub]), os.SEEK_CUR)
                return None
            items = [value(sub, keep) for _ in range(count)]
            return items if keep else None

        if take(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        (version,) = struct.unpack("<I", take(4))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        _, n_kv = struct.unpack("<QQ", take(16))
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack("<I", take(4))
            got = value(kind, True)
            if got is not None and key is not None:
                out[key] = got
    return out
