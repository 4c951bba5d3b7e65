"""The one OpenAI request parser (no model, no HTTP): budgets, limits, media access, refusals, response shapes."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from m3cli.answering.chat_request import (
    LOW_DETAIL_TOKENS,
    ChatDefaults,
    MediaAccess,
    RequestError,
    model_names,
    parse_chat_request,
)
from m3cli.answering.chat_response import (
    answer_chunks,
    batch_line,
    completion_body,
    role_chunk,
    row_of_batch_line,
)
from m3cli.answering.chat_shapes import ChatCompletion, ChatCompletionChunk, ErrorResponse
from m3cli.answering.core import Result
from m3cli.backends.base import finish, stop_index
from m3cli.matryoshka.policy import DEFAULT_THRESHOLD, Escalate, Fixed, PolicySpec, Rung
from m3cli.output import ROW_KEYS, make_row


def _png(size=(32, 24), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


DATA_URL = "data:image/png;base64," + base64.b64encode(_png()).decode()


def _body(url=DATA_URL, text="what colour?", detail=None, **extra) -> dict:
    image = {"url": url} if detail is None else {"url": url, "detail": detail}
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": image}]}]}
    body.update(extra)
    return body


def _refused(body, status=400, access=None, **kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body, 24, access=access, **kw)
    err = info.value
    assert err.status == status, str(err)
    ErrorResponse.model_validate(err.body())  # always the OpenAI error shape
    assert "\n" not in str(err)
    return err


@pytest.mark.parametrize(("extra", "detail", "policy", "requested"), [
    ({}, None, Fixed(576), None),                                           # no budget: the default (full grid)
    ({}, "auto", Fixed(576), None),
    ({}, "low", Fixed(LOW_DETAIL_TOKENS), LOW_DETAIL_TOKENS),
    ({}, "high", Fixed(576), None),
    ({"m3": {"tokens": 100}}, "low", Fixed(36), 100),                       # m3 wins over detail; rounded down
    ({"m3": {"tokens": 1}}, None, Fixed(1), 1),
    ({"m3": {"auto_scale": True}}, None, Escalate((1, 9, 36, 144, 576), DEFAULT_THRESHOLD), None),
    ({"m3": {"auto_scale": True, "threshold": 0.9, "ladder": [9, 576], "tokens": 144}}, None,
     Escalate((9,), 0.9), 144),
    ({"m3": {"auto_scale": False}}, None, Fixed(576), None),
])
def test_budget_from_m3_object_and_detail(extra, detail, policy, requested):
    ask = parse_chat_request(_body(detail=detail, **extra), 24)
    assert ask.policy == policy and ask.requested_tokens == requested
    assert ask.image.size == (32, 24) and ask.question == "what colour?"


def test_defaults_apply_without_a_budget_and_max_visual_tokens_caps():
    defaults = ChatDefaults(tokens=9, max_new_tokens=5)
    ask = parse_chat_request(_body(), 24, defaults)
    assert ask.policy == Fixed(9) and ask.max_new_tokens == 5
    # a cap alone chooses no scale: the default policy, capped (as m3 ask --max-visual-tokens alone)
    capped = parse_chat_request(_body(m3={"max_visual_tokens": 200}), 24, defaults)
    assert capped.policy.max_visual_tokens == 200 and capped.policy.inner == Fixed(9)


TUNED = PolicySpec(144, True, 0.7, "min")  # a model's tuned policy, as its registry entry states it


@pytest.mark.parametrize(("extra", "detail", "policy"), [
    ({}, None, Escalate((1, 9, 36, 144), 0.7, "min")),                     # no budget: the model's policy
    ({}, "auto", Escalate((1, 9, 36, 144), 0.7, "min")),
    ({}, "low", Fixed(9, "min")),                                         # detail: a fixed budget, the tuned measure
    ({}, "high", Fixed(576, "min")),
    ({"m3": {"tokens": 36}}, None, Fixed(36, "min")),                     # --tokens 36: fixed, whatever the model does
    ({"m3": {"auto_scale": True}}, None, Escalate((1, 9, 36, 144, 576), 0.7, "min")),  # the tuned threshold
    ({"m3": {"auto_scale": True, "threshold": 0.2, "measure": "mean", "on_miss": "best"}}, None,
     Escalate((1, 9, 36, 144, 576), 0.2, "mean", "best")),
    ({"m3": {"auto_scale": False}}, None, Fixed(576, "min")),             # auto_scale false: the full grid
])
def test_the_models_policy_under_a_requests_budget(extra, detail, policy):
    ask = parse_chat_request(_body(detail=detail, **extra), 24, ChatDefaults(model_policy=TUNED))
    assert ask.policy == policy
    # the row's run records the policy in full, as m3 batch records a run's
    record = ask.run_record("m")
    assert record["tokens"] == ask.spec.tokens and record["max_new_tokens"] == 16
    assert record["question"] == "what colour?"
    assert record.get("auto_scale", False) == isinstance(policy, Escalate)


def test_launch_flags_over_the_models_policy():
    defaults = ChatDefaults(threshold=0.9, on_miss="best", model_policy=TUNED)
    assert defaults.policy == PolicySpec(144, True, 0.9, "min", None, "best")
    assert parse_chat_request(_body(), 24, defaults).policy == Escalate((1, 9, 36, 144), 0.9, "min", "best")
    fixed = ChatDefaults(tokens=9, model_policy=TUNED)  # --tokens 9 replaces the model's escalation whole
    assert parse_chat_request(_body(), 24, fixed).policy == Fixed(9, "min")
    assert parse_chat_request(_body(m3={"auto_scale": True}), 24, fixed).policy == \
        Escalate((1, 9, 36, 144, 576), 0.7, "min")


def test_lengths_stops_stream_flags_and_default_question():
    ask = parse_chat_request(_body(text="  ", max_tokens=7, stop="\n", stream=True,
                                   stream_options={"include_usage": True}) | {"messages": [{"role": "user", "content": [
                                       {"type": "image_url", "image_url": {"url": DATA_URL}}]}]}, 24)
    assert ask.question == "What is this?" and ask.max_new_tokens == 7 and ask.stop == ("\n",)
    assert ask.stream and ask.include_usage
    same = parse_chat_request(_body(max_tokens=3, max_completion_tokens=3, temperature=0, top_p=1, seed=4, n=1,
                                    user="u", metadata={"a": "b"}, store=False, logprobs=False,
                                    response_format={"type": "text"}), 24)
    assert same.max_new_tokens == 3


BAD_BODIES = {
    "not an object": b"[1, 2]",
    "bad json": b'{"model": ',
    "empty body": b"",
    "NaN": b'{"model": "m", "temperature": NaN}',
    "not utf-8": b'{"model": "\xff"}',
    "missing model": {"messages": _body()["messages"]},
    "model not a string": _body(model=3),
    "missing messages": {"model": "m"},
    "empty messages": _body(messages=[]),
    "messages not a list": _body(messages="hi"),
    "unknown field": _body(frobnicate=1),
    "max_tokens string": _body(max_tokens="5"),
    "max_tokens bool": _body(max_tokens=True),
    "max_tokens zero": _body(max_tokens=0),
    "max_tokens huge": _body(max_tokens=10 ** 6),
    "max_tokens disagree": _body(max_tokens=3, max_completion_tokens=4),
    "temperature": _body(temperature=0.7),
    "temperature negative": _body(temperature=-1),
    "top_p": _body(top_p=0.5),
    "n": _body(n=2),
    "tools": _body(tools=[{"type": "function", "function": {"name": "f"}}]),
    "logprobs": _body(logprobs=True),
    "json mode": _body(response_format={"type": "json_object"}),
    "presence penalty": _body(presence_penalty=1.0),
    "stream_options without stream": _body(stream_options={"include_usage": True}),
    "too many stops": _body(stop=["a", "b", "c", "d", "e"]),
    "empty stop": _body(stop=[""]),
    "text only": {"model": "m", "messages": [{"role": "user", "content": "what is this?"}]},
    "two images": {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": DATA_URL}},
        {"type": "image_url", "image_url": {"url": DATA_URL}}]}]},
    "audio part": {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]},
    "bad role": {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
    "system prompt": {"model": "m", "messages": [{"role": "system", "content": "be brief"}] + _body()["messages"]},
    "conversation": {"model": "m", "messages": _body()["messages"] + [{"role": "assistant", "content": "red"}]},
    "two users": {"model": "m", "messages": _body()["messages"] * 2},
    "bad detail": _body(detail="ultra"),
    "bad budget zero": _body(m3={"tokens": 0}),
    "bad budget type": _body(m3={"tokens": "9"}),
    "bad budget key": _body(m3={"scale": 9}),
    "threshold without auto_scale": _body(m3={"threshold": 0.5}),
    "measure without auto_scale": _body(m3={"tokens": 9, "measure": "min"}),
    "on_miss without auto_scale": _body(m3={"on_miss": "best"}),
    "unknown measure": _body(m3={"auto_scale": True, "measure": "vibes"}),
    "unknown on_miss": _body(m3={"auto_scale": True, "on_miss": "first"}),
    "measure not a string": _body(m3={"auto_scale": True, "measure": 1}),
    "threshold out of range": _body(m3={"auto_scale": True, "threshold": 2}),
    "ladder not nested": _body(m3={"auto_scale": True, "ladder": [10]}),
    "empty question": _body(text="   "),
    "bad base64": _body(url="data:image/png;base64,@@not base64@@"),
    "not base64 data url": _body(url="data:image/png,rawbytes"),
    "data url not an image type": _body(url="data:text/plain;base64," + base64.b64encode(b"hello").decode()),
    "data url not an image": _body(url="data:image/png;base64," + base64.b64encode(b"hello world").decode()),
    "truncated png": _body(url="data:image/png;base64," + base64.b64encode(_png()[:60]).decode()),
    "empty data url": _body(url="data:image/png;base64,"),
    "etc passwd": _body(url="file:///etc/passwd"),
    "plain path": _body(url="/etc/passwd"),
    "remote url": _body(url="http://169.254.169.254/latest/meta-data"),
    "other scheme": _body(url="ftp://example.com/a.png"),
    "file url with host": _body(url="file://evil.example/a.png"),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_every_bad_request_is_one_openai_error(name):
    err = _refused(BAD_BODIES[name], models={"m"})
    assert err.type == "invalid_request_error"


def test_unknown_model_is_404():
    assert _refused(_body(model="gpt-4o"), 404, models={"m"}).code == "model_not_found"
    assert model_names("/x/models/m3-shapes")[0] == "m3-shapes"
    assert model_names("/x/m.gguf", "mine") == ("mine", frozenset({"mine"}))


def test_local_paths_only_under_allowed_dirs(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    (allowed / "link.png").symlink_to(secret)
    access = MediaAccess(local_dirs=(str(allowed),))
    for url in (str(allowed / "a.png"), f"file://{allowed / 'a.png'}", "a.png"):
        assert parse_chat_request(_body(url=url), 24, access=access).image.size == (32, 24)
    for url in (str(secret), "../secret.png", "link.png", f"file://{secret}", "/etc/passwd"):
        err = _refused(_body(url=url), access=access)
        assert err.code == "media_path_not_allowed" and "secret" not in str(err)
    # a missing file inside the folder is a one-line image error
    assert _refused(_body(url="nope.png"), access=access).code == "invalid_image"
    # m3 batch: the user's own files, anywhere
    assert parse_chat_request(_body(url=str(secret)), 24, access=MediaAccess(local_dirs=None)).image


def test_remote_media_through_the_callers_fetcher():
    fetched = []

    def fetch(url):
        fetched.append(url)
        return _png((10, 10))

    ask = parse_chat_request(_body(url="https://example.com/a.png"), 24, access=MediaAccess(fetch=fetch))
    assert ask.image.size == (10, 10) and ask.source == "https://example.com/a.png"
    assert fetched == ["https://example.com/a.png"]


def test_decompression_bomb_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    err = _refused(_body(url="data:image/png;base64," + base64.b64encode(_png((40, 40))).decode()))
    assert "too large" in str(err)


def _row(answer="red circle", error=None, finish_reason="stop"):
    result = Result(answer, 0.83, 9, [Rung(1, "red", 0.2), Rung(9, answer, 0.83)], {"encode_ms": 1.0},
                    visual_tokens=9, crops=1, finish_reason=finish_reason, prompt_tokens=60, completion_tokens=5)
    if error:
        result = Result("", 0.0, None, [], {}, error=error)
    return make_row(id="chatcmpl-1", source="data:image/png;base64 (9 bytes)", question="q?", model="m",
                    backend="torch", **result.to_dict(), note=result.note)


def test_completion_and_chunks_follow_the_openai_shapes():
    row = _row()
    body = completion_body(row, "chatcmpl-1", 5, "m")
    ChatCompletion.model_validate(body)
    assert body["usage"] == {"prompt_tokens": 60, "completion_tokens": 5, "total_tokens": 65}
    assert body["choices"][0]["message"]["content"] == "red circle" and tuple(body["m3"]) == ROW_KEYS
    chunks = [role_chunk("chatcmpl-1", 5, "m", True), *answer_chunks(row, "chatcmpl-1", 5, "m", True)]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "red circle"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["m3"] == row
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 65


def test_batch_lines_carry_the_row_back_for_resume():
    row = _row()
    ok = batch_line(row, "req-1", "m", 200)
    assert ok["response"]["status_code"] == 200 and ok["error"] is None and ok["custom_id"] == "req-1"
    assert list(ok)[0] == "id" and row_of_batch_line(ok) == row
    bad = _row(error="question too long")
    refused = batch_line(bad, "req-2", "m", 400, RequestError("question too long", 400))
    assert refused["response"]["body"]["error"]["message"] == "question too long"
    assert row_of_batch_line(refused) == bad
    line = batch_line(bad, None, "m", None, RequestError("x.jsonl:3: not JSON"))
    assert line["response"] is None and line["error"]["message"] == "x.jsonl:3: not JSON"
    assert row_of_batch_line(line) == bad
    assert row_of_batch_line({"id": "a", "answer": "b"}) == {"id": "a", "answer": "b"}


@pytest.mark.parametrize(("text", "stops", "n", "ended", "want"), [
    ("red circle", (), 2, True, ("red circle", "stop")),
    ("red circle and", (), 3, False, ("red circle and", "length")),
    ("red. blue", (".",), 3, True, ("red", "stop")),
    ("red. blue", ("blue", "."), 3, False, ("red", "stop")),
    (" two ", ("x",), 3, False, ("two", "length")),
    (" two ", ("x",), 1, False, ("two", "stop")),
])
def test_finish_cuts_at_the_first_stop(text, stops, n, ended, want):
    assert finish(text, stops, n, 3 if not ended else 8, ended) == want
    assert stop_index("abc", ()) is None



def _rgba_url() -> str:
    buf = io.BytesIO()
    Image.new("RGBA", (16, 12), (10, 200, 30, 0)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_options_from_the_server_and_from_the_request():
    from m3cli.media import ImageOptions

    plain = parse_chat_request(_body(_rgba_url()), 24)
    assert plain.pixels["alpha"] == "dropped" and plain.image.getpixel((0, 0)) == (10, 200, 30)
    served = parse_chat_request(_body(_rgba_url()), 24, ChatDefaults(image=ImageOptions(alpha_background="white")))
    assert served.pixels["alpha"] == "#ffffff" and served.image.getpixel((0, 0)) == (255, 255, 255)
    asked = parse_chat_request(_body(_rgba_url(), m3={"alpha_background": "black"}), 24,
                               ChatDefaults(image=ImageOptions(alpha_background="white")))
    assert asked.pixels["alpha"] == "#000000" and asked.image.getpixel((0, 0)) == (0, 0, 0)
    assert asked.budget == {} and asked.policy == Fixed(576)  # image options are not a budget
    err = _refused(_body(_rgba_url(), m3={"alpha_background": "not-a-colour"}))
    assert err.param == "m3.alpha_background"
