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


def import_ray():
    """The ``ray`` package with Ray Data, or :class:`EngineError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(RAY_EXTRA_HINT) from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when ``host:port`` refuses connections; ``auto``/``local`` are left to Ray."""
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
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(
            f"no Ray cluster reachable at {address} ({reason}); start one with `ray start --head` "
            "or fix --ray-address"
        ) from None


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
    """A short line for an exception from Ray: the innermost cause's type and first line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
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
