"""The OpenAI chat-completions shapes m3 speaks, as pydantic models: request, response, stream chunk, error.

One definition for ``m3 serve`` (HTTP) and ``m3 batch --input-format/--format openai`` (OpenAI Batch files).
Requests are validated strictly: a wrong type is refused rather than coerced (``"max_tokens": "5"`` is an
error, as is ``true`` for a number), and a field the API does not define is refused by name. Fields the API
defines but m3 cannot honour are declared loosely here and refused with their own message by
:mod:`m3cli.answering.chat_request` unless they hold their neutral value.

Responses carry one extension, ``m3``: the answer's row (:func:`m3cli.output.make_row`), the same fields an
``m3 batch`` row has. Clients ignore keys they do not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Request):
    url: str
    # low: 9 visual tokens per crop; high: the full grid (576); auto: the server's default policy
    detail: Literal["low", "high", "auto"] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # sent by some clients; there is nothing to obfuscate here


class M3Options(_Request):
    """The per-request budget (``extra_body={"m3": {...}}`` in the official client), as ``m3 ask``'s flags: what
    it leaves unstated comes from the server's default policy."""

    tokens: int | None = Field(None, ge=1)                  # --tokens: per crop, rounded down to a nested scale
    auto_scale: bool | None = None                          # --auto-scale
    threshold: float | None = Field(None, ge=0.0, le=1.0)   # --threshold (with auto_scale)
    ladder: list[int] | None = Field(None, min_length=1)    # --ladder (with auto_scale)
    measure: str | None = None                              # --measure (with auto_scale): sequence, min, ...
    on_miss: str | None = None                              # --on-miss (with auto_scale): last or best
    max_visual_tokens: int | None = Field(None, ge=1)       # --max-visual-tokens: a cap on the image's total
    # how the image becomes pixels (m3 ask's --upright, --alpha-background, --fast-decode); unset: the server's
    upright: bool | None = None
    alpha_background: str | None = None                     # a colour name or #rrggbb
    fast_decode: bool | None = None


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: what m3 accepts (see docs/serve.md for what each field does)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    m3: M3Options | None = None
    # accepted, and change nothing in the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # defined by the API; refused unless neutral (chat_request.UNSUPPORTED)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class Choice(_Response):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    m3: dict[str, Any]


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    m3: dict[str, Any] | None = None  # on the final chunk: the answer's row


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail
    m3: dict[str, Any] | None = None  # a request that was answered with an error: its row


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "m3cli"
    m3: dict[str, Any] | None = None  # backend, grid side, scales, the server's default budget


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
