"""Drop Ray's C++ log lines from stderr while keeping everything else written there.

Ray's core worker writes glog-style lines (``[2026-11-26 13:29:30,889 E 16022 16022] core_worker.cc:2465:
...``) straight to file descriptor 2, past Python logging, so neither ``log_to_driver`` nor logging levels
stop them. :func:`filter_native_stderr` points fd 2 at a pipe for the duration of a block; a thread copies
what arrives to the real stderr as it comes (progress bars included), except whole lines in that format.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w.]+\.(cc|h):\d+: ")
_STAMP = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,")  # how every native line begins
_STAMP_LEN = len(b"[2026-01-01 00:00:00,")


def _could_be_native(buf: bytes) -> bool:
    """True while ``buf`` (no newline yet) may still turn out to be a native log line: it starts with
    ``[`` and is too short to tell, or it starts with a native line's timestamp."""
    return buf.startswith(b"[") and (len(buf) < _STAMP_LEN or _STAMP.match(buf) is not None)


def _pump(read_fd: int, write_fd: int) -> None:
    buf = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf += chunk
        while buf:
            cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                if _could_be_native(buf):
                    break  # wait for the rest of the line
                os.write(write_fd, buf)
                buf = b""
                break
            line, buf = buf[: cut + 1], buf[cut + 1 :]
            if not NATIVE_LINE.match(line):
                os.write(write_fd, line)
    if buf and not NATIVE_LINE.match(buf):
        os.write(write_fd, buf)


@contextlib.contextmanager
def filter_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Within the block, native log lines written to fd 2 are dropped; all other output passes through."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (an embedded interpreter): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_fd, saved), name="m3-stderr-filter", daemon=True)
    pump.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes our write end: the pump drains and stops
        pump.join(timeout=5)
        if not pump.is_alive():  # else a child process still holds the pipe: leave both fds to the pump
            os.close(read_fd)
            os.close(saved)
