"""The engines behind ``m3 batch``: how a stream of inputs becomes rows, in this process or on a cluster.

``units`` holds what every engine shares (options, one input decoded into units, one batch answered),
``local`` the single-process engine, ``ray`` the Ray Data engine's driver with ``ray_cluster`` (joining a
cluster) and ``ray_workers`` (the code that runs there; Ray is imported only in these three), ``shard`` the
``--shard K/N`` split and ``m3 merge``, ``native_stderr`` the filter for Ray's C++ log lines, and ``job``
the whole ``m3 batch`` run (resume, shards, sinks, progress, engine choice, exit code) as a function the
CLI calls.

This module imports nothing heavy, so the CLI can map the errors to exit codes without importing an engine.
"""

from __future__ import annotations

from m3cli.errors import EngineError, M3Error


class EngineRunError(M3Error):
    """The run stopped part-way; rows written so far are kept and flushed. ``missing_ids``: inputs with no
    complete output yet (``--resume`` answers exactly those)."""

    exit_code = 1

    def __init__(self, message: str, missing_ids: list[str] | None = None):
        super().__init__(message)
        self.missing_ids = list(missing_ids or [])


__all__ = ["EngineError", "EngineRunError"]
