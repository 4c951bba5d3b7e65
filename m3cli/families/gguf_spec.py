"""The family of a GGUF pair (language model + mmproj), from their metadata: the llama.cpp backend's detection.

Pure: the caller reads the two files' metadata into dicts (key -> value, arrays as lists). What is used:

* mmproj: ``clip.projector_type`` (``mlp`` for LLaVA; anything else is refused),
  ``clip.vision.image_grid_pinpoints`` / ``clip.vision.mm_patch_merge_type`` (LLaVA-1.6, or the same under
  ``m3cli.anyres.*`` in m3's corrected copy): the pinpoints are stored flat and read in pairs as (width,
  height), as llama.cpp and the original LLaVA code read them, and unpadded with the original code's arithmetic
  (``anyres_flavour="original"``: llama.cpp's legacy converter is fed the original checkpoints),
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
from m3cli.families.anyres import pinpoints_hw
from m3cli.families.prompts import PromptRecipe, TemplateRecipe, recipe_from_gguf
from m3cli.families.spec import SUPPORTED, FamilySpec, ImageSpec, UnsupportedModelError
from m3cli.gguf.keys import ANYRES_MMPROJ_KEYS

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
    raw_pins = _anyres_value(mmproj_meta, "clip.vision.image_grid_pinpoints")
    next_ = bool(raw_pins) or "unpad" in str(_anyres_value(mmproj_meta, "clip.vision.mm_patch_merge_type") or "")
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
        grid_pinpoints=gguf_pinpoints(path.name, raw_pins) if next_ else (),
        anyres_flavour="original" if next_ else None,
    )
    return spec, recipe, notice


def gguf_pinpoints(name: str, flat: Any) -> tuple[tuple[int, int], ...]:
    """A LLaVA-1.6 mmproj's flat ``image_grid_pinpoints`` as ``(height, width)`` pairs.

    llama.cpp's converter flattens the config's pairs in order and clip.cpp reads them back as (width, height),
    as the original LLaVA code does: each pair is swapped, the order (which breaks ties) kept.
    """
    try:
        values = [int(v) for v in (flat or ())]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name}: unreadable clip.vision.image_grid_pinpoints {flat!r}") from exc
    if not values or len(values) % 2:
        raise ModelError(f"{name}: clip.vision.image_grid_pinpoints needs (width, height) pairs, got {values}")
    try:
        return tuple(pinpoints_hw(zip(values[::2], values[1::2], strict=True), order="wh"))
    except ValueError as exc:
        raise ModelError(f"{name}: clip.vision.image_grid_pinpoints: {exc}") from exc


def _anyres_value(meta: Mapping[str, Any], clip_key: str) -> Any:
    """An anyres key of an mmproj, as llama.cpp's converter wrote it or as m3's corrected copy keeps it."""
    value = meta.get(clip_key)
    return value if value is not None else meta.get(ANYRES_MMPROJ_KEYS[clip_key])


def _mean_std(meta: Mapping[str, Any]) -> dict[str, tuple[float, float, float]]:
    out: dict[str, tuple[float, float, float]] = {}
    for key, name in (("clip.vision.image_mean", "mean"), ("clip.vision.image_std", "std")):
        value = meta.get(key)
        if value is not None:
            a, b, c = (float(x) for x in value)
            out[name] = (a, b, c)
    return out
