"""The one request parser: an OpenAI chat-completions body -> what the answering core needs (:class:`ChatAsk`).

Used by ``m3 serve`` for every HTTP request and by ``m3 batch --input-format openai`` for every line of an
OpenAI Batch file, so both accept and refuse exactly the same requests. Nothing here knows HTTP: a request
m3 cannot answer raises :class:`RequestError`, which carries the status code and the OpenAI error fields
(``message``, ``type``, ``param``, ``code``) a server returns and a Batch output line records.

The image is decoded here (:mod:`m3cli.answering.chat_media`), through the same :func:`m3cli.media.load_image`
as ``m3 batch`` (formats, EXIF, decompression-bomb limit, one-line errors). Where it may come from is the
caller's :class:`MediaAccess`: ``data:`` URLs always; local paths (``file://`` or plain) only under allowed
folders; ``http(s)://`` only through a fetcher the caller supplies (``m3 serve --allow-remote-media``).

The budget comes from the ``m3`` extension object (``{"tokens": 9}``, ``{"auto_scale": true, "threshold":
0.5}``, ``{"max_visual_tokens": 200}``: ``m3 ask``'s flags), else from the image part's ``detail`` (``low``:
:data:`LOW_DETAIL_TOKENS` per crop, ``high``: the full grid), else (``auto`` or nothing) the caller's default
policy (:class:`ChatDefaults`: ``m3 serve``'s or ``m3 batch``'s flags over the model's tuned policy). What a
budget leaves unstated (the threshold of ``{"auto_scale": true}``, the measure of a fixed scale) comes from that
default policy, through the same :meth:`~m3cli.matryoshka.policy.PolicySpec.over` as ``m3 ask``'s flags.

Decoding is greedy: ``temperature`` 0 (or absent) only, since m3's answers, confidences and escalation are
deterministic; any other value is refused (400) rather than silently ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from m3cli.answering.chat_media import MediaAccess, load_picture
from m3cli.answering.core import make_policy
from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.errors import M3Error, one_line
from m3cli.matryoshka.confidence import MEASURES
from m3cli.matryoshka.policy import ON_MISS, Policy, PolicySpec
from m3cli.media.image import ImageOptions

LOW_DETAIL_TOKENS = 9          # detail "low": visual tokens per crop
MAX_NEW_TOKENS_LIMIT = 4096    # as m3 ask --max-new-tokens
MAX_STOP_SEQUENCES = 4         # as the OpenAI API
# The largest request: m3 serve's default body limit (--max-body-mb) and the longest line of an OpenAI Batch file
# (images travel inside as data: URLs, so a line may rightly hold megabytes).
MAX_REQUEST_BYTES = 32 << 20

# Fields the API defines that m3 cannot honour, each with the values that change nothing (accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}

__all__ = ["ChatAsk", "ChatDefaults", "MediaAccess", "RequestError", "load_picture", "model_names",
           "parse_chat_request"]

_PIXEL_OPTIONS = {"upright", "alpha_background", "fast_decode"}  # the m3 object's image options, not budget
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list"})
_PART_TAGS = frozenset({"text", "image_url"})


class RequestError(M3Error):
    """A request m3 does not answer: an HTTP status and the OpenAI error fields (the message is one line)."""

    exit_code = 1

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, row: dict[str, Any] | None = None) -> None:  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.row = row  # a request answered with an error: its row (the body carries it as m3)

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, and ``"m3"``: the row of a request that was
        answered with an error."""
        body: dict[str, Any] = {"error": {"message": str(self), "type": self.type, "param": self.param,
                                          "code": self.code}}
        if self.row is not None:
            body["m3"] = self.row
        return body


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


@dataclass(frozen=True)
class ChatDefaults:
    """What a request gets for what it leaves unstated: the caller's policy flags (``m3 serve``'s, ``m3
    batch``'s; None: unstated) over ``model_policy`` (the model's tuned policy,
    :func:`m3cli.answering.defaults.model_policy`), the cap and length of a request that sets none, the image
    options."""

    tokens: int | None = None
    auto_scale: bool = False
    threshold: float | None = None
    ladder: Sequence[int] | None = None
    measure: str | None = None
    on_miss: str | None = None
    model_policy: PolicySpec | None = None
    max_visual_tokens: int | None = None
    max_new_tokens: int = 16
    image: ImageOptions = ImageOptions()  # --upright / --alpha-background / --fast-decode (default: the recipe)

    @property
    def policy(self) -> PolicySpec:
        """The default policy in full: the flags, then the model's policy, then the fallback."""
        flags = PolicySpec(self.tokens, self.auto_scale, self.threshold, self.measure,
                           tuple(self.ladder) if self.ladder else None, self.on_miss)
        return flags.over(self.model_policy)


@dataclass
class ChatAsk:
    """One parsed request: the decoded picture, the question, the policy, the decoding limits, the stream flags."""

    image: Any
    source: str                 # where the image came from, for the answer's row
    question: str
    policy: Policy
    requested_tokens: int | None
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    budget: dict[str, Any] = field(default_factory=dict)  # what the request asked for (its m3 object, or detail)
    pixels: dict[str, Any] = field(default_factory=dict)  # what was done to the image's pixels (the row's fields)
    spec: PolicySpec = PolicySpec()  # the policy in full (the budget over the default policy)
    max_visual_tokens: int | None = None  # the cap on the image's total that applies
    image_options: ImageOptions = ImageOptions()

    def run_record(self, model: str) -> dict[str, Any]:
        """What the answer's row was made with, as ``m3 batch`` records a run (the row's ``run``): the model,
        the question, the policy in full, the answer length, the cap and the image options given."""
        if os.path.exists(model):  # as m3 batch records it: a local model's real path
            model = os.path.realpath(model)
        record: dict[str, Any] = {"model": model, "question": self.question, **self.spec.record(),
                                  "max_new_tokens": self.max_new_tokens}
        if self.max_visual_tokens is not None:
            record["max_visual_tokens"] = self.max_visual_tokens
        record.update(self.image_options.record())
        return record


def model_names(model_id: str, chosen: str | None = None) -> tuple[str, frozenset[str]]:
    """The model name responses carry and every name a request may use for it: ``chosen`` (``m3 serve
    --served-model-name``; then only it), else the model as given, its folder or file name, and its real path."""
    if chosen:
        return chosen, frozenset({chosen})
    base = os.path.basename(os.path.normpath(model_id)) or model_id
    names = {model_id, base, os.path.normpath(model_id)}
    if os.path.exists(model_id):
        names.add(os.path.realpath(model_id))
    return base, frozenset(names)


def parse_chat_request(
    body: bytes | str | dict,
    grid_side: int,
    defaults: ChatDefaults | None = None,
    access: MediaAccess | None = None,
    models: Collection[str] | None = None,
    streaming: bool = True,
) -> ChatAsk:
    """Validate ``body`` (raw JSON or already parsed) and turn it into a :class:`ChatAsk`, image decoded.

    ``models``: the names the request's ``model`` may take (None: any; another name is a 404). ``streaming``
    False refuses ``stream: true`` (an OpenAI Batch line). Raises :class:`RequestError` for anything else.
    """
    defaults = defaults or ChatDefaults()
    access = access or MediaAccess()
    request = _validated(_json_object(body))
    if models is not None and request.model not in models:
        names = ", ".join(sorted(models))
        raise RequestError(f"the model {request.model!r} does not exist here (this server answers with {names})",
                           404, "model", "model_not_found")
    _refuse_unsupported(request)
    stream = bool(request.stream)
    if stream and not streaming:
        raise RequestError("stream is not supported here (an OpenAI Batch request)", param="stream",
                           code="unsupported_parameter")
    if request.stream_options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    question, part, where = _user_turn(request.messages)
    policy, requested, budget, spec, cap = _budget(request, part.image_url.detail, defaults, grid_side)
    options = _image_options(request, defaults)
    picture, source = load_picture(part.image_url.url, access, f"{where}.image_url.url", options)
    return ChatAsk(
        image=picture.image, source=source, question=question, policy=policy, requested_tokens=requested,
        max_new_tokens=_max_new_tokens(request, defaults), stop=_stops(request.stop), stream=stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        model=request.model, budget=budget, pixels=picture.fields(), spec=spec, max_visual_tokens=cap,
        image_options=options,
    )


def _json_object(body: bytes | str | dict) -> dict:
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the body is not valid UTF-8", code="invalid_json") from None
    if not body.strip():
        raise RequestError("the body is empty: send a JSON chat-completions request", code="invalid_json")
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the body is not valid JSON ({one_line(exc)})", code="invalid_json") from None
    if not isinstance(value, dict):
        raise RequestError("the body must be a JSON object", code="invalid_json")
    return value


def _no_constant(name: str):
    raise RequestError(f"the body holds {name}, which is not JSON", code="invalid_json")


def _validated(value: dict):
    from pydantic import ValidationError

    from m3cli.answering.chat_shapes import ChatCompletionRequest

    try:
        return ChatCompletionRequest.model_validate(value)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc) -> RequestError:
    """The most specific of pydantic's errors, as one line naming its place (``messages[0].content``)."""
    errors = exc.errors(include_url=False)

    def path(loc) -> list:
        # union branches add type labels ("str", "list[...]") and a content part its tag ("image_url") between
        # the field names: not the user's words
        out: list = []
        for p in loc:
            if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_LABELS):
                if not (out and isinstance(out[-1], int) and p in _PART_TAGS and out[-2:-1] != ["messages"]):
                    out.append(p)
        return out

    best = max(errors, key=lambda e: (e["type"] != "missing" or len(errors) == 1, len(path(e["loc"]))))
    where = path(best["loc"])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".") or None
    kind = best["type"]
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}" if param else "unknown field"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"{param}: {best['msg']}" if param else best["msg"]
    if kind == "union_tag_invalid":
        message = f"{param}: unsupported content part type (use 'text' and 'image_url')"
    return RequestError(message, param=param, code="invalid_value" if kind != "extra_forbidden" else
                        "unknown_parameter")


def _refuse_unsupported(request) -> None:
    for name, neutral in UNSUPPORTED.items():
        if getattr(request, name) not in neutral:
            raise RequestError(f"{name} is not supported by m3", param=name, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise RequestError("n must be 1: m3 decodes greedily, so every choice would be the same", param="n",
                           code="unsupported_parameter")
    if request.temperature not in (None, 0, 0.0):
        raise RequestError("temperature must be 0 (or left out): m3 decodes greedily, so answers, their confidence "
                           "and --auto-scale's escalation are deterministic", param="temperature",
                           code="unsupported_parameter")
    if request.top_p not in (None, 1, 1.0):
        raise RequestError("top_p must be 1 (or left out): m3 decodes greedily", param="top_p",
                           code="unsupported_parameter")


def _user_turn(messages) -> tuple[str, Any, str]:
    """The question (text parts joined by newlines; none: the default question), the one image part, and where
    that part is (``messages[0].content[1]``)."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    for i, m in enumerate(messages):
        if m.role in ("system", "developer") and _has_text(m.content):
            raise RequestError(f"{m.role} messages are not supported: the model answers with its own prompt "
                               "recipe (leave them out)", param=f"messages[{i}]", code="unsupported_message")
        if m.role in ("assistant", "tool"):
            raise RequestError("one user message per request: m3 answers one question about one image, not a "
                               "conversation", param=f"messages[{i}]", code="unsupported_message")
    if len(users) != 1:
        raise RequestError(f"{'no' if not users else len(users)} user messages: send exactly one, holding the "
                           "image and the question", param="messages", code="invalid_messages")
    index = users[0]
    content = messages[index].content
    parts = [] if content is None else content if isinstance(content, list) else None
    if parts is None:  # a plain string: text without an image
        parts = []
        texts = [content]
    else:
        texts = [p.text for p in parts if p.type == "text"]
    images = [p for p in parts if p.type == "image_url"]
    if not images:
        raise RequestError("no image: put one image_url part in the user message", param=f"messages[{index}].content",
                           code="missing_image")
    if len(images) > 1:
        raise RequestError(f"{len(images)} images in one request: m3 answers about one image per request",
                           param=f"messages[{index}].content", code="too_many_images")
    if texts and not "".join(texts).strip():
        raise RequestError("the question is empty (leave the text part out to ask the default question)",
                           param=f"messages[{index}].content", code="empty_question")
    question = "\n".join(t.strip() for t in texts if t.strip()) if texts else DEFAULT_QUESTION
    return question, images[0], f"messages[{index}].content[{parts.index(images[0])}]"


def _has_text(content) -> bool:
    if content is None:
        return False
    if isinstance(content, str):
        return bool(content.strip())
    return any(getattr(p, "type", None) != "text" or p.text.strip() for p in content)


def _budget(request, detail: str | None, defaults: ChatDefaults, grid: int
            ) -> tuple[Policy, int | None, dict, PolicySpec, int | None]:
    """The request's scale policy, the budget it asked for in tokens (None: the full grid), a record of what it
    asked for, the policy in full and the cap on the image's total visual tokens.

    The ``m3`` object reads as ``m3 ask``'s flags and ``detail`` as a fixed budget, over the caller's default
    policy (:attr:`ChatDefaults.policy`); ``"auto_scale": false`` states a fixed scale, the full grid unless
    ``tokens`` says otherwise. A request that sets no budget gets the default policy and the default cap.
    """
    m3 = request.m3
    asked = m3.model_dump(exclude_none=True, exclude=_PIXEL_OPTIONS) if m3 is not None else {}
    if asked:
        auto = bool(m3.auto_scale)
        knobs = {"threshold": m3.threshold, "ladder": m3.ladder, "measure": m3.measure, "on_miss": m3.on_miss}
        if not auto and any(v is not None for v in knobs.values()):
            raise RequestError("m3.threshold, m3.ladder, m3.measure and m3.on_miss need m3.auto_scale: true",
                               param="m3", code="invalid_budget")
        if m3.measure is not None and m3.measure not in MEASURES:
            raise RequestError(f"m3.measure must be one of {', '.join(MEASURES)}, got {m3.measure!r}",
                               param="m3.measure", code="invalid_budget")
        if m3.on_miss is not None and m3.on_miss not in ON_MISS:
            raise RequestError(f"m3.on_miss must be one of {', '.join(ON_MISS)}, got {m3.on_miss!r}",
                               param="m3.on_miss", code="invalid_budget")
        tokens = m3.tokens
        stated = grid * grid if tokens is None and m3.auto_scale is False else tokens
        spec = PolicySpec(stated, auto, m3.threshold, m3.measure, tuple(m3.ladder) if m3.ladder else None,
                          m3.on_miss)
        cap = m3.max_visual_tokens
        record = {"m3": asked}
    elif detail in ("low", "high"):
        tokens = LOW_DETAIL_TOKENS if detail == "low" else None
        spec, cap = PolicySpec(tokens if tokens is not None else grid * grid), None
        record = {"detail": detail}
    else:
        tokens, spec, cap = defaults.tokens, PolicySpec(), defaults.max_visual_tokens
        record = {}
    try:
        full = spec.over(defaults.policy)
        policy = make_policy(grid, full.tokens, full.auto_scale, full.threshold, full.ladder, cap,
                             measure=full.measure, on_miss=full.on_miss)
    except (M3Error, ValueError) as exc:
        raise RequestError(f"m3: {one_line(exc)}", param="m3", code="invalid_budget") from None
    if not asked and detail not in ("low", "high"):
        tokens = full.tokens
    return policy, tokens, record, full, cap


def _image_options(request, defaults: ChatDefaults) -> ImageOptions:
    """The server's image options, with what the request's ``m3`` object sets instead."""
    m3, base = request.m3, defaults.image
    if m3 is None or (m3.upright is None and m3.alpha_background is None and m3.fast_decode is None):
        return base
    try:
        return ImageOptions(
            upright=base.upright if m3.upright is None else m3.upright,
            alpha_background=base.alpha_background if m3.alpha_background is None else m3.alpha_background,
            fast_decode=base.fast_decode if m3.fast_decode is None else m3.fast_decode)
    except ValueError as exc:
        raise RequestError(f"m3.alpha_background: {one_line(exc)}", param="m3.alpha_background",
                           code="invalid_value") from None


def _max_new_tokens(request, defaults: ChatDefaults) -> int:
    a, b = request.max_tokens, request.max_completion_tokens
    if a is not None and b is not None and a != b:
        raise RequestError("max_tokens and max_completion_tokens differ: give one", param="max_completion_tokens",
                           code="invalid_value")
    n = b if b is not None else a if a is not None else defaults.max_new_tokens
    if n > MAX_NEW_TOKENS_LIMIT:
        raise RequestError(f"max_completion_tokens is {n}, more than {MAX_NEW_TOKENS_LIMIT}",
                           param="max_completion_tokens", code="invalid_value")
    return n


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"{len(stops)} stop sequences: at most {MAX_STOP_SEQUENCES}", param="stop",
                           code="invalid_value")
    if any(not s for s in stops):
        raise RequestError("an empty stop sequence", param="stop", code="invalid_value")
    return tuple(stops)
