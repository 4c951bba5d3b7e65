"""Model families: one layer, shared by both backends, between a model's files and the M3 maths.

A family knows, for its checkpoints, how an image becomes crops (``pad`` / ``crop`` / ``anyres``), how the crops'
pooled grids become the language model's visual tokens, and the prompt recipe with its tokenisation. Both
backends ask it, so the torch and llama.cpp paths cannot drift apart.

* :func:`detect_family` (``detect.py``): a model directory's :class:`FamilySpec` from its JSON files only,
  before any weights load; everything else is refused in one line (:class:`UnsupportedModelError`).
* :func:`family_for` / :func:`open_family`: the family object for a spec (LLaVA-1.5, LLaVA-NeXT; see
  :data:`FAMILIES`).
* ``preprocess.py``: the exact square bitmap the tower sees (:func:`tower_image`) and its normalisation
  (:func:`pixel_array`).
* ``prompts.py``: the recipes (``vicuna_v1``, ``mistral_instruct``, ``chatml_direct``, ``hf_template``), the
  chat-template renderer, and the recipe of a GGUF (:func:`recipe_from_gguf`) or ``--chat-template``.
* ``tokenizing.py``: the :class:`TokenizerAdapter` contract each backend implements (one primitive,
  ``raw_encode``) and :class:`PieceEncoder`, which holds every BOS / special-token / dummy-prefix rule.
* ``hf_tokenizer.py``: the adapter of a transformers tokenizer.
* ``gguf_spec.py``: the spec of a GGUF pair from its metadata (:func:`gguf_family_spec`), for llama.cpp.
* ``converted.py``: what a converted original checkpoint stores so detection finds its recipe again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from m3cli.families.base import Family, FamilyBase
from m3cli.families.detect import detect_family, find_chat_template
from m3cli.families.gguf_spec import gguf_family_spec
from m3cli.families.hf_tokenizer import HFTokenizerAdapter
from m3cli.families.preprocess import pixel_array, tower_image
from m3cli.families.prompts import (
    RECIPE_NAMES,
    PromptParts,
    PromptRecipe,
    chat_template_option,
    recipe_for_template,
    recipe_from_gguf,
    recipe_named,
    render_chat_template,
)
from m3cli.families.spec import (
    SUPPORTED,
    FamilySpec,
    ImageSpec,
    OriginalSource,
    QuestionError,
    TemplateError,
    UnsupportedModelError,
)
from m3cli.families.tokenizing import PieceEncoder, TokenizerAdapter

# family name -> "module:Class". A new family registers here (and extends spec.SUPPORTED).
FAMILIES: dict[str, str] = {
    "llava15": "m3cli.families.llava15:Llava15Family",
    "llavanext": "m3cli.families.llavanext:LlavaNextFamily",
}

_NOT_YET: dict[str, str] = {}  # families detected (to be refused by name) before their module lands


def family_for(spec: FamilySpec, recipe: PromptRecipe | None = None) -> Family:
    """The family object for ``spec`` (``recipe`` overrides the spec's, e.g. from ``--chat-template``)."""
    target = FAMILIES.get(spec.family)
    if target is None:
        what = _NOT_YET.get(spec.family, spec.family)
        raise UnsupportedModelError(f"{spec.model_dir.name}: {what}, detected as {spec.name}, is not supported "
                                    f"yet; supported: {SUPPORTED}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(spec, recipe)


def follow_tokenizer(family: Family, tok: TokenizerAdapter) -> Family:
    """``family`` with its chat-template recipe doing what ``tok`` does after a special token.

    The ``hf_template`` recipe promises transformers' tokenisation of the rendered prompt; an adapter that
    measures it (``HFTokenizerAdapter.prefix_after_special``) overrides what detection read from the files.
    Other recipes, and adapters that do not measure (None), leave ``family`` as it is.
    """
    from dataclasses import replace

    from m3cli.families.prompts import TemplateRecipe

    measured = getattr(tok, "prefix_after_special", None)
    recipe = family.recipe
    if measured is None or not isinstance(recipe, TemplateRecipe) or recipe.prefix_after_special == measured:
        return family
    spec = replace(family.spec, prefix_after_special=measured)
    return family_for(spec, TemplateRecipe(recipe.template, prefix_after_special=measured))


def open_family(path: str | Path, *, vision_tower: str | Path | None = None,
                fallback_recipe: str | None = None) -> Family:
    """:func:`detect_family` then :func:`family_for`: refuses, in one line, anything m3 cannot run."""
    return family_for(detect_family(path, vision_tower=vision_tower, fallback_recipe=fallback_recipe))


__all__ = [
    "FAMILIES", "RECIPE_NAMES", "SUPPORTED", "Family", "FamilyBase", "FamilySpec", "HFTokenizerAdapter",
    "ImageSpec", "OriginalSource", "PieceEncoder", "PromptParts", "PromptRecipe", "QuestionError",
    "TemplateError", "TokenizerAdapter", "UnsupportedModelError", "chat_template_option", "detect_family",
    "family_for", "find_chat_template", "follow_tokenizer", "gguf_family_spec", "open_family", "pixel_array",
    "recipe_for_template", "recipe_from_gguf", "recipe_named", "render_chat_template", "tower_image",
]
