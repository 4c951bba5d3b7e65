"""Peak memory of ``m3 batch`` over a short and a long stream: it must stay flat however many items stream.

Each stream runs ``repeat`` times (a fresh process each, short and long interleaved), so the table states
the spread of the peaks beside their medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m3cli.bench.scenes import BENCH_QUESTION, scene_files


@dataclass
class MemoryGrowth:
    small: int
    small_runs: list[float]  # peak RSS MiB of each run of the short stream
    large: int
    large_runs: list[float]

    @property
    def small_mib(self) -> float:
        return statistics.median(self.small_runs)

    @property
    def large_mib(self) -> float:
        return statistics.median(self.large_runs)

    @property
    def ratio(self) -> float:
        """Growth from the short to the long stream: the ratio of their median peaks."""
        return self.large_mib / self.small_mib


def peak_rss_of_batch(model: str | None, image_paths: Sequence[str], n_items: int, tokens: int = 9,
                      batch_size: int = 8) -> float:
    """Peak RSS (MiB) of a separate ``m3 batch`` process answering ``n_items`` stdin JSONL rows.

    Rows cycle over ``image_paths`` with unique ids, so the run streams ``n_items`` real items.
    """
    import json
    import subprocess
    import sys

    rows = "".join(json.dumps({"image": image_paths[i % len(image_paths)], "id": f"item-{i}"}) + "\n"
                   for i in range(n_items))
    cmd = [sys.executable, "-m", "m3cli", "batch", "-", "-q", BENCH_QUESTION, "--tokens", str(tokens),
           "--batch-size", str(batch_size), "--max-new-tokens", "4", "-o", "/dev/null", "--no-progress"]
    if model:
        cmd += ["--model", model]
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:], input=sys.stdin.read(), text=True, capture_output=True); "
             "sys.stderr.write(r.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode in (0, 1) else -1)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], input=rows, text=True, capture_output=True, check=True)
    kib = int(out.stdout.strip().splitlines()[-1])
    if kib < 0:
        raise RuntimeError(f"m3 batch failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}")
    return kib / 1024


def memory_growth(model: str | None, workdir: str, small: int, large: int, repeat: int = 3,
                  progress: Callable[[], None] | None = None) -> MemoryGrowth:
    """Peak RSS of a ``small`` and a ``large`` stream cycling over the same 50 scenes, each run ``repeat``
    times, interleaved (so a change in the machine's state touches both)."""
    paths = scene_files(workdir, 50)
    growth = MemoryGrowth(small, [], large, [])
    for _ in range(repeat):
        growth.small_runs.append(peak_rss_of_batch(model, paths, small))
        growth.large_runs.append(peak_rss_of_batch(model, paths, large))
        if progress:
            progress()
    return growth
