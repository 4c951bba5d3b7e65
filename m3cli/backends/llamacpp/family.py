"""A GGUF pair's model family: its recipe and preprocessing, from the files' metadata, through the family layer.

* :func:`gguf_family`: the :class:`~m3cli.families.Family` of a (language model, mmproj) pair and the one-line
  notice when its prompt recipe fell back (no chat template). Order of the recipe: ``--chat-template FILE|NAME``,
  the ``m3cli.prompt_recipe`` key ``m3 convert`` writes, the GGUF's ``tokenizer.chat_template`` (llava-hf's
  ``{% generation %}`` tags render as their body), then the family's ``vicuna_v1``; whether text after a special
  token gets a "▁": ``--prefix-after-special/--no-prefix-after-special``, the ``m3cli.prefix_after_special`` key,
  else yes for a SentencePiece vocabulary (:func:`gguf_prefix_after_special`). Preprocessing: the
  ``m3cli.image_aspect_ratio`` key, else ``pad`` (what llama.cpp does to LLaVA-1.5 images, and the recipe the
  original checkpoints were trained with); LLaVA-1.6 pairs (pinpoints in the mmproj) get ``anyres``. An mmproj
  that is not LLaVA's is refused in one line.
* :func:`crop_arrays`: the exact ``size`` x ``size`` uint8 images the tower sees (the family's crops: one for
  LLaVA-1.5, the base crop then the tiles for LLaVA-1.6), which mtmd then only normalises: its fixed-size
  preprocessor copies a bitmap of the model's size as it is. :func:`tower_array` is the one crop of LLaVA-1.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m3cli.families import Family, family_for, gguf_family_spec, recipe_named
from m3cli.gguf.keys import PREFIX_AFTER_SPECIAL_KEY

FALLBACK_RECIPE = "vicuna_v1"   # LLaVA-1.5's (conv_vicuna_v1), what liuhaotian-style GGUFs without a template need

def gguf_family(lm_path: str | Path, lm_meta: Mapping[str, Any], mm_meta: Mapping[str, Any], *,
                chat_template: str | None = None,
                prefix_after_special: bool | None = None) -> tuple[Family, str | None]:
    """(family, notice) of a GGUF pair from its metadata; ``chat_template`` is ``--chat-template FILE|NAME``,
    ``prefix_after_special`` ``--prefix-after-special/--no-prefix-after-special`` (None: what the pair says)."""
    spec, recipe, notice = gguf_family_spec(lm_path, lm_meta, mm_meta, override=chat_template,
                                            fallback_recipe=FALLBACK_RECIPE)
    prefix = gguf_prefix_after_special(lm_meta, prefix_after_special)
    if prefix != getattr(recipe, "prefix_after_special", False):
        recipe = recipe_named(recipe.name, template=getattr(recipe, "template", None), prefix_after_special=prefix)
    return family_for(spec, recipe), notice


def gguf_prefix_after_special(lm_meta: Mapping[str, Any], stated: bool | None = None) -> bool:
    """Whether text after a special token gets SentencePiece's ``▁`` (as transformers tokenises for this model).

    ``stated`` (the user's ``--prefix-after-special`` / ``--no-prefix-after-special``) wins; else the
    ``m3cli.prefix_after_special`` key that ``m3 convert`` records; else, for a GGUF from elsewhere (llama.cpp's
    converter does not record it), yes for a SentencePiece (``llama``) vocabulary: that is how the llava-hf
    tokenizers of transformers 4.x (their ``tokenizer.json`` normaliser prefixes every piece), the original
    per-piece tokenisation and llama.cpp itself treat such text. A tokenizer re-saved by transformers 5 with a
    Metaspace ``prepend_scheme: first`` does not: its pairs need ``--no-prefix-after-special``.
    """
    if stated is not None:
        return bool(stated)
    recorded = lm_meta.get(PREFIX_AFTER_SPECIAL_KEY)
    if recorded is not None:
        return bool(recorded)
    return lm_meta.get("tokenizer.ggml.model") == "llama"


def crop_arrays(family: Family, image: Any) -> list[np.ndarray]:
    """The ``size`` x ``size`` x 3 uint8 arrays of an image's crops, in the family's order."""
    img = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    size = family.spec.image.size
    out = []
    for crop in family.crops(img):
        arr = np.asarray(crop, dtype=np.uint8)
        if arr.shape != (size, size, 3):
            raise ValueError(f"tower image has shape {arr.shape}, expected ({size}, {size}, 3)")
        out.append(np.ascontiguousarray(arr))
    return out


def tower_array(family: Family, image: Any) -> np.ndarray:
    """The one crop a LLaVA-1.5 image becomes (pad or crop), as :func:`crop_arrays` makes it."""
    crops = crop_arrays(family, image)
    if len(crops) != 1:
        raise ValueError(f"a LLaVA-1.5 image is one crop, the family made {len(crops)}")
    return crops[0]
