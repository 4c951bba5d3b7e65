"""What the CLI tests share: run m3 in-process or as a subprocess, make a small image, read JSONL rows, and
check that a failure printed exactly one error line and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from m3cli.cli import cli


def _arg(a) -> str:
    return os.fsdecode(a) if isinstance(a, bytes) else str(a)


def run_cli(args, input=None, env=None):
    """m3 in this process (click's runner); exceptions propagate, so a crash fails the test with its traceback."""
    return CliRunner().invoke(cli, [_arg(a) for a in args], input=input, env=env, catch_exceptions=False)


def run_m3(args, **kw) -> subprocess.CompletedProcess:
    """m3 in a subprocess (the real stdin/stdout encodings, signals, resource limits)."""
    return subprocess.run([sys.executable, "-m", "m3cli", *map(_arg, args)], capture_output=True, **kw)


def png(path: Path, colour=(200, 0, 0)) -> Path:
    """A 48 px single-colour PNG at ``path`` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), colour).save(path)
    return path


def rows(text: str | bytes) -> list[dict]:
    """The JSONL rows of a run's output."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_error_line(stderr: str, needle: str) -> None:
    """Exactly one ``error:`` line, naming ``needle``, and no traceback or internal error."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
