"""Small file helpers shared by every writer: atomic writes, JSONL reading, the JSON row encoding, and text
that is safe to write whatever bytes a file name held."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def default_file_mode() -> int:
    """0666 minus the umask: what ``open(path, "w")`` would have given the file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """A stream on a temp file next to ``path``; on success it is fsynced and renamed over ``path``,
    on any error removed, so readers never see a half-written file. ``mode`` is "w" or "wb"."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, default_file_mode())
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], prefix: str = ".partial-") -> Iterator[Path]:
    """A temp folder beside ``final``; on success renamed to ``final`` (replacing nothing: if ``final``
    appeared meanwhile, e.g. a racing process, the temp folder is dropped and ``final`` kept)."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_default(value: Any) -> Any:
    """Encode the odd non-JSON value instead of killing a long run: numpy scalars via .item(), else str()."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def finite(value: Any) -> Any:
    """Replace NaN/inf (which json.dumps would emit as invalid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps_row(value: Any) -> str:
    """One compact JSON line for a result row (UTF-8 text, NaN-free, odd values encoded)."""
    return json.dumps(finite(value), ensure_ascii=False, separators=(",", ":"), default=json_default)


def escape_surrogates(text: str) -> str:
    """``text`` as valid Unicode, so any UTF-8 writer takes it.

    A file name that is not valid UTF-8 reaches Python with each undecodable byte as a lone surrogate
    U+DC80..U+DCFF (``surrogateescape``); such a byte is written as the four characters ``\\xNN``, any other
    lone surrogate (e.g. from a JSON ``"\\ud800"``) as ``\\uXXXX``. Valid text is returned unchanged, so
    ordinary names, ids and answers never change. The original bytes of a path: :func:`path_bytes_b64`.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape_char(c) for c in text)
    return text


def _escape_char(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return c


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds lone surrogates (an undecodable file name byte, or a broken JSON string)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def path_bytes_b64(path: str) -> str:
    """Base64 of a path's exact bytes as the OS has them (``os.fsencode``): what recovers a name that
    :func:`escape_surrogates` had to escape (``base64.b64decode(value)`` gives the bytes back)."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no file name can hold (e.g. from JSON): keep it visible
        raw = path.encode("utf-8", "surrogatepass")
    return base64.b64encode(raw).decode("ascii")


def text_safe(value: Any) -> Any:
    """``value`` with :func:`escape_surrogates` applied to every string in it (dict keys included)."""
    if isinstance(value, str):
        return escape_surrogates(value)
    if isinstance(value, dict):
        return {text_safe(k): text_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [text_safe(v) for v in value]
    return value


def iter_jsonl(f: IO[bytes]) -> Iterator[tuple[int, int, bytes, Any]]:
    """Yield ``(lineno, end_offset, raw_line, parsed)`` for each line of a binary stream.

    ``parsed`` is the decoded JSON value, or ``None`` for a blank line, or the exception for a line that
    is not valid JSON (or is cut inside a UTF-8 sequence). An unterminated last line is yielded with
    ``raw`` not ending in a newline, so callers decide whether it counts.
    """
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        offset += len(raw)
        if not raw.strip():
            yield lineno, offset, raw, None
            continue
        try:
            yield lineno, offset, raw, json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            yield lineno, offset, raw, exc
