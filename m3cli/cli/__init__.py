"""The ``m3`` command line: one module per command (or close family); each parses, calls the core, prints.

``app`` holds the group, logging and the error handling; ``options`` the shared option sets and types.
"""

from __future__ import annotations

from m3cli.cli.app import cli, main
from m3cli.cli.ask import ask
from m3cli.cli.batch import batch, merge
from m3cli.cli.bench import bench
from m3cli.cli.convert import convert
from m3cli.cli.eval import eval_cmd
from m3cli.cli.models import list_models
from m3cli.cli.serve import serve
from m3cli.cli.train import train

for _command in (ask, batch, merge, serve, eval_cmd, train, convert, bench, list_models):
    cli.add_command(_command)

__all__ = ["cli", "main"]
