"""One server run: bind the port, load the model once, serve until SIGTERM/SIGINT, drain, exit 0.

The port is bound before the model loads, so a port in use is one line (exit 2) without the wait. On
SIGTERM or SIGINT uvicorn stops accepting connections and waits for every request in flight (queued ones
included: the worker keeps answering) before :func:`serve` returns; a second SIGINT stops at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from m3cli.errors import UsageError, describe
from m3cli.server.settings import ServerSettings

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); :class:`UsageError` when impossible."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({describe(exc)})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({describe(exc)})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """``http://HOST:PORT`` of a bound socket (the port it really got)."""
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve(settings: ServerSettings, model: dict[str, Any], on_ready: Callable[[str, Any], None] | None = None,
          verbose: bool = False) -> int:
    """Serve ``model`` (``open_backend``'s keyword arguments) until a signal; returns the exit code (0).

    ``on_ready(url, backend)`` is called once requests are accepted.
    """
    from m3cli.answering.chat_request import model_names
    from m3cli.backends import open_backend
    from m3cli.server.app import ServerState, create_app
    from m3cli.server.worker import ModelWorker

    settings.check()
    sock = bind(settings.host, settings.port)
    try:
        backend = open_backend(**model)
        try:
            policy = settings.defaults.policy
            if policy.auto_scale:
                from m3cli.matryoshka.policy import make_ladder

                make_ladder(backend.grid_side, policy.ladder, policy.tokens)  # a bad --ladder
            worker = ModelWorker(backend, settings.max_queue, settings.max_batch, settings.max_question_chars)
            worker.warm_up()
            worker.start()
            name, names = model_names(backend.model_id, settings.served_name)
            url = url_of(sock, settings.host)
            state = ServerState(settings, worker, backend, name, names, settings.media_access(),
                                on_ready=(lambda: on_ready(url, backend)) if on_ready else None)
            forced = True
            try:
                forced = _run_uvicorn(create_app(state), sock, verbose)
            finally:
                worker.stop(timeout=1.0 if forced else None)  # a second Ctrl-C does not wait for the queue
        finally:
            backend.close()
    finally:
        sock.close()
    return 0


def _run_uvicorn(app, sock: socket.socket, verbose: bool) -> bool:
    """Serve until a signal; True when a second Ctrl-C forced the exit."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising the signal that stopped it: a drained shutdown exits 0."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == 2:  # a second SIGINT: stop without waiting
                self.force_exit = True
            else:
                self.should_exit = True

    config = uvicorn.Config(app, log_config=None, access_log=verbose, lifespan="on", timeout_keep_alive=5,
                            server_header=False)
    server = Server(config)
    server.run(sockets=[sock])
    return bool(server.force_exit)
