"""The torch dtype names the CLI accepts (``--dtype``), shared by the torch backend and the converters."""

from __future__ import annotations

# every accepted spelling -> the torch attribute name
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """The ``torch.dtype`` for an accepted spelling (``KeyError`` for anything else)."""
    import torch

    return getattr(torch, DTYPES[name])
