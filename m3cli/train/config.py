"""Training configuration (YAML): the model spec and the stages of the M3 recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from m3cli.errors import UsageError
from m3cli.fileio import input_problem
from m3cli.matryoshka.scales import nested_scales
from m3cli.models.build import ModelSpec


class ConfigError(UsageError, ValueError):
    """A training config that cannot be used; one user-facing line."""


@dataclass
class StageConfig:
    """One stage: ``vision`` (dense patch heads on the tower), ``vqa`` or ``m3`` (LM loss over ``scales``)."""

    kind: str
    steps: int
    batch: int = 16
    lr: float = 1e-3
    warmup: float = 0.05
    scales: list[int] = field(default_factory=lambda: [576])
    align_weight: float = 0.0  # projected patches vs. the tied embeddings of the words naming them
    describe_rate: float = 0.0  # chance per image per step of also packing an open "describe" question
    phrasing_rate: float = 0.0  # chance per packed question of a drawn phrasing instead of its template


@dataclass
class TrainConfig:
    name: str
    seed: int
    model: ModelSpec
    stages: dict[str, StageConfig]
    pool_images: int = 8000  # train-split scenes whose frozen tower features are cached after stage 0
    pool_drawings: int = 0  # train-split drawings (other sizes, larger shapes) cached with them
    checkpoint_every: int = 100
    threads: int | None = None
    init: str | None = None  # start from this model directory or registry name (``--init`` overrides)


STAGE_KINDS = ("vision", "vqa", "m3")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML."""
    path = Path(path)
    problem = input_problem(path)
    if problem == "file not found":
        raise ConfigError(f"config not found: {path}")
    if problem is not None:
        raise ConfigError(f"config {path}: {problem}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    try:
        spec = ModelSpec(**(raw.get("model") or {}))
        stages = {}
        for name, body in (raw.get("stages") or {}).items():
            stage = StageConfig(**body)
            if stage.kind not in STAGE_KINDS:
                raise ConfigError(f"{path}: stage {name}: kind must be one of {STAGE_KINDS}")
            for key in ("describe_rate", "phrasing_rate"):
                if not 0.0 <= getattr(stage, key) <= 1.0:
                    raise ConfigError(f"{path}: stage {name}: {key} must be between 0 and 1")
            stages[name] = stage
        config = TrainConfig(
            name=raw.get("name", path.stem),
            seed=int(raw.get("seed", 0)),
            model=spec,
            stages=stages,
            pool_images=int(raw.get("pool_images", 8000)),
            pool_drawings=int(raw.get("pool_drawings", 0)),
            checkpoint_every=int(raw.get("checkpoint_every", 100)),
            threads=raw.get("threads"),
            init=str(raw["init"]) if raw.get("init") else None,
        )
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not stages:
        raise ConfigError(f"{path}: no stages")
    scales = [s for st in stages.values() for s in st.scales]
    valid = set(nested_scales(spec.grid))
    bad = sorted({s for s in scales if s not in valid})
    if bad:
        raise ConfigError(f"{path}: scales {bad} are not nested scales of a {spec.grid}x{spec.grid} grid")
    return config
