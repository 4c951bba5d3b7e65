"""Progress of long work on stderr, one mechanism for every command (``m3 batch``, ``m3 eval``, ``m3 bench``).

On a terminal it is a tqdm bar (count, rate, and with a known total the percentage and ETA). Anywhere else
(a log file, CI, a pipe) it is one line every ``M3_PROGRESS_SECONDS`` seconds (default 30), e.g.
``m3 eval: 120/600 rows (20%), 4.1 rows/s, elapsed 0:29, ETA 1:57``, and a closing line if any was printed,
so short runs stay quiet and long ones never look hung. ``--no-progress`` turns both off; ``--progress``
asks for the bar even when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Literal

Mode = Literal["bar", "log", "off"]
ENV_SECONDS = "M3_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
COUNT_WAIT_S = 2.0  # how long ``close`` waits for a background count, so a short run's last line has its total


def log_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal (``$M3_PROGRESS_SECONDS``, default 30)."""
    try:
        seconds = float(os.environ.get(ENV_SECONDS, DEFAULT_SECONDS))
    except ValueError:
        return DEFAULT_SECONDS
    return seconds if seconds >= 0 else DEFAULT_SECONDS


def progress_mode(flag: bool | None, stream: IO[str] | None = None) -> Mode:
    """``--progress`` (True): a bar; ``--no-progress`` (False): nothing; unset: a bar on a terminal, else lines."""
    if flag is False:
        return "off"
    if flag is True:
        return "bar"
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "log"


def clock(seconds: float) -> str:
    """``0:29``, ``12:05``, ``1:02:03``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts units of work done; shows them as the mode says (see the module doc).

    ``update(n, note)`` adds done units (``note``: a short status shown beside the count, e.g. training
    losses), ``__call__(done, total)`` sets both (the callback form of the eval core), ``set_total`` may be
    called from another thread (a count made in the background), ``close`` ends it. ``initial``: units
    already done before this run (a resumed one); the rate counts only this run's.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "item", mode: Mode | bool | None = None,
                 stream: IO[str] | None = None, interval: float | None = None, initial: int = 0) -> None:
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode: Mode = mode if isinstance(mode, str) else progress_mode(mode, self.stream)
        self.interval = log_interval() if interval is None else interval
        self.done = initial
        self._initial = initial
        self.note: str | None = None
        self.total = total
        self._pending_total: int | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_line = self._started
        self._lines = 0
        self._closed = False
        self._counter: threading.Thread | None = None
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=total, unit=unit, file=self.stream, dynamic_ncols=True,
                             initial=initial)

    # -- counting ------------------------------------------------------------------------------------------------
    def set_total(self, total: int | None) -> None:
        """The number of units in all, once known (thread-safe; shown from the next update)."""
        with self._lock:
            self._pending_total = total

    def count_in_background(self, count: Callable[[], int | None], name: str) -> None:
        """Count the total in a daemon thread (``count()`` becomes the total when it returns); ``close`` waits
        for it up to ``COUNT_WAIT_S``."""
        self._counter = threading.Thread(target=lambda: self.set_total(count()), daemon=True, name=name)
        self._counter.start()

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done (``note``: the status to show with them from now on)."""
        self._take_total()
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self.mode == "log" and n > 0:
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._write(self.line(now))

    def __call__(self, done: int, total: int | None = None) -> None:
        """Set the units done (and the total): the ``progress(done, total)`` callback of the eval core."""
        if total is not None and total != self.total:
            self.set_total(total)
        if done > self.done or (done == 0 and self.done == 0):
            self.update(done - self.done)

    def _take_total(self) -> None:
        with self._lock:
            total, self._pending_total = self._pending_total, None
        if total is None or total == self.total:
            return
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    # -- showing ---------------------------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The one-line report: done (of total, percent), rate, elapsed and ETA."""
        elapsed = (now if now is not None else time.monotonic()) - self._started
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total} {self.unit}s" if self.total else f"{self.done} {self.unit}s"
        if self.total:
            count += f" ({100 * self.done / self.total:.0f}%)"
        parts = [count, f"{rate:.2f} {self.unit}s/s", f"elapsed {clock(elapsed)}"]
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {clock((self.total - self.done) / rate)}")
        return f"{self.desc}: {', '.join(parts)}" + (f" · {self.note}" if self.note else "")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr gone: progress is never worth failing a run for
            self.mode = "off"
            return
        self._lines += 1

    def close(self) -> None:
        """End the bar; in line mode, a last line if any line was printed (a short run prints none)."""
        if self._closed:
            return
        self._closed = True
        if self._counter is not None:
            self._counter.join(COUNT_WAIT_S)
        self._take_total()
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and self._lines:
            self._write(self.line() + " (end)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
