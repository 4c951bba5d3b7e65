"""Resolve a ``--model`` value: a registry name, a local directory or GGUF file, or a hub id.

A registry entry names a local path (relative to the registry file) or a hub id; what the files are (llava-hf,
an original LLaVA checkpoint to convert, a family m3 cannot run) is detected when the backend opens them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from m3cli.errors import ModelError, describe

DEFAULT_MODEL = "m3-shapes"


class RegistryError(ModelError):
    """The model name or registry is unusable; one user-facing line."""


def models_dir() -> Path:
    """Where shipped models live: $M3CLI_MODELS_DIR, else the repository's ``models/``."""
    env = os.environ.get("M3CLI_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry. ``policy``: the model's tuned scale policy as the YAML states it (keys ``tokens``,
    ``auto_scale``, ``threshold``, ``measure``, ``ladder``, ``on_miss``; checked by
    :meth:`m3cli.matryoshka.policy.PolicySpec.from_mapping`), None when it has none."""

    name: str
    location: str
    format: str
    description: str = ""
    scales: tuple[int, ...] = ()
    policy: dict[str, Any] | None = None

    @property
    def local(self) -> bool:
        """Whether the entry names a local path (shipped) rather than a hub id."""
        return Path(self.location).is_absolute()


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    """Entries of ``models/registry.yaml`` (empty if the file is absent)."""
    path = path or models_dir() / "registry.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: invalid YAML: {describe(exc)}") from exc
    entries = {}
    for name, spec in (data.get("models") or {}).items():
        location = spec.get("path") or spec.get("hub")
        if spec.get("path"):
            location = str((path.parent / spec["path"]).resolve())
        entries[name] = ModelEntry(
            name=name,
            location=location,
            format=spec.get("format", "hf"),
            description=spec.get("description", ""),
            scales=tuple(spec.get("scales", ())),
            policy=dict(spec["policy"]) if isinstance(spec.get("policy"), dict) else spec.get("policy"),
        )
    return entries


def find_entry(value: str | None) -> ModelEntry | None:
    """The registry entry ``--model value`` names: by name, or a local path that is an entry's directory
    (``--model models/m3-shapes`` is the shipped model too); None for anything else (None: the default)."""
    entries = load_registry()
    name = value or DEFAULT_MODEL
    if name in entries:
        return entries[name]
    if value is None or not os.path.exists(value):
        return None
    real = os.path.realpath(value)
    for entry in entries.values():
        if entry.local and os.path.exists(entry.location) and os.path.realpath(entry.location) == real:
            return entry
    return None


def resolve_model(value: str | None) -> str:
    """A path or hub id for ``value``; ``None`` means the shipped default model."""
    name = value or DEFAULT_MODEL
    entry = load_registry().get(name)
    if entry is not None:
        # llava-original entries resolve like any hub id or directory: the torch backend detects the original
        # layout and converts it once into the cache (m3cli.backends.locate)
        if Path(entry.location).is_absolute() and not Path(entry.location).exists():
            raise RegistryError(f"model {name!r} is registered but missing at {entry.location}")
        return entry.location
    if value is None:
        raise RegistryError(f"the default model {DEFAULT_MODEL!r} is not installed; pass --model PATH")
    return value
