"""Small file helpers shared by every reader and writer: atomic writes, the one bounded line reader (and JSONL on
top of it), the one check of an input path by its type, content hashes, the JSON row encoding, and text that is
safe to write whatever bytes a file name held.

This is a leaf: it raises only standard exceptions (:class:`LineTooLong` is a ``ValueError``) and returns
one-line reasons (:func:`input_problem`), so each layer words them as its own error."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import stat
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


def default_dir_mode() -> int:
    """0777 minus the umask: what ``mkdir`` would have given a folder."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path) as f:
        f.write(text)


def follow_umask(folder: str | os.PathLike[str]) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open(..., "w")`` would have (the
    umask's): ``mkdtemp`` makes a folder 0700 and some writers make 0600 files, while what is finished is the
    user's own output. Symbolic links are left alone."""
    dir_mode, file_mode = default_dir_mode(), default_file_mode()
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], prefix: str = ".partial-") -> Iterator[Path]:
    """A temp folder beside ``final``; on success its modes follow the umask (:func:`follow_umask`) and it is
    renamed to ``final`` (replacing nothing: if ``final`` appeared meanwhile, e.g. a racing process, the temp
    folder is dropped and ``final`` kept)."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        follow_umask(tmp)
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


# --- the one bounded line reader ---------------------------------------------------------------------------

# The longest line any line-oriented input may have (stdin, eval data, resume and shard files): far above any row
# m3 reads or writes, small enough that input without newlines (``< /dev/zero``, a binary file) stops at once.
MAX_LINE_BYTES = 16 * 1024 * 1024


class LineTooLong(ValueError):
    """A line longer than the reader's limit: the input is not line-oriented text (or has no newlines)."""

    def __init__(self, lineno: int, limit: int) -> None:
        self.lineno = lineno
        self.limit = limit
        self.shown = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"
        super().__init__(f"line {lineno} is longer than {self.shown} (no newline: not line-oriented text)")


def iter_lines(stream: Any, limit: int = MAX_LINE_BYTES) -> Iterator[Any]:
    """The lines of ``stream`` (bytes or text, newline kept), each at most ``limit`` long.

    Memory stays bounded whatever the input: a line longer than ``limit`` raises :class:`LineTooLong` after
    reading at most ``limit + 1`` bytes of it. ``stream`` needs ``readline(size)`` (a file, stdin's buffer, a
    StringIO); any other iterable of lines is taken as already bounded and only checked.
    """
    readline = getattr(stream, "readline", None)
    if readline is None:
        for lineno, line in enumerate(stream, start=1):
            if len(line) > limit:
                raise LineTooLong(lineno, limit)
            yield line
        return
    lineno = 0
    while True:
        line = readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit:
            raise LineTooLong(lineno, limit)
        yield line


def iter_jsonl(f: Any, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, int, bytes, Any]]:
    """Yield ``(lineno, end_offset, raw_line, parsed)`` for each line of a binary stream (:func:`iter_lines`:
    a line over ``limit`` raises :class:`LineTooLong`).

    ``parsed`` is the decoded JSON value, or ``None`` for a blank line, or the exception for a line that
    is not valid JSON (or is cut inside a UTF-8 sequence). An unterminated last line is yielded with
    ``raw`` not ending in a newline, so callers decide whether it counts.
    """
    offset = 0
    for lineno, raw in enumerate(iter_lines(f, limit), start=1):
        offset += len(raw)
        if not raw.strip():
            yield lineno, offset, raw, None
            continue
        try:
            yield lineno, offset, raw, json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            yield lineno, offset, raw, exc


# --- the one check of an input path --------------------------------------------------------------------------

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def looks_like_url(text: str) -> bool:
    """Whether ``text`` is written like a URL (``scheme://...``)."""
    return bool(_URL.match(text))


def special_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is neither a regular file nor a folder, else None."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a special file"


def input_problem(path: str | os.PathLike[str], *, folder_ok: bool = False, empty_ok: bool = True) -> str | None:
    """Why ``path`` cannot be read as an input file, decided by its type BEFORE anything opens it (opening a
    FIFO blocks, a device never ends); None when it can.

    The reasons are short phrases to put after the name: ``file not found``, ``is a URL: ...``, ``is a broken
    symbolic link``, ``is a FIFO (named pipe), not a regular file`` (likewise devices and sockets), ``is a
    directory, not a file`` (unless ``folder_ok``), ``empty file`` (unless ``empty_ok``), ``permission denied``.
    Every command that takes an input path asks this one function.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        if looks_like_url(name):
            return "is a URL: m3 reads local files only, not URLs (download it first)"
        if os.path.islink(name):
            return "is a broken symbolic link (its target does not exist)"
        return "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return f"cannot access ({exc.strerror or type(exc).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return None if folder_ok else "is a directory, not a file"
    kind = special_kind(st.st_mode)
    if kind is not None:
        return f"is {kind}, not a regular file"
    if not empty_ok and st.st_size == 0:
        return "empty file"
    if not os.access(name, os.R_OK):
        return "permission denied"
    return None


# --- content identity ----------------------------------------------------------------------------------------


def content_hash(*parts: Any, length: int = 16) -> str:
    """A short hex digest (blake2b) of ``parts`` as canonical JSON: the identity of an input row by what it
    holds, never by where it stands. Equal parts give equal digests across processes, machines and versions."""
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=max(4, (length + 1) // 2))
    return digest.hexdigest()[:length]
