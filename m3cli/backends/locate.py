"""The directory the torch backend loads for a ``--model`` value, and its family, found before any weights load.

``--model`` may be a local directory, a hub id (``owner/name``, from the local Hugging Face cache or
downloaded, see :mod:`m3cli.models.hub`) or an original-layout checkpoint of either kind, which is converted once
into the cache (:mod:`m3cli.convert.original_cache`). Whatever it is, the family is detected from its JSON
files first (:func:`m3cli.families.detect_family`), so a model m3 cannot run is refused in one line before
any download of weights, conversion or load.

The vision tower of an original checkpoint: ``vision_tower`` (``--vision-tower DIR``, or ``$M3_VISION_TOWER``),
else ``mm_vision_tower`` as a local directory, else that hub id in the local Hugging Face cache, else (when the
checkpoint carries the tower's weights) the known CLIP towers' settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3cli.backends.base import ModelLoadError
from m3cli.errors import ModelError
from m3cli.families import Family, FamilySpec, chat_template_option, detect_family, family_for

VISION_TOWER_ENV = "M3_VISION_TOWER"


@dataclass(frozen=True)
class LocatedModel:
    """A loadable HF LLaVA directory and its family (for an original checkpoint: its cached conversion)."""

    path: Path
    family: Family
    source: str                    # what the user named
    original: FamilySpec | None    # the original-layout checkpoint's spec, when ``path`` is its conversion
    converted_now: bool = False


def vision_tower_option(value: str | Path | None) -> str | Path | None:
    """``--vision-tower`` when given, else ``$M3_VISION_TOWER`` (None when neither is set)."""
    if value is not None:
        return value
    return os.environ.get(VISION_TOWER_ENV) or None


@dataclass(frozen=True)
class FoundModel:
    """A model detected from its files (step one of :func:`locate_model`: no weights fetched or read yet)."""

    source: str                    # what the user named
    path: Path                     # its folder (for a hub id: the snapshot, maybe without weights yet)
    spec: FamilySpec
    recipe: Any                    # --chat-template's recipe, or None
    hub_id: bool


def find_model(model: str, *, vision_tower: str | Path | None = None, chat_template: str | None = None) -> FoundModel:
    """Find ``model`` and detect its family, refusing what m3 cannot run; no weights, no torch.

    A hub id not in the local cache gets its small files downloaded (after a reachability probe that fails
    within seconds). ``chat_template`` is ``--chat-template FILE|NAME`` (it also lets an HF directory without a
    template run); ``vision_tower`` is ``--vision-tower`` (default ``$M3_VISION_TOWER``).
    """
    from m3cli.models import hub

    recipe = chat_template_option(chat_template) if chat_template else None
    tower = vision_tower_option(vision_tower)
    is_hub = hub.looks_like_hub_id(model)
    src = hub.fetch(model, weights=False) if is_hub else local_model_dir(model)
    tower_dir = _tower_for(src, tower)
    spec = _detect(src, model, vision_tower=tower_dir, fallback=recipe is not None)
    _family(spec, recipe, model)  # a family m3 cannot run is refused before any download or conversion
    return FoundModel(model, src, spec, recipe, is_hub)


def prepare_model(found: FoundModel, *, convert: bool = True) -> LocatedModel:
    """Step two of :func:`locate_model`: fetch a hub id's weights; convert an original checkpoint (once)."""
    from m3cli.models import hub

    model, spec, recipe = found.source, found.spec, found.recipe
    if spec.layout != "original":
        path = hub.fetch(model, weights=True) if found.hub_id else found.path
        return LocatedModel(path, _family(spec, recipe, model), model, None)
    if not convert:
        raise ModelLoadError(f"{model}: an original-layout checkpoint; convert it first "
                             "(m3 convert SRC --to hf OUT)")
    if found.hub_id:
        src = hub.fetch(model, weights=True)
        spec = _detect(src, model, vision_tower=spec.source.vision_tower_dir if spec.source else None)
    _check_tower(spec, model)
    from m3cli.convert.original_cache import cached_conversion

    label = model if found.hub_id else str(found.path.resolve())
    out, created = cached_conversion(spec, label)
    converted = _detect(out, model, fallback=recipe is not None)
    return LocatedModel(out, _family(converted, recipe, model), model, spec, created)


def locate_model(model: str, *, vision_tower: str | Path | None = None, chat_template: str | None = None,
                 convert: bool = True) -> LocatedModel:
    """Find, detect and (for an original checkpoint) convert ``model``; refuse what m3 cannot run.

    :func:`find_model` then :func:`prepare_model`. ``convert=False`` stops before converting (an original
    checkpoint then raises). Every failure is one line: :class:`ModelLoadError`, or a
    :class:`~m3cli.errors.ConvertError` / :class:`~m3cli.models.hub.HubError` from those steps.
    """
    found = find_model(model, vision_tower=vision_tower, chat_template=chat_template)
    return prepare_model(found, convert=convert)


def local_model_dir(model: str) -> Path:
    """``model`` as an existing local model directory (one-line errors as the torch backend always gave)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {model}")
    if not path.is_dir():
        raise ModelLoadError(f"{model}: not a model directory (a .gguf file runs with --backend llamacpp)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model}: not a Hugging Face model directory (no config.json)")
    return path


def _detect(path: Path, model: str, *, vision_tower: Path | None = None, fallback: bool = False) -> FamilySpec:
    """Detection with its errors as :class:`ModelLoadError` (same one line)."""
    try:
        # with --chat-template, a directory without a template is not refused (the option gives the recipe)
        return detect_family(path, vision_tower=vision_tower, fallback_recipe="vicuna_v1" if fallback else None)
    except ModelError as exc:
        raise _named(exc, path, model) from None


def _family(spec: FamilySpec, recipe: Any, model: str) -> Family:
    """:func:`family_for` with its refusals as :class:`ModelLoadError`."""
    try:
        return family_for(spec, recipe)
    except ModelError as exc:
        raise _named(exc, spec.model_dir, model) from None


def _named(exc: ModelError, path: Path, model: str) -> ModelLoadError:
    """``exc`` as a :class:`ModelLoadError` naming the model as the user did (not a cache or snapshot folder)."""
    message, prefix = str(exc), f"{path.name}:"
    if path.name != model and message.startswith(prefix):
        message = f"{model}:{message[len(prefix):]}"
    return exc if isinstance(exc, ModelLoadError) else ModelLoadError(message)


def _tower_dir(tower: str | Path | None) -> Path | None:
    """``--vision-tower`` as a directory: a local path, or a hub id found in the local Hugging Face cache."""
    if tower is None:
        return None
    from m3cli.models import hub

    path = Path(tower).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--vision-tower {tower}: not a vision tower directory (no config.json)")
        return path
    if hub.looks_like_hub_id(str(tower)):
        cached = hub.cached_snapshot(str(tower))
        if cached is not None and (cached / "config.json").is_file():
            return cached
        raise ModelLoadError(f"--vision-tower {tower}: not a local directory and not in the local Hugging Face "
                             f"cache (huggingface-cli download {tower})")
    raise ModelLoadError(f"--vision-tower {tower}: directory not found")


def _tower_for(src: Path, tower: str | Path | None) -> Path | None:
    """The vision tower directory of an original checkpoint: ``tower`` (checked), else its ``mm_vision_tower``
    hub id's snapshot in the local Hugging Face cache; None for other layouts (``tower`` is ignored there) or
    when neither is found (detection then looks for a local ``mm_vision_tower`` path or a known tower)."""
    import json

    from m3cli.models import hub

    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # detection reports the broken file
    if not isinstance(cfg, dict) or "vision_config" in cfg or not cfg.get("mm_vision_tower"):
        return None
    if tower is not None:
        return _tower_dir(tower)
    name = cfg["mm_vision_tower"]
    if not isinstance(name, str) or not hub.looks_like_hub_id(name) or (src / name).is_dir():
        return None
    cached = hub.cached_snapshot(name)
    return cached if cached is not None and (cached / "config.json").is_file() else None


def _check_tower(spec: FamilySpec, model: str) -> None:
    """An original checkpoint without its tower's weights needs the tower directory (say so before converting)."""
    source = spec.source
    if source is None or source.vision_tower_dir is not None or source.tower_in_checkpoint is not False:
        return
    raise ModelLoadError(
        f"{model}: the checkpoint does not carry its vision tower and {source.vision_tower} is neither a local "
        f"directory nor in the local Hugging Face cache; pass --vision-tower DIR (or set {VISION_TOWER_ENV}), or "
        f"download it first (huggingface-cli download {source.vision_tower})")
