"""``m3 train``'s checkpoint: written atomically, read back only as data.

A checkpoint holds tensors, numbers, strings, lists, tuples and dicts only (:func:`plain`), so
``torch.load(weights_only=True)`` reads it: unpickling never runs code, and a crafted ``checkpoint.pt`` in a
run folder can at worst be refused. A file that cannot be loaded that way (made by something else, or
tampered with) or that lacks what a checkpoint holds is refused in one line (:class:`CheckpointError`,
exit code 2) before anything of it is used.

Fields: ``done`` (finished stage names), ``model`` and ``heads`` (state dicts), and for a checkpoint taken
inside a stage ``stage``, ``step`` and ``opt`` (the optimizer's state dict); ``stage`` is None between stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3cli.errors import UsageError, describe
from m3cli.fileio import atomic_open, input_problem

CHECKPOINT = "checkpoint.pt"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be loaded safely, or is not one (one line, exit code 2)."""


def plain(value: Any) -> Any:
    """``value`` with every mapping made a plain dict (state dicts are OrderedDicts), recursively: what
    ``weights_only`` loading reads back without trusting any class."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically: a run killed mid-write keeps its previous one."""
    import torch

    path = Path(folder) / CHECKPOINT
    with atomic_open(path, "wb") as fh:
        torch.save(plain(state), fh)
    return path


def _check(state: Any, path: Path) -> dict[str, Any]:
    """``state`` if it has a checkpoint's fields and types, else CheckpointError."""
    import torch

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not an m3 train checkpoint ({why}); start a new --out or remove it")

    if not isinstance(state, dict):
        raise bad("not a dict")
    done = state.get("done")
    if not isinstance(done, list) or not all(isinstance(n, str) for n in done):
        raise bad("'done' is not a list of stage names")
    for key in ("model", "heads"):
        weights = state.get(key)
        if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise bad(f"'{key}' is not a state dict of tensors")
    stage = state.get("stage")
    if stage is not None:
        if not isinstance(stage, str):
            raise bad("'stage' is not a stage name")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad("'step' is not a step number")
        if not isinstance(state.get("opt"), dict):
            raise bad("'opt' is not an optimizer state")
    return state


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``folder`` (None: there is none), loaded with ``weights_only=True`` and checked.

    Raises :class:`CheckpointError` (one line) for a file that cannot be loaded safely or is not a checkpoint.
    """
    import pickle

    import torch

    path = Path(folder) / CHECKPOINT
    if not path.exists() and not path.is_symlink():
        return None
    problem = input_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: cannot be loaded safely: it holds Python objects, not only tensors, numbers, "
                              f"strings, lists and dicts ({describe(exc)}); it was not written by m3 train (or was "
                              "changed since): start a new --out or remove it") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({describe(exc)}); start a new --out or remove it") from None
    return _check(state, path)
