"""Writing GGUF files: typed key/values plus NumPy tensors, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from m3cli.errors import ConvertError
from m3cli.fileio import atomic_open


def gguf_lib():
    """The ``gguf`` package, or a one-line ConvertError naming the missing extra."""
    try:
        import gguf
    except ImportError as exc:
        raise ConvertError("the 'gguf' package is not installed (pip install gguf)") from exc
    return gguf


class KeyValues:
    """Typed key/value collector: ``add(key, value, "UINT32")`` appends ``(key, value, type, sub_type)``."""

    def __init__(self) -> None:
        self.gguf = gguf_lib()
        self.items: list[tuple[str, Any, Any, Any]] = []

    def add(self, key: str, value: Any, vtype: str, sub: str | None = None) -> None:
        T = self.gguf.GGUFValueType
        self.items.append((key, value, getattr(T, vtype), getattr(T, sub) if sub else None))


def write_gguf(path: str | os.PathLike[str], arch: str, kv: list[tuple[str, Any, Any, Any]],
               tensors: list[tuple[str, np.ndarray, Any]]) -> Path:
    """Write ``kv`` = [(key, value, GGUFValueType, sub_type)] and ``tensors`` = [(name, array, raw_dtype)].

    Arrays are in NumPy (torch) dimension order; the gguf writer reverses them into ggml's ne.
    ``raw_dtype`` is None for F32/F16 arrays, or the GGML type of a pre-quantised uint8 array.
    The file appears only when complete (readers never see a half-written GGUF).
    """
    gguf = gguf_lib()
    path = Path(path)
    with atomic_open(path, "wb") as stream:
        writer = gguf.GGUFWriter(None, arch)
        for key, value, vtype, sub in kv:
            if key == "general.architecture":
                continue
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, array, raw in tensors:
            writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=raw)
        # The writer opens (and closes) output files by name; hand it atomic_open's temp file instead.
        writer.fout = [stream]
        writer.state = gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
