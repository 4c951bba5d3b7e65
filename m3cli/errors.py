"""The one family of user-facing errors.

Every problem the user can act on is an ``M3Error`` (or a subclass): its message is ONE line, and the
CLI turns it into ``m3: error: <message>`` with ``exit_code``. Anything else reaching the CLI is a bug;
it is still printed as one line, with the traceback under ``-vv``.

This module imports nothing heavy, so the CLI's exit path never pulls in torch, transformers or Ray.
"""

from __future__ import annotations


def one_line(value: object) -> str:
    """Collapse every whitespace run (newlines, tabs) of ``str(value)`` to one space."""
    return " ".join(str(value).split())


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
