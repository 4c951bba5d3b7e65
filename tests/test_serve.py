"""``m3 serve`` against the official ``openai`` client: budgets equal to ``m3 ask``, streaming, concurrency,
hostile requests, overload, failures, disconnects, and ``m3 ask --server``.

One live server on the shipped model (in a thread of this process, the model loaded once) serves most tests;
the others start their own on the same backend, made slow or failing on purpose.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner
from serve_live import EXAMPLES, KEY, Wrapped, data_url, live_server, messages

from m3cli.answering.chat_shapes import ChatCompletion, ErrorResponse
from m3cli.answering.core import ask_images, policy_from_spec
from m3cli.answering.defaults import model_policy
from m3cli.backends.torch import TorchBackend
from m3cli.cli import cli
from m3cli.matryoshka.policy import PolicySpec
from m3cli.media import load_image
from m3cli.models.registry import resolve_model
from m3cli.output import round_confidences

COLOUR = "what colour is the background?"
COUNT = "how many shapes are there?"
SHAPE = "what shape is in the top right?"


@pytest.fixture(scope="module")
def shipped():
    return TorchBackend(resolve_model(None), device="cpu")


@pytest.fixture(scope="module")
def live(shipped):
    with live_server(shipped, api_key=KEY, max_body_bytes=1 << 20, max_batch=8) as server:
        yield server


def _local(backend, scene: int, question: str, policy_kw: dict, max_new: int = 8) -> dict:
    """What ``m3 ask`` answers (its core call) with the same flags: over the model's tuned policy."""
    policy_kw = dict(policy_kw)  # the caller's (parametrized) flags are asked again for the next question
    cap = policy_kw.pop("max_visual_tokens", None)
    flags = PolicySpec(**{**policy_kw, "ladder": tuple(policy_kw["ladder"]) if "ladder" in policy_kw else None})
    policy = policy_from_spec(backend.grid_side, flags, cap, model_policy(None))
    result = ask_images(backend, [load_image(EXAMPLES / f"scene-{scene}.png")], [question], [policy], max_new)[0]
    return round_confidences(result.to_dict())


def _served(client, scene: int, question: str, max_new: int = 8, detail=None, m3=None, **kw):
    extra = {"m3": m3} if m3 is not None else None
    return client.chat.completions.create(model="m3-shapes", messages=messages(question, data_url(
        EXAMPLES / f"scene-{scene}.png"), detail), max_completion_tokens=max_new, extra_body=extra, **kw)


SAME = ("answer", "confidence", "tokens", "visual_tokens", "scales_tried", "finish_reason", "prompt_tokens",
        "completion_tokens", "threshold_met")


@pytest.mark.parametrize(("m3", "detail", "policy_kw"), [
    ({"tokens": 1}, None, {"tokens": 1}),
    ({"tokens": 100}, None, {"tokens": 100}),
    (None, "low", {"tokens": 9}),
    (None, "high", {"tokens": 576}),
    (None, "auto", {}),                      # the server's default: no flags, the model's tuned policy
    (None, None, {}),
    ({"auto_scale": False}, None, {"tokens": 576}),
    ({"auto_scale": True, "measure": "mean", "on_miss": "best"}, None,
     {"auto_scale": True, "measure": "mean", "on_miss": "best"}),
    ({"auto_scale": True, "threshold": 0.5}, None, {"auto_scale": True, "threshold": 0.5}),
    ({"auto_scale": True, "ladder": [1, 36]}, "low", {"auto_scale": True, "ladder": [1, 36]}),
    ({"max_visual_tokens": 100}, None, {"max_visual_tokens": 100}),
])
def test_budgets_equal_m3_ask(live, shipped, m3, detail, policy_kw):
    client = live.client()
    for scene, question in ((0, COLOUR), (2, COUNT), (0, SHAPE)):
        reply = _served(client, scene, question, detail=detail, m3=m3)
        ChatCompletion.model_validate(reply.model_dump(exclude_unset=True))  # the body as sent
        want = _local(shipped, scene, question, policy_kw)
        got = reply.m3
        assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}, (scene, question)
        assert reply.choices[0].message.content == want["answer"]
        assert reply.choices[0].finish_reason == want["finish_reason"]
        usage = reply.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (want["prompt_tokens"], want["completion_tokens"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_prompt_tokens_are_text_plus_visual(live, shipped):
    reply = _served(live.client(), 0, COLOUR, m3={"tokens": 9})
    assert reply.usage.prompt_tokens == len(shipped.prompt_ids(COLOUR, 9)) and reply.m3["visual_tokens"] == 9


def test_length_and_stop(live):
    client = live.client()
    cut = _served(client, 1, "describe the image", max_new=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    full = _served(client, 1, "describe the image", max_new=40)
    words = full.choices[0].message.content.split()
    assert len(words) >= 3
    stopped = _served(client, 1, "describe the image", max_new=40, stop=[" " + words[2]])
    assert stopped.choices[0].message.content == " ".join(words[:2])
    assert stopped.choices[0].finish_reason == "stop"


def test_stream_equals_non_stream(live):
    client = live.client()
    for m3 in ({"tokens": 9}, {"auto_scale": True}):
        plain = _served(client, 2, COUNT, m3=m3)
        chunks = list(_served(client, 2, COUNT, m3=m3, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finals] == [plain.choices[0].finish_reason]
        assert finals[0].m3["scales_tried"] == plain.m3["scales_tried"]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_concurrent_clients_equal_sequential_answers(live):
    client = live.client()
    jobs = [(scene, q, m3) for scene in range(4) for q in (COLOUR, SHAPE)
            for m3 in ({"tokens": 1}, {"tokens": 144}, {"auto_scale": True})]  # 24 requests, mixed budgets

    def one(job):
        scene, q, m3 = job
        reply = _served(client, scene, q, m3=m3)
        return {k: reply.m3[k] for k in SAME}

    sequential = [one(job) for job in jobs]
    batches = live.state.worker.batches
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(one, jobs))
    assert concurrent == sequential
    assert live.state.worker.batches - batches < len(jobs)  # requests did share model batches


def _post(url, body=None, *, key=KEY, content=None, headers=None, method="POST", path="/v1/chat/completions"):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    hdrs.update(headers or {})
    return httpx.request(method, url + path, json=body, content=content, headers=hdrs, timeout=30)


def _good(url=None):
    return {"model": "m3-shapes", "messages": messages(COLOUR, url or data_url(EXAMPLES / "scene-0.png")),
            "max_tokens": 2}


def _hostile(live):
    good = _good()
    url = data_url(EXAMPLES / "scene-0.png")
    msg = good["messages"]
    big = "data:image/png;base64," + "A" * (2 << 20)
    return {
        "bad json": dict(content=b'{"model": "m3-shapes", "messages": [', headers={"Content-Type": "application/json"}),
        "json array": dict(content=b"[]"),
        "empty body": dict(content=b""),
        "not utf-8": dict(content=b'{"model": "\xff\xfe"}'),
        "NaN": dict(content=b'{"model": "m3-shapes", "temperature": NaN}'),
        "deeply nested": dict(content=b"[" * 100_000 + b"]" * 100_000),
        "missing messages": dict(body={"model": "m3-shapes"}),
        "messages wrong type": dict(body={**good, "messages": {"role": "user"}}),
        "max_tokens string": dict(body={**good, "max_tokens": "two"}),
        "max_tokens negative": dict(body={**good, "max_tokens": -1}),
        "unknown field": dict(body={**good, "best_of": 3}),
        "missing image": dict(body={**good, "messages": [{"role": "user", "content": COLOUR}]}),
        "two images": dict(body={**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}]}]}),
        "bad base64": dict(body={**good, "messages": messages(COLOUR, "data:image/png;base64,!!!!")}),
        "not an image": dict(body={**good, "messages": messages(COLOUR, "data:image/png;base64,aGVsbG8gd29ybGQ=")}),
        "etc passwd": dict(body={**good, "messages": messages(COLOUR, "file:///etc/passwd")}),
        "plain path": dict(body={**good, "messages": messages(COLOUR, str(EXAMPLES / "scene-0.png"))}),
        "remote url": dict(body={**good, "messages": messages(COLOUR, "http://127.0.0.1:1/x.png")}),
        "cloud metadata": dict(body={**good, "messages": messages(COLOUR, "http://169.254.169.254/latest")}),
        "bad budget": dict(body={**good, "m3": {"tokens": -9}}),
        "budget wrong type": dict(body={**good, "m3": {"tokens": "nine"}}),
        "ladder not nested": dict(body={**good, "m3": {"auto_scale": True, "ladder": [2, 3]}}),
        "threshold alone": dict(body={**good, "m3": {"threshold": 0.4}}),
        "max_visual_tokens zero": dict(body={**good, "m3": {"max_visual_tokens": 0}}),
        "bad detail": dict(body={**good, "messages": messages(COLOUR, url, "medium")}),
        "temperature": dict(body={**good, "temperature": 1.0}),
        "n=3": dict(body={**good, "n": 3}),
        "tools": dict(body={**good, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        "system prompt": dict(body={**good, "messages": [{"role": "system", "content": "be terse"}, *msg]}),
        "placeholder in question": dict(body={**good, "messages": messages("what is <image> here?", url)}),
        "question too long": dict(body={**good, "messages": messages("why " * 600, url)}),
        "unknown model": dict(body={**good, "model": "gpt-4o"}),
        "no key": dict(body=good, key=None),
        "wrong key": dict(body=good, key="nope"),
        "huge body": dict(body={**good, "messages": messages(COLOUR, big)}),
        "huge chunked body": dict(content=iter([b"x" * (1 << 19)] * 4)),
        "stream_options alone": dict(body={**good, "stream_options": {"include_usage": True}}),
        "five stops": dict(body={**good, "stop": ["a", "b", "c", "d", "e"]}),
        "GET on chat": dict(method="GET"),
        "unknown path": dict(path="/v1/completions", body=good),
        "unknown model card": dict(method="GET", path="/v1/models/gpt-4o"),
    }


def test_hostile_requests_are_4xx_json_and_the_server_keeps_serving(live):
    cases = _hostile(live)
    assert len(cases) >= 30
    statuses = {}
    for name, kw in cases.items():
        try:
            response = _post(live.url, **kw)
        except httpx.HTTPError as exc:  # the server may close a connection whose body it refused mid-stream
            assert name.startswith("huge"), (name, exc)
            continue
        statuses[name] = response.status_code
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        ErrorResponse.model_validate(response.json())
        assert response.json()["error"]["message"], name
        assert _post(live.url, body=_good()).status_code == 200, f"the server stopped answering after {name}"
    assert statuses["wrong key"] == statuses["no key"] == 401
    assert statuses["unknown model"] == statuses["unknown path"] == statuses["unknown model card"] == 404
    assert statuses["huge body"] == 413 and statuses["GET on chat"] == 405
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_openai_client_errors_are_typed(live):
    with pytest.raises(openai.AuthenticationError):
        _served(live.client(key="wrong"), 0, COLOUR)
    with pytest.raises(openai.NotFoundError):
        live.client().chat.completions.create(model="gpt-4o", messages=messages(COLOUR, data_url(
            EXAMPLES / "scene-0.png")))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _served(live.client(), 0, COLOUR, temperature=0.8)
    models = live.client().models.list().data
    assert [m.id for m in models] == ["m3-shapes"] and models[0].m3["grid_side"] == 24


def test_full_queue_is_429_with_retry_after(shipped):
    with live_server(Wrapped(shipped, delay=0.4), max_queue=1, max_batch=1) as server:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: _post(server.url, body=_good(), key=None), range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes, codes
        busy = next(r for r in replies if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error"]["code"] == "queue_full"
        assert _post(server.url, body=_good(), key=None).status_code == 200


def test_a_model_failure_is_500_for_that_request_alone(shipped):
    with live_server(Wrapped(shipped, fail_on="boom"), max_batch=8) as server:
        bad = {**_good(), "messages": messages("boom?", data_url(EXAMPLES / "scene-1.png"))}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda body: _post(server.url, body=body, key=None), [bad, _good(), _good(), bad]))
        assert [r.status_code for r in replies] == [500, 200, 200, 500]
        assert "simulated failure" in replies[0].json()["error"]["message"]
        assert replies[1].json()["choices"][0]["message"]["content"] == "brown"


def test_disconnect_and_timeout_drop_the_work(shipped):
    with live_server(Wrapped(shipped, delay=0.5), max_batch=1, request_timeout_s=5) as server:
        worker = server.state.worker
        first = threading.Thread(target=_post, args=(server.url,), kwargs={"body": _good(), "key": None})
        first.start()
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits in the queue
            httpx.post(server.url + "/v1/chat/completions", json=_good(), timeout=0.2)
        first.join()
        time.sleep(0.8)
        assert worker.answered == 1 and worker.in_flight == 0  # the dropped request never reached the model
    with live_server(Wrapped(shipped, delay=0.6), max_batch=1, request_timeout_s=0.2) as server:
        reply = _post(server.url, body=_good(), key=None)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"


def test_ask_server_prints_what_local_ask_prints(live, monkeypatch):
    monkeypatch.setenv("M3_API_KEY", KEY)
    image = str(EXAMPLES / "scene-0.png")
    for flags, code in ((["--tokens", "100"], 0), (["--auto-scale", "--threshold", "0.5"], 0), ([], 0),
                        (["--auto-scale", "--measure", "mean", "--on-miss", "best"], 0),
                        (["--tokens", "9", "--max-new-tokens", "4090"], 1)):  # refused: an error row, exit 1
        args = ["ask", image, SHAPE, *flags, "--json"]
        local = CliRunner().invoke(cli, args)
        served = CliRunner().invoke(cli, [*args, "--server", live.url])
        assert local.exit_code == served.exit_code == code, served.output
        a, b = json.loads(local.stdout), json.loads(served.stdout)
        assert list(a) == list(b)  # one row schema: the server's m3 object is the row local m3 ask prints
        assert {k: v for k, v in a.items() if k != "timings"} == {k: v for k, v in b.items() if k != "timings"}
        assert local.stderr == served.stderr  # e.g. the rounded budget's note
    assert a["error"] and a["run"]["max_new_tokens"] == 4090
    bare = json.loads(CliRunner().invoke(cli, ["ask", image, SHAPE, "--json", "--server", live.url]).stdout)
    assert bare["run"]["auto_scale"] and bare["threshold_met"] is not None  # the model's tuned policy
    knob = CliRunner().invoke(cli, ["ask", image, SHAPE, "--threshold", "0.5", "--server", live.url])
    assert knob.exit_code == 2 and "need --auto-scale" in knob.stderr
    text = CliRunner().invoke(cli, ["ask", image, COLOUR, "--tokens", "1"], env={"M3_SERVER": live.url})
    assert text.exit_code == 0 and text.stdout == "brown\n"
    bad = CliRunner().invoke(cli, ["ask", str(EXAMPLES.parent / "registry.yaml"), "--server", live.url])
    assert bad.exit_code == 2 and "not a recognised image format" in bad.stderr
    long = CliRunner().invoke(cli, ["ask", image, "why " * 400, "--max-question-chars", "5000", "--server",
                                    live.url])
    assert long.exit_code == 1 and "question too long" in long.stderr
    monkeypatch.setenv("M3_API_KEY", "wrong")
    denied = CliRunner().invoke(cli, ["ask", image, "--server", live.url])
    assert denied.exit_code == 2 and "API key" in denied.stderr


def test_bench_load_generator_and_table(live):
    from m3cli.bench.report import format_serve
    from m3cli.bench.serve import M3, ServeReport, _bodies, load_series

    paths = [str(EXAMPLES / f"scene-{i}.png") for i in range(4)]
    runs = load_series(M3, live.url, _bodies(paths, "m3-shapes", {"tokens": 9}, 2), "9", [1, 4], 2, api_key=KEY)
    cells = [(r.concurrency, len(r.rates), len(r.latencies_ms), r.failures) for r in runs]
    assert cells == [(1, 2, 8, 0), (4, 2, 8, 0)]
    assert runs[0].answers[0] == "brown" and runs[0].latency(0.5) <= runs[0].latency(0.99)
    table = format_serve(ServeReport(runs, "m3-shapes", "torch", 4, 2, 2, 8, None), "test machine")
    assert "| m3 serve | 9 | 4 |" in table and "p99 ms" in table


def test_ask_server_imports_no_model_or_server_library(live):
    """``m3 ask --server`` stays a light process: no torch, transformers, FastAPI, uvicorn, pydantic or httpx (it
    checks the file as a local ``m3 ask`` does, through ``m3cli.media``, which brings Pillow and NumPy)."""
    import os
    import subprocess
    import sys

    heavy = ("torch", "transformers", "fastapi", "uvicorn", "pydantic", "httpx", "starlette", "llama_cpp")
    code = "\n".join([
        "import sys",
        "from m3cli.cli import main",
        "sys.argv = ['m3', 'ask', sys.argv[1], 'what colour is the background?', '--tokens', '1', '--server', "
        "sys.argv[2]]",
        "try:",
        "    main()",
        "except SystemExit:",
        "    pass",
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))",
    ])
    out = subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "scene-0.png"), live.url], capture_output=True,
                         text=True, env={**os.environ, "M3_API_KEY": KEY}, timeout=120)
    assert out.stdout.splitlines() == ["brown", "[]"], out.stderr
