"""A live ``m3 serve`` app on a free port, in a thread of the test process (the model already loaded), and the
backend wrappers the server tests use to make the model slow or fail on purpose."""

from __future__ import annotations

import base64
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"
KEY = "test-key"


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def messages(question: str, url: str, detail: str | None = None) -> list[dict]:
    image = {"url": url} if detail is None else {"url": url, "detail": detail}
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": image}]}]


@dataclass
class Live:
    url: str
    state: object

    def client(self, key: str = KEY, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)


@contextmanager
def live_server(backend, **settings):
    """Serve ``backend`` until the block ends (the app, worker and settings of ``m3 serve``, in a thread)."""
    import uvicorn

    from m3cli.answering.chat_request import model_names
    from m3cli.server.app import ServerState, create_app
    from m3cli.server.run import bind, url_of
    from m3cli.server.settings import ServerSettings
    from m3cli.server.worker import ModelWorker

    if "defaults" not in settings:  # as m3 serve without policy flags: the model's tuned policy by default
        from m3cli.answering.chat_request import ChatDefaults
        from m3cli.answering.defaults import model_policy

        settings["defaults"] = ChatDefaults(model_policy=model_policy(backend.model_id))
    config = ServerSettings(port=0, **settings)
    sock = bind("127.0.0.1", 0)
    worker = ModelWorker(backend, config.max_queue, config.max_batch, config.max_question_chars)
    worker.start()
    name, names = model_names(backend.model_id, config.served_name)
    state = ServerState(config, worker, backend, name, names, config.media_access())
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(url_of(sock, "127.0.0.1"), state)
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop(30)
        sock.close()


class Wrapped:
    """A backend seen through: every attribute is the wrapped one's, ``answer`` can be slowed or made to fail."""

    def __init__(self, backend, delay: float = 0.0, fail_on: str | None = None) -> None:
        self._backend = backend
        self.delay = delay
        self.fail_on = fail_on

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def answer(self, requests):
        if self.fail_on is not None and any(self.fail_on in r.question for r in requests):
            raise RuntimeError(f"simulated failure on {self.fail_on!r}")
        time.sleep(self.delay)
        return self._backend.answer(requests)
