"""The output guard: every file m3 writes is checked before any work, locked or written atomically, and never
destroys what it should not.

Two kinds of output, one set of rules (:func:`check_path`):

* :class:`OutputTarget`, a results file written row by row while the run goes on (``m3 batch -o``,
  ``m3 eval --samples``). :meth:`OutputTarget.open` runs before any work: it checks the path, creates the file
  (never truncating it), takes an exclusive lock on it (a second run on the same file, e.g. a requeued
  job-array task, stops with one line instead of writing duplicates), refuses an existing results file
  without ``--resume`` or ``--overwrite`` (and someone else's file without ``--overwrite``), and for
  ``--resume`` checks and repairs it (:func:`~m3cli.output.resume.prepare_resume`). Only
  :meth:`OutputTarget.sink`, called once the work starts, truncates a file that is overwritten. Rows are
  appended one write and one flush each, in input order, so a stopped run leaves an in-order prefix with no
  gap that ``--resume`` completes.
* :class:`OutputFile`, a file written whole at the end (``m3 eval --json`` / ``--plot``, ``m3 merge -o``,
  ``m3 eval --export-data``): checked by :meth:`OutputFile.check` before any work and written atomically
  (a temp file beside it, renamed over it), so a reader sees the old file or the new one, never half of one.
* :func:`check_output_dir`, a folder files are written into (``m3 convert`` outputs), checked the same way;
  its files are written atomically (a converted model appears whole, as a folder renamed into place).

The checks (:func:`check_path`), all before any work, each a one-line :class:`~m3cli.errors.OutputError`
(exit code 2) that leaves an existing file as it was: the path is not a folder; its folder exists (created only
where the command says so, never for a report) and takes a new file (tried, so a read-only file system or a
full inode table is found now, not after an hour of work); it is not an input of the same run (a file given
as input, or a file a walked input folder would pick up on the next run). A problem while writing is an
:class:`~m3cli.output.sinks.OutputWriteError` (exit code 1): what was written before stays.

The lock is ``flock`` on the output file itself (released by the kernel when the process dies, so a killed
run never leaves a stale lock); where the platform or file system has none, the run goes unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from m3cli.errors import OutputError, describe
from m3cli.fileio import atomic_open, special_kind
from m3cli.output.resume import BATCH_ROWS, ResumeState, RowSchema, looks_like, prepare_resume
from m3cli.output.sinks import Format, OutputWriteError, RowSink, escape_path, make_parent, open_sink

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# A folder input and which of the files under it the run reads (e.g. m3 eval --data DIR: *.jsonl, *.csv).
FolderInput = tuple[str, Callable[[str], bool]]


def is_stdout(path: str | os.PathLike[str] | None) -> bool:
    """Whether an ``-o`` value means stdout (none, or ``-``)."""
    return path is None or os.fspath(path) == "-"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real != top and os.path.commonpath([real, top]) == top


def check_inputs(path: str, what: str, inputs: Sequence[str] = (), folders: Sequence[FolderInput] = ()) -> None:
    """Refuse an output that is an input of the same run: one of ``inputs``, or a file one of ``folders``
    would read (inside it and picked by its predicate), which the next run would then read as input."""
    name = escape_path(path)
    for source in inputs:
        if source != "-" and os.path.exists(source) and _same_file(path, source):
            raise OutputError(f"{what} {name} is also an input of this run; writing it would destroy that input "
                              "(write somewhere else)")
    for folder, picks in folders:
        if os.path.isdir(folder) and _inside(path, folder) and picks(path):
            raise OutputError(f"{what} {name} is inside the input folder {escape_path(folder)}, whose next run "
                              "would read it as input (write it outside the folder)")


def check_folder(path: str, what: str, create: bool) -> str:
    """The folder ``path`` goes in, checked to exist (created when ``create``; never otherwise) and to take a
    new file (one is made and removed again, the only test a read-only file system or a full inode table
    cannot fool). Returns the folder; OutputError (one line) otherwise."""
    parent = os.path.dirname(os.path.abspath(path))
    name = escape_path(path)
    if not os.path.isdir(parent):
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise OutputError(f"{what} {name}: {escape_path(parent)} is not a folder")
        if not create:
            raise OutputError(f"{what} {name}: the folder {escape_path(parent)} does not exist (create it first)")
        make_parent(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".m3-probe-", dir=parent)
    except OSError as exc:
        raise OutputError(f"{what} {name}: cannot write into {escape_path(parent)} ({describe(exc)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return parent


def check_path(path: str, what: str, *, create_parent: bool = False, inputs: Sequence[str] = (),
               folders: Sequence[FolderInput] = ()) -> os.stat_result | None:
    """The checks every output gets before any work (see the module doc); returns the existing file's stat
    (None: there is none yet)."""
    name = escape_path(path)
    if os.path.isdir(path):
        raise OutputError(f"{what} {name}: is a directory")
    check_inputs(path, what, inputs, folders)
    check_folder(path, what, create_parent)
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"{what} {name}: cannot access ({describe(exc)})") from None


def check_output_dir(path: str | os.PathLike[str], what: str, *, empty: bool = False, inputs: Sequence[str] = ()
                     ) -> str:
    """Check, before any work, a folder a command writes files into (``m3 convert`` outputs): not a file, not
    inside or equal to an input folder, empty when ``empty`` (a folder that appears whole), and creatable and
    writable (missing parents are made; a file is made and removed in it, or in its parent when it is to
    appear whole). Returns the path; OutputError (one line) otherwise."""
    path = os.fspath(path)
    name = escape_path(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {name}: exists and is not a folder")
    for source in inputs:
        if os.path.isdir(source) and (_same_file(path, source) or _inside(path, source)):
            raise OutputError(f"{what} {name} is inside the input {escape_path(source)} (write it elsewhere)")
    if empty and os.path.isdir(path):
        try:
            if os.listdir(path):
                raise OutputError(f"{what} {name}: already exists and is not empty")
        except OSError as exc:
            raise OutputError(f"{what} {name}: cannot read ({describe(exc)})") from None
    target = path if not empty else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else describe(exc)
        raise OutputError(f"{what} {name}: cannot create {escape_path(target)} ({why})") from None
    check_folder(os.path.join(target, "probe"), what, create=False)
    return path


class OutputTarget:
    """A results file written row by row; use :meth:`open`, then :meth:`sink` once the work starts, then
    :meth:`close`."""

    def __init__(self, path: str | None, fmt: Format, resume: bool, schema: RowSchema = BATCH_ROWS,
                 what: str = "-o") -> None:
        self.path = None if is_stdout(path) else os.fspath(path)
        self.fmt = fmt
        self.resume = resume
        self.schema = schema
        self.what = what
        self.state = ResumeState()
        self._lock_fd: int | None = None
        self._created = False
        self._sink_opened = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        fmt: Format = "jsonl",
        resume: bool = False,
        run: dict[str, Any] | None = None,
        force: bool = False,
        retry_errors: bool = False,
        *,
        overwrite: bool = False,
        inputs: Sequence[str] = (),
        folders: Sequence[FolderInput] = (),
        schema: RowSchema = BATCH_ROWS,
        what: str = "-o",
    ) -> OutputTarget:
        """Check, create and lock the file, and for ``resume`` check it against ``run`` (see the module doc).

        An existing non-empty file is resumed (``resume``), replaced (``overwrite``) or refused. ``inputs`` and
        ``folders`` are what the run reads (see :func:`check_inputs`); ``schema`` what the file's lines hold
        (an OpenAI Batch output file's lines wrap the row: ``schema.unwrap``); ``what`` names the option in
        messages.
        """
        target = cls(None if path is None else os.fspath(path), fmt, resume, schema, what)
        if target.path is None:
            return target
        try:
            special = target._acquire(inputs, folders)
            if not special:
                target._check_existing(overwrite)
            if resume:
                if special:
                    raise OutputError(f"{target.what} {target.name}: --resume needs a regular file")
                target.state = prepare_resume(target.path, run, force=force, retry_errors=retry_errors,
                                              schema=schema)
        except BaseException:
            target.close(abandon=True)
            raise
        return target

    @property
    def name(self) -> str:
        return "stdout" if self.path is None else escape_path(self.path)

    def _acquire(self, inputs: Sequence[str], folders: Sequence[FolderInput]) -> bool:
        """Check the path, create (no truncation) and lock the file; True for a FIFO or device (not locked)."""
        path = self.path
        assert path is not None
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and special_kind(mode) is not None:
            # a pipe or device (/dev/null, a process substitution) is written to, never replaced or locked
            check_inputs(path, self.what, inputs, folders)
            flags = os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) if stat.S_ISFIFO(mode) else os.O_WRONLY
            try:
                os.close(os.open(path, flags))
            except OSError as exc:
                why = "nothing reads the FIFO" if exc.errno == errno.ENXIO else describe(exc)
                raise OutputError(f"{self.what} {self.name}: cannot write ({why})") from None
            return True
        check_path(path, self.what, create_parent=True, inputs=inputs, folders=folders)
        existed = os.path.lexists(path)
        try:
            # Opened for writing, so permissions fail now rather than after the model has loaded; no O_TRUNC.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(f"{self.what} {self.name}: cannot write ({describe(exc)})") from None
        self._lock_fd = fd
        self._created = not existed
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{self.name} is being written by another {self.schema.command} run (it holds the file's "
                    f"lock); wait for it to finish, or write to another {self.what}"
                ) from None
            log.debug("no lock on %s (%s): running unlocked", self.name, describe(exc))
        return False

    def _check_existing(self, overwrite: bool) -> None:
        """An existing non-empty file is replaced only with ``overwrite`` and appended to only with ``--resume``."""
        assert self.path is not None
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return
        if size == 0 or self.resume or overwrite:
            return
        if self.fmt != "jsonl":  # CSV / text: whoever wrote it, it is replaced only on request
            raise OutputError(f"{self.what} {self.name} already exists; --overwrite replaces it (--resume completes "
                              "JSONL output only)")
        if looks_like(self.path, self.schema):
            raise OutputError(f"{self.what} {self.name} already holds {self.schema.command} results; --resume "
                              "completes it, --overwrite replaces it")
        raise OutputError(f"{self.what} {self.name} exists and was not written by {self.schema.command}; "
                          "--overwrite replaces it")

    def sink(self) -> RowSink:
        """The sink for the rows: stdout, the file appended to (resume) or the file started afresh."""
        self._sink_opened = True
        return open_sink(self.fmt, self.path, append=self.resume, row_id=self.schema.row_id)

    def close(self, abandon: bool = False) -> None:
        """Release the lock. With ``abandon`` (the run stopped before any work) a file this run created and
        left empty is removed again."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        if abandon and self._created and not self._sink_opened and self.path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the flock

    def __enter__(self) -> OutputTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OutputFile:
    """A file written whole at the end of a run: :meth:`check` it before any work, then :meth:`write_text` or
    :meth:`open` it (atomically) when the result is ready."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what

    @classmethod
    def check(
        cls,
        path: str | os.PathLike[str],
        what: str,
        *,
        overwrite: bool = False,
        results: bool = False,
        ours: Callable[[str], bool] | None = None,
        inputs: Sequence[str] = (),
        folders: Sequence[FolderInput] = (),
        create_parent: bool = False,
    ) -> OutputFile:
        """Check ``path`` before any work (:func:`check_path`) and what is there now.

        An existing non-empty file is replaced only when ``overwrite``, or when ``ours`` recognises it as this
        command's own earlier output (a report written again) and it does not hold ``results`` (computed rows
        are never replaced without ``overwrite``); a file ``ours`` does not recognise is said to be someone
        else's. A FIFO or device is refused: a rename would replace it.
        """
        path = os.fspath(path)
        name = escape_path(path)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        kind = special_kind(mode) if mode is not None else None
        if kind is not None:
            raise OutputError(f"{what} {name}: is {kind}, not a regular file (it is written whole and renamed into "
                              "place)")
        st = check_path(path, what, create_parent=create_parent, inputs=inputs, folders=folders)
        if st is not None and st.st_size > 0 and not overwrite:
            if ours is not None and not ours(path):
                raise OutputError(f"{what} {name} exists and was not written by m3; --overwrite replaces it")
            if results:
                raise OutputError(f"{what} {name} already exists; --overwrite replaces it")
            if ours is None:
                raise OutputError(f"{what} {name} exists and was not written by m3; --overwrite replaces it")
        return cls(path, what)

    @property
    def name(self) -> str:
        return escape_path(self.path)

    @contextlib.contextmanager
    def open(self, mode: str = "w") -> Iterator[IO]:
        """A stream whose content replaces the file atomically when the block ends; an OSError (full disk,
        the folder gone) is :class:`OutputWriteError` (one line, exit code 1) and the old file stays."""
        try:
            with atomic_open(self.path, mode) as stream:
                yield stream
        except OSError as exc:
            raise OutputWriteError(f"{self.what} {self.name}: cannot write ({describe(exc)})") from None

    def write_text(self, text: str) -> None:
        """Replace the file with ``text`` (UTF-8), atomically."""
        with self.open() as stream:
            stream.write(text)
