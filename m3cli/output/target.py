"""The ``-o`` file of one ``m3 batch`` run, held from before the model loads until the run ends.

:meth:`OutputTarget.open` runs before any work: it creates the folder and the file (never truncating it),
takes an exclusive lock on it (a second run on the same file, e.g. a requeued job-array task, stops with
one line instead of writing duplicates), and for ``--resume`` checks and repairs it
(:func:`~m3cli.output.resume.prepare_resume`). Every problem there is a one-line
:class:`~m3cli.errors.OutputError` (exit code 2) and leaves an existing file as it was. Only
:meth:`OutputTarget.sink`, called once the model has loaded, truncates a file that is not resumed.

The lock is ``flock`` on the output file itself (released by the kernel when the process dies, so a
killed run never leaves a stale lock); where the platform or file system has none, the run goes unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from m3cli.errors import OutputError, describe
from m3cli.output.resume import ResumeState, prepare_resume
from m3cli.output.sinks import Format, RowSink, escape_path, make_parent, open_sink

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def is_stdout(path: str | os.PathLike[str] | None) -> bool:
    """Whether an ``-o`` value means stdout (none, or ``-``)."""
    return path is None or os.fspath(path) == "-"


class OutputTarget:
    """Where one run's rows go; use :meth:`open`, then :meth:`sink` once the work starts, then :meth:`close`."""

    def __init__(self, path: str | None, fmt: Format, resume: bool) -> None:
        self.path = None if is_stdout(path) else os.fspath(path)
        self.fmt = fmt
        self.resume = resume
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
        row_of: Callable[[Any], Any] | None = None,
    ) -> OutputTarget:
        """Create and lock the file, and for ``resume`` check it against ``run`` (see the module doc); ``row_of``
        reads the row out of a line that wraps it (``prepare_resume``)."""
        target = cls(None if path is None else os.fspath(path), fmt, resume)
        if target.path is None:
            return target
        try:
            target._acquire()
            if resume:
                target.state = prepare_resume(target.path, run, force=force, retry_errors=retry_errors,
                                              row_of=row_of)
        except BaseException:
            target.close(abandon=True)
            raise
        return target

    @property
    def name(self) -> str:
        return "stdout" if self.path is None else escape_path(self.path)

    def _acquire(self) -> None:
        path = self.path
        assert path is not None
        make_parent(path)
        if os.path.isdir(path):
            raise OutputError(f"{self.name}: is a directory")
        existed = os.path.lexists(path)
        try:
            # Opened for writing, so permissions fail now rather than after the model has loaded; no O_TRUNC.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(f"{self.name}: cannot write ({describe(exc)})") from None
        self._lock_fd = fd
        self._created = not existed
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{self.name} is being written by another m3 batch run (it holds the file's lock); wait for "
                    "it to finish, or write to another -o"
                ) from None
            log.debug("no lock on %s (%s): running unlocked", self.name, describe(exc))

    def sink(self) -> RowSink:
        """The sink for the rows: stdout, the file appended to (resume) or the file started afresh."""
        self._sink_opened = True
        return open_sink(self.fmt, self.path, append=self.resume)

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
