"""The run summary: counts, mean tokens and rate, and the one line ``m3 batch`` prints at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Summary:
    """Counts for a run and its one-line report; rates are over items actually processed (done + failed)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_failed: int = 0  # skipped items whose earlier row is an error (they still count for the exit code)
    tokens: int = 0  # summed over successful rows that report tokens
    token_rows: int = 0
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float | None = None  # fixed by stop(); live otherwise

    def add(self, row: dict[str, Any]) -> None:
        """Count one written row: failed if it has an error, else done (and its tokens)."""
        if row.get("error") is not None:
            self.failed += 1
            return
        self.done += 1
        if row.get("tokens") is not None:
            self.tokens += int(row["tokens"])
            self.token_rows += 1

    def skip(self, n: int = 1, failed: bool = False) -> None:
        """Count items not run (e.g. already done when resuming); ``failed`` if their earlier row is an error."""
        self.skipped += n
        if failed:
            self.skipped_failed += n

    def stop(self) -> None:
        """Freeze the elapsed time."""
        self.elapsed_s = time.monotonic() - self.started

    @property
    def elapsed(self) -> float:
        return self.elapsed_s if self.elapsed_s is not None else time.monotonic() - self.started

    @property
    def mean_tokens(self) -> float | None:
        return self.tokens / self.token_rows if self.token_rows else None

    @property
    def items_per_s(self) -> float | None:
        elapsed = self.elapsed
        return (self.done + self.failed) / elapsed if elapsed > 0 else None

    def line(self) -> str:
        """E.g. ``done 195, failed 3, skipped 2 · mean tokens 9.0 · 41.3 items/s``."""
        mean = self.mean_tokens
        rate = self.items_per_s
        counts = f"done {self.done}, failed {self.failed}, skipped {self.skipped}"
        if self.skipped_failed:
            counts += f" ({self.skipped_failed} with an earlier error row)"
        return (
            f"{counts}"
            f" · mean tokens {'n/a' if mean is None else f'{mean:.1f}'}"
            f" · {'n/a' if rate is None else f'{rate:.1f}'} items/s"
        )

    def __str__(self) -> str:
        return self.line()
