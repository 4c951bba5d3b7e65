"""The one family of user-facing errors.

Every problem the user can act on is an ``M3Error`` (or a subclass): its message is ONE line, and the
CLI turns it into ``m3: error: <message>`` with ``exit_code``. Anything else reaching the CLI is a bug;
it is still printed as one line, with the traceback under ``-vv``.

This module imports nothing heavy, so the CLI's exit path never pulls in torch, transformers or Ray.
"""

from __future__ import annotations

import re

# Control characters (C0 but whitespace, DEL, C1) and the bidirectional overrides: printed raw they move the
# cursor, recolour or rewrite a terminal, or reorder what the reader sees (a file name can hold any of them).
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``): safe to print to
    a terminal or a log, and still readable. Text without control characters is returned unchanged."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def one_line(value: object) -> str:
    """``str(value)`` as one printable line: every whitespace run (newlines, tabs) becomes one space and control
    characters are escaped (:func:`escape_controls`)."""
    return escape_controls(" ".join(str(value).split()))


def describe(exc: BaseException) -> str:
    """A short single-line description of a library exception (its strerror, first message, or type)."""
    msg = getattr(exc, "strerror", None) or str(exc).strip()
    lines = [ln for ln in str(msg).splitlines() if ln.strip()]
    return one_line(lines[0]) if lines else type(exc).__name__


class M3Error(Exception):
    """A user-facing problem: one line on stderr and ``exit_code`` (2: before any work)."""

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class UsageError(M3Error):
    """Bad options or arguments (the CLI shows it like click's own usage errors)."""


class ModelError(M3Error):
    """The model cannot be found, recognised or loaded."""


class MediaError(M3Error):
    """One input file cannot be read as an image or video (the message names the file)."""


class ConvertError(ModelError):
    """A model cannot be converted (original LLaVA -> HF, HF -> GGUF, mmproj repair)."""


class EngineError(M3Error):
    """An execution engine cannot start (framework missing, cluster unreachable)."""


class OutputError(M3Error):
    """The output cannot be written (disk full, permissions, a file that is not ours to resume)."""


class ItemError(M3Error):
    """One item cannot be answered (its question, image, prompt length or the model's run on it).

    In ``m3 batch`` it is that item's error row alone, never its batch neighbours'; ``m3 ask`` exits 1.
    """

    exit_code = 1
