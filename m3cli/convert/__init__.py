"""Model conversion.

* ``gguf_writer.convert_to_gguf``: HF LLaVA -> language-model GGUF + mmproj GGUF for llama.cpp,
  in the layout that makes llama.cpp's LLaVA encoder return Hugging Face-equal features.
* ``mmproj_fix.fix_mmproj`` / ``validate_mmproj``: repair legacy mmproj files, check any mmproj.
* ``original_llava``: original (haotian-liu) LLaVA checkpoints -> HF layout.

Submodules are imported lazily so that importing one does not pull in the others.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ConvertError": "m3cli.convert.errors",
    "convert_original_to_hf": "m3cli.convert.original_llava",
    "convert_to_gguf": "m3cli.convert.gguf_writer",
    "fix_mmproj": "m3cli.convert.mmproj_fix",
    "validate_mmproj": "m3cli.convert.mmproj_fix",
    "MmprojError": "m3cli.convert.mmproj_fix",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'm3cli.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
