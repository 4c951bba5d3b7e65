"""``m3 bench serve``: requests/s and latency of ``m3 serve`` under load, against what a user would run instead.

The servers run as separate processes, started and stopped here, and are driven over HTTP by ``concurrency``
client threads (``m3cli.server.client.request_json``, the same client for every server) over ``n`` distinct
generated scenes sent as ``data:`` URLs. For each budget (9 tokens, 576, ``--auto-scale``) and concurrency
(1, 8, 32) a few untimed requests warm up, then ``repeat`` passes over the items are timed: requests/s per
pass (their spread is reported), and p50/p90/p99 latency over all timed requests.

- A GGUF pair (``--model LM.gguf``, or ``--shape NAME`` written as a quantised pair) is also served by
  llama-cpp-python's own server (``python -m llama_cpp.server --chat_format llava-1-5``) on the SAME pair, at
  576 tokens, its only setting; the two servers' answers at 576 are compared separately (llama.cpp's stock
  LLaVA encoder is not m3's, see docs/gguf.md), never counted as equal work.
- A torch model is also run in this process through ``m3 batch``'s engine on the same items at the same
  budgets (batch size = the server's ``--max-batch``): the cost of HTTP, JSON and queueing.
"""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m3cli.bench.scenes import BENCH_QUESTION, scene_files
from m3cli.errors import M3Error, UsageError
from m3cli.matryoshka.confidence import DEFAULT_MEASURE
from m3cli.matryoshka.policy import DEFAULT_THRESHOLD

# "auto" states its threshold and measure (the fallback's), as m3 batch's in-process rows use them: the bench times
# the same requests on every model, whatever its tuned policy
BUDGETS: dict[str, dict] = {"9": {"tokens": 9}, "576": {"tokens": 576},
                            "auto": {"auto_scale": True, "threshold": DEFAULT_THRESHOLD, "measure": DEFAULT_MEASURE}}
PEER = "llama_cpp.server"
M3 = "m3 serve"
START_TIMEOUT_S = 900.0   # a 7B pair loads in minutes on a slow disk
REQUEST_TIMEOUT_S = 86400.0


@dataclass
class LoadRun:
    """One (server, budget, concurrency) cell: requests/s of each timed pass and every request's latency."""

    server: str
    budget: str
    concurrency: int
    rates: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    failures: int = 0
    answers: dict[int, str] = field(default_factory=dict)  # item -> answer (the last pass)

    @property
    def rate(self) -> float:
        """Median requests/s over the passes."""
        return _quantile(self.rates, 0.5)

    def latency(self, q: float) -> float:
        return _quantile(self.latencies_ms, q)

    @property
    def mean_completion(self) -> float | None:
        return sum(self.completion_tokens) / len(self.completion_tokens) if self.completion_tokens else None


@dataclass
class ServeReport:
    runs: list[LoadRun]
    model: str
    backend: str
    items: int
    repeat: int
    max_new_tokens: int
    max_batch: int
    threads: int | None
    batch_rows: list = field(default_factory=list)   # torch: in-process m3 batch ThroughputRows, by budget
    agreement: float | None = None                   # share of items whose 576 answers agree, m3 vs the peer
    notes: list[str] = field(default_factory=list)

    def cell(self, server: str, budget: str, concurrency: int) -> LoadRun | None:
        return next((r for r in self.runs if (r.server, r.budget, r.concurrency) == (server, budget, concurrency)),
                    None)


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    """A TCP port nobody listens on now (the peer server takes a port number, not a socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a child process, stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log: list[str] = []

    def start_m3(self) -> ServerProcess:
        """``m3 serve --port 0``: its ready line names the URL."""
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self._log.append(line)
            found = re.search(r"ready at (http://\S+)/v1", line)
            if found:
                self.url = found.group(1)
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.stop()
        raise M3Error(f"{self.name} did not start: {''.join(self._log[-5:]).strip()}")

    def start_peer(self, url: str) -> ServerProcess:
        """A server that says nothing when ready: poll ``/v1/models`` until it answers."""
        from m3cli.server.client import ServerError, request_json

        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = url
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if request_json(url, "GET", "/v1/models", timeout=5)[0] == 200:
                    return self
            except ServerError:
                pass
            time.sleep(0.5)
        self.stop()
        raise M3Error(f"{self.name} did not start: {''.join(self._log[-5:]).strip()}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line)
            del self._log[:-50]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bodies(paths: Sequence[str], model: str, budget: dict | None, max_new_tokens: int) -> list[dict]:
    bodies = []
    for path in paths:
        url = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        body = {"model": model, "max_tokens": max_new_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": BENCH_QUESTION}]}]}
        if budget is not None:
            body["m3"] = budget
        bodies.append(body)
    return bodies


def drive(url: str, bodies: Sequence[dict], concurrency: int, run: LoadRun, timed: bool = True,
          api_key: str | None = None) -> None:
    """Send every body once with ``concurrency`` threads; a timed pass adds its rate and latencies to ``run``."""
    from m3cli.server.client import ServerError, request_json

    lock = threading.Lock()
    order = iter(range(len(bodies)))
    latencies: list[float] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                status, reply, _ = request_json(url, "POST", "/v1/chat/completions", bodies[i], api_key,
                                                 timeout=REQUEST_TIMEOUT_S)
            except ServerError:
                status, reply = 0, {}
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                if status != 200:
                    run.failures += 1
                    continue
                latencies.append(elapsed)
                usage = reply.get("usage") or {}
                if timed and isinstance(usage.get("completion_tokens"), int):
                    run.completion_tokens.append(usage["completion_tokens"])
                run.answers[i] = ((reply.get("choices") or [{}])[0].get("message") or {}).get("content") or ""

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(bodies)))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if timed:
        run.rates.append(len(latencies) / wall if wall > 0 else float("nan"))
        run.latencies_ms.extend(latencies)


def load_series(server: str, url: str, bodies: Sequence[dict], budget: str, concurrencies: Sequence[int],
                repeat: int, on_cell=None, api_key: str | None = None) -> list[LoadRun]:
    """Warm up, then every concurrency ``repeat`` times over ``bodies``."""
    warm = LoadRun(server, budget, 1)
    drive(url, bodies[: min(4, len(bodies))], 1, warm, timed=False, api_key=api_key)
    runs = []
    for c in concurrencies:
        run = LoadRun(server, budget, c)
        drive(url, bodies[: min(c, len(bodies))], c, run, timed=False, api_key=api_key)  # its own warm-up
        for _ in range(repeat):
            drive(url, bodies, c, run, api_key=api_key)
        runs.append(run)
        if on_cell is not None:
            on_cell(run)
    return runs


def m3_command(model: str, mmproj: str | None, backend: str, device: str, threads: int | None, max_batch: int,
               max_queue: int) -> list[str]:
    # no request timeout: at concurrency 32 on a 7B CPU run a request may rightly wait many minutes
    cmd = [sys.executable, "-m", "m3cli", "serve", "--port", "0", "--model", model, "--backend", backend,
           "--device", device, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
           "--request-timeout", str(REQUEST_TIMEOUT_S)]
    if mmproj:
        cmd += ["--mmproj", mmproj]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def peer_command(lm: str, mmproj: str, port: int, threads: int | None, n_ctx: int = 2048) -> list[str]:
    """llama-cpp-python's own OpenAI server on the pair, as its documentation starts it."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", lm, "--clip_model_path", mmproj,
           "--chat_format", "llava-1-5", "--n_ctx", str(n_ctx), "--host", "127.0.0.1", "--port", str(port),
           "--n_gpu_layers", "0"]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return cmd


def serve_bench(model: str, mmproj: str | None, gguf: bool, count: int, concurrencies: Sequence[int],
                budgets: Sequence[str], repeat: int, max_new_tokens: int, max_batch: int, threads: int | None,
                workdir: str, device: str = "cpu", peer: bool = True, on_cell=None,
                notes: Sequence[str] = ()) -> ServeReport:
    """Every cell of the table for one model (see the module doc); ``on_cell`` sees each finished cell."""
    bad = [b for b in budgets if b not in BUDGETS]
    if bad:
        raise UsageError(f"--budgets {bad[0]!r}: use 9, 576 and/or auto")
    paths = scene_files(Path(workdir) / "scenes", count)
    report = ServeReport([], model, "llamacpp" if gguf else "torch", count, repeat, max_new_tokens, max_batch,
                         threads, notes=list(notes))
    queue = max(64, 4 * max(concurrencies))
    with ServerProcess(M3, m3_command(model, mmproj, "llamacpp" if gguf else "torch", device, threads, max_batch,
                                      queue)).start_m3() as server:
        from m3cli.server.client import request_json

        name = request_json(server.url, "GET", "/v1/models")[1]["data"][0]["id"]
        for budget in budgets:
            bodies = _bodies(paths, name, BUDGETS[budget], max_new_tokens)
            report.runs += load_series(M3, server.url, bodies, budget, concurrencies, repeat, on_cell)
    if gguf and peer:
        report.runs += _peer_runs(model, mmproj, paths, concurrencies, repeat, max_new_tokens, threads, on_cell)
        ours = next((r for r in report.runs if r.server == M3 and r.budget == "576"), None)
        theirs = next((r for r in report.runs if r.server == PEER), None)
        if ours and theirs:
            shared = set(ours.answers) & set(theirs.answers)
            same = sum(ours.answers[i].strip().lower() == theirs.answers[i].strip().lower() for i in shared)
            report.agreement = same / len(shared) if shared else None
    if not gguf:
        report.batch_rows = _in_process_batch(model, device, threads, paths, budgets, max_batch, max_new_tokens)
    return report


def _peer_runs(lm: str, mmproj: str | None, paths, concurrencies, repeat, max_new_tokens, threads,
               on_cell) -> list[LoadRun]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"the peer needs llama-cpp-python's server extras: pip install 'llama-cpp-python[server]' "
                         f"({exc}); or --no-peer") from None
    if mmproj is None:
        from m3cli.backends.llamacpp.files import find_mmproj

        mmproj = str(find_mmproj(Path(lm)))
    port = free_port()
    with ServerProcess(PEER, peer_command(lm, mmproj, port, threads)).start_peer(f"http://127.0.0.1:{port}") as peer:
        bodies = _bodies(paths, lm, None, max_new_tokens)
        return load_series(PEER, peer.url, bodies, "576", concurrencies, repeat, on_cell)


def _in_process_batch(model: str, device: str, threads: int | None, paths, budgets, batch_size: int,
                      max_new_tokens: int) -> list:
    """``m3 batch``'s engine in this process on the same items, after the server has stopped."""
    from m3cli.backends import open_backend
    from m3cli.bench.throughput import batch_throughput

    backend = open_backend(model, backend="torch", device=device, threads=threads)
    try:
        batch_throughput(backend, paths[:batch_size], BENCH_QUESTION, 9, batch_size, max_new_tokens)  # warm-up
        rows = []
        for budget in budgets:
            auto = budget == "auto"
            rows.append((budget, batch_throughput(backend, paths, BENCH_QUESTION, None if auto else int(budget),
                                                  batch_size, max_new_tokens, auto_scale=auto)))
        return rows
    finally:
        backend.close()


def machine_line(threads: int | None, device: str = "cpu") -> str:
    """Where the servers ran (m3cli.bench.stats.machine_words), taken when the bench starts."""
    from m3cli.bench.stats import machine_words

    return machine_words(f"{threads or 'all'} threads per server", device)
