"""Locating and checking the GGUF pair a user points at: the language model and its mmproj."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3cli.backends.base import ModelLoadError
from m3cli.errors import describe
from m3cli.fileio import input_problem
from m3cli.gguf.layout import ROT_SUFFIX
from m3cli.gguf.reader import has_gguf_magic, read_metadata


def check_gguf_file(path: str, what: str) -> Path:
    """``path`` as a Path, or a one-line ModelLoadError unless it is a readable GGUF file."""
    p = Path(path).expanduser()
    problem = input_problem(p, empty_ok=False)  # by type first: a FIFO would block, a device never end
    if problem == "file not found":
        raise ModelLoadError(f"{what} not found: {path}")
    if problem is not None:
        raise ModelLoadError(f"{what} {path}: {problem}")
    try:
        is_gguf = has_gguf_magic(p)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc}") from exc
    if not is_gguf:
        raise ModelLoadError(f"{what} {path} is not a GGUF file")
    return p


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The file's header key/values (scalars, strings, short arrays; no tensors, no vocabulary)."""
    try:
        return read_metadata(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable GGUF ({describe(exc)})") from exc


def find_mmproj(model: str | Path) -> Path:
    """The mmproj next to an LM .gguf: ``*mmproj*.gguf`` (rot180 companions excluded).

    With several candidates, one with the LM's type tag (f32/f16) wins, then F32, then the only
    one that shares the LM's name prefix; anything still ambiguous is an error.
    """
    lm = Path(model).expanduser()
    cands = sorted(p for p in lm.parent.glob("*mmproj*.gguf")
                   if not p.name.endswith(ROT_SUFFIX) and p.resolve() != lm.resolve())
    if not cands:
        raise ModelLoadError(f"no mmproj found next to {model} (expected a *mmproj*.gguf file; pass --mmproj)")
    if len(cands) == 1:
        return cands[0]
    stem = lm.name[: -len(".gguf")]
    base = stem.rsplit("-", 1)[0]
    same_base = [p for p in cands if p.name.startswith(base)] or cands
    for tag in (stem.rsplit("-", 1)[-1], "f32"):
        tagged = [p for p in same_base if p.name.endswith(f"-{tag}.gguf")]
        if len(tagged) == 1:
            return tagged[0]
    if len(same_base) == 1:
        return same_base[0]
    raise ModelLoadError(f"several mmproj files next to {model}: {', '.join(p.name for p in cands)} (pass --mmproj)")
