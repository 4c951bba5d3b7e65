"""The family of a GGUF pair (language model + mmproj), from their metadata: the llama.cpp backend's detection.

Pure: the caller reads the two files' metadata into dicts (key -> value, arrays as lists). What is used:

* mmproj: ``clip.projector_type`` (``mlp`` for LLaVA-1.5; anything else is refused),
  ``clip.vision.image_grid_pinpoints`` / ``clip.vision.mm_patch_merge_type`` (LLaVA-1.6: detected, flagged),
  ``clip.vision.image_size``, ``clip.vision.patch_size``, ``clip.vision.image_mean`` / ``image_std``.
* language model: ``m3cli.prompt_recipe`` and ``tokenizer.chat_template`` (see
  :func:`m3cli.families.prompts.recipe_from_gguf`), ``m3cli.image_aspect_ratio``.
* preprocessing: ``m3cli.image_aspect_ratio`` from either file when m3 wrote it, else ``pad``: what llama.cpp
  itself does to LLaVA-1.5 images and what the original checkpoints (liuhaotian, M3) were trained with. A
  GGUF pair of a llava-hf model that should crop carries the key when ``m3 convert --to gguf`` wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3cli.errors import ModelError
from m3cli.families.prompts import PromptRecipe, TemplateRecipe, recipe_from_gguf
from m3cli.families.spec import SUPPORTED, FamilySpec, ImageSpec, UnsupportedModelError

GGUF_ASPECT_KEY = "m3cli.image_aspect_ratio"
LLAVA15_GGUF = "llava15-gguf"
LLAVANEXT_GGUF = "llavanext-gguf"


def gguf_family_spec(lm_path: str | Path, lm_meta: Mapping[str, Any], mmproj_meta: Mapping[str, Any], *,
                     override: str | None = None,
                     fallback_recipe: str = "vicuna_v1") -> tuple[FamilySpec, PromptRecipe, str | None]:
    """(spec, recipe, notice) of a GGUF pair; ``notice`` is a one-line message when the recipe fell back.

    ``override`` is ``--chat-template FILE|NAME``. Refuses (one line) mmprojs that are not LLaVA's.
    """
    path = Path(lm_path)
    projector = str(mmproj_meta.get("clip.projector_type") or ("mlp" if mmproj_meta.get("clip.has_llava_projector")
                                                                  else ""))
    if projector != "mlp":
        raise UnsupportedModelError(f"{path.name}: mmproj projector {projector or 'unknown'} is not LLaVA's; "
                                    f"supported: {SUPPORTED}")
    next_ = bool(mmproj_meta.get("clip.vision.image_grid_pinpoints")) or \
        "unpad" in str(mmproj_meta.get("clip.vision.mm_patch_merge_type") or "")
    try:
        size = int(mmproj_meta["clip.vision.image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path.name}: mmproj without clip.vision.image_size") from exc
    patch = mmproj_meta.get("clip.vision.patch_size")
    image = ImageSpec(size=size, shortest_edge=size, patch_size=int(patch) if patch else None,
                      **_mean_std(mmproj_meta))
    aspect = str(lm_meta.get(GGUF_ASPECT_KEY) or mmproj_meta.get(GGUF_ASPECT_KEY) or ("anyres" if next_ else "pad"))
    if aspect not in ("pad", "crop", "anyres"):
        raise ModelError(f"{path.name}: {GGUF_ASPECT_KEY} {aspect!r} is not pad, crop or anyres")
    recipe, notice = recipe_from_gguf(lm_meta, override=override, fallback=fallback_recipe, name=path.name)
    spec = FamilySpec(
        name=LLAVANEXT_GGUF if next_ else LLAVA15_GGUF,
        family="llavanext" if next_ else "llava15",
        layout="gguf",
        preprocess=aspect,  # type: ignore[arg-type]
        image=image,
        prompt_recipe=recipe.name,
        model_dir=path.parent,
        architecture=str(lm_meta.get("general.architecture") or "llama"),
        chat_template=recipe.template if isinstance(recipe, TemplateRecipe) else None,
        # the NeXT family reads clip.vision.image_grid_pinpoints itself (a flat list; its pair order is
        # llama.cpp's converter's to check there)
        notes=("clip.vision.image_grid_pinpoints not read",) if next_ else (),
    )
    return spec, recipe, notice


def _mean_std(meta: Mapping[str, Any]) -> dict[str, tuple[float, float, float]]:
    out: dict[str, tuple[float, float, float]] = {}
    for key, name in (("clip.vision.image_mean", "mean"), ("clip.vision.image_std", "std")):
        value = meta.get(key)
        if value is not None:
            a, b, c = (float(x) for x in value)
            out[name] = (a, b, c)
    return out
