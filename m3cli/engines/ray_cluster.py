"""Joining a Ray cluster for ``--engine ray``: the extra installed, the address reachable, the cluster sized.

Everything fails as one :class:`~m3cli.engines.EngineError` line before any work. ``import ray`` here is the
top-level Ray package (absolute imports: the engine module ``m3cli.engines.ray`` does not shadow it).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from m3cli import logs
from m3cli.engines import EngineError
from m3cli.errors import ModelError

RAY_EXTRA_HINT = "--engine ray needs the ray extra: pip install 'm3cli[ray]'"
DECODE_CPUS = 0.25  # logical CPUs per decode task: light work, and it must fit beside the actors
GCS_WAIT_S = 5  # tries (about a second each) to reach the GCS of a cluster joined by address


def import_ray():
    """The ``ray`` package with Ray Data, or :class:`EngineError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(RAY_EXTRA_HINT) from None
    return ray


# A gRPC server (Ray's GCS and its client server both are) answers an HTTP/2 client preface with a SETTINGS
# frame at once; anything else at the address (another service, a proxy, a black hole) does not.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME = 0x04


def _speaks_grpc(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer answers an HTTP/2 preface with a SETTINGS frame within ``timeout`` seconds."""
    try:
        sock.settimeout(timeout)
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == _SETTINGS_FRAME


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when ``host:port`` refuses connections or does not answer as a Ray cluster (a gRPC
    server) within ``timeout`` seconds, instead of waiting out Ray's own retries; ``auto``/``local`` are left
    to Ray."""
    target = address.strip()
    if target in ("auto", "local"):
        return
    for prefix in ("ray://", "http://", "https://"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    target = target.split("/", 1)[0]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: let ray.init judge it
    host = host.strip("[]") or "127.0.0.1"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(
            f"no Ray cluster reachable at {address} ({reason}); start one with `ray start --head` "
            "or fix --ray-address"
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0") not in ("1", "true", "True") and not _speaks_grpc(sock, timeout):
            raise EngineError(f"{address} accepts connections but does not answer as a Ray cluster within "
                              f"{timeout:g} s (no gRPC reply); check --ray-address (the head's GCS port, 6379 by "
                              "default, or ray://HOST:10001)")


def preflight(model_kw: dict[str, Any], ray_address: str | None) -> None:
    """Cheap checks the CLI runs before it opens the output: Ray installed, the address answers, the model
    name resolves to a model the actors can run (family detection, no weights loaded). Raises
    :class:`EngineError` (one line); starts nothing."""
    import_ray()
    if ray_address:
        check_reachable(ray_address)
    from m3cli.backends import check_model

    try:
        check_model(**model_kw)
    except ModelError as exc:
        raise EngineError(str(exc)) from None


def ray_error_line(exc: BaseException) -> str:
    """A short line for an exception from Ray: the innermost cause's type and first line (a traceback that Ray
    folded into its message is left out: its last line, the error itself, is kept)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc)
    head, marker, trace = text.partition("Traceback (most recent call last):")
    lines = [ln.strip() for ln in head.splitlines() if ln.strip()]
    if marker:  # "... Last connection error: Traceback ...": the message before it, and the traceback's last line
        tail = [ln.strip() for ln in trace.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
        lines = [" ".join(lines) + (f" {tail[-1]}" if tail else "")] if lines else tail[-1:]
    text = lines[-1] if lines and lines[0].startswith("ray::") else (lines[0] if lines else "")
    name = type(exc).__name__
    return f"{name}: {text}" if text and not text.startswith(name) else (text or name)


def connect(ray, ray_address: str | None) -> bool:
    """Start or join a cluster; returns True when this call started the connection (and must end it)."""
    if ray_address:
        check_reachable(ray_address)
    if ray.is_initialized():
        return False  # the caller (e.g. a test or a notebook) owns the connection
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True
    )
    local = ray_address in (None, "", "local") and not os.environ.get("RAY_ADDRESS")
    if local:
        kwargs["num_cpus"] = os.cpu_count() or 1
    else:
        # Ray waits ~20 s (20 tries) for a GCS that answers wrongly or not at all; a cluster that is up answers
        # the first try, so a few seconds fail fast without slowing a real join (an operator's setting wins)
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(GCS_WAIT_S))
    try:
        ray.init(address=ray_address or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any start/connect failure is one user-facing line
        where = f"at {ray_address}" if ray_address else "locally"
        raise EngineError(f"cannot start or join a Ray cluster {where}: {ray_error_line(exc)}") from None
    return True


def quiet_ray_logs() -> None:
    """Silence Ray's Python loggers unless -v."""
    if logs.verbosity() < 1:
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def cluster_sizes(ray, actors: int, gpus_per_actor: float) -> tuple[float, int | None]:
    """Logical CPUs per answering actor, and torch threads for CPU inference (None: leave as is)."""
    resources = ray.cluster_resources()
    total_cpu = float(resources.get("CPU", 0))
    if gpus_per_actor:
        total_gpu = float(resources.get("GPU", 0))
        if total_gpu + 1e-9 < actors * gpus_per_actor:
            raise EngineError(
                f"--actors {actors} x --gpus-per-actor {gpus_per_actor:g} needs {actors * gpus_per_actor:g} GPUs; "
                f"the cluster has {total_gpu:g}"
            )
    if total_cpu <= DECODE_CPUS:
        raise EngineError(f"the Ray cluster has {total_cpu:g} CPUs; at least 1 is needed")
    # At most one logical CPU per actor, and always room for a decode task beside the actors, so a
    # small cluster (e.g. 2 CPUs, 2 actors) never starves the decoders.
    actor_cpus = min(1.0, (total_cpu - DECODE_CPUS) / actors)
    threads = None if gpus_per_actor else max(1, (os.cpu_count() or 1) // actors)
    return round(actor_cpus, 4), threads
