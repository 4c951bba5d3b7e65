"""Optional execution engines for ``m3 batch`` beyond the single-process runner (``m3cli.runner``).

Each engine lives in its own module and imports its framework lazily, so ``import m3cli`` never pulls
in Ray (or anything else heavy) unless that engine is asked for. The errors live here, free of heavy
imports, so the CLI can map them to exit codes without importing an engine.
"""

from __future__ import annotations


class EngineError(Exception):
    """The engine cannot start (framework missing, cluster unreachable, model unusable): one line, exit code 2."""


class EngineRunError(Exception):
    """The run stopped part-way; rows written so far are kept and flushed. ``missing_ids``: inputs with no
    complete output yet (``--resume`` answers exactly those)."""

    def __init__(self, message: str, missing_ids: list[str] | None = None):
        super().__init__(message)
        self.missing_ids = list(missing_ids or [])


__all__ = ["EngineError", "EngineRunError"]
