"""The one small interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from m3cli.errors import ModelError


class ModelLoadError(ModelError):
    """The model could not be loaded; the message is one user-facing line."""


@dataclass
class Encoded:
    """One image's projected visual-token grid (G*G rows, LM width), backend-owned storage.

    LLaVA-NeXT: ``grid`` holds every crop's grid (the torch backend's ``CropGrids``), ``crops`` how many the tower
    encoded (tiles + base) and ``image_hw`` the original image's (height, width), on which the number of visual
    tokens at a scale depends. LLaVA-1.5: one crop, and ``image_hw`` is not needed.
    """

    grid: Any
    side: int
    encode_ms: float
    image_hw: tuple[int, int] | None = None
    crops: int = 1


@dataclass
class AnswerRequest:
    """Answer ``question`` about an encoded image using ``scale`` pooled visual tokens."""

    encoded: Encoded
    scale: int
    question: str
    max_new_tokens: int = 16
    # exact early exit: stop decoding once the running confidence (``stop_measure``, one that can only fall
    # as tokens are added) is below ``stop_below``; None decodes to EOS or max_new_tokens as always
    stop_below: float | None = None
    stop_measure: str = "sequence"
    # stop sequences (the OpenAI API's ``stop``): decoding ends once the text holds one, which is cut off
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """A greedy answer with the log-probability of each generated token (EOS excluded)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prefill_ms: float
    decode_ms: float
    stopped_early: bool = False  # the running confidence fell below the request's stop_below
    # the visual embeddings the language model received (LLaVA-NeXT: every crop's pooled tokens, the tile grid
    # unpadded, one newline per row); None: the request's scale (one crop, no newlines)
    visual_tokens: int | None = None
    # "stop" (end of sequence or a stop sequence) or "length" (max_new_tokens reached); None: not reported
    finish_reason: str | None = None
    prompt_tokens: int | None = None      # positions the LM prefilled for this answer (text + visual)
    completion_tokens: int | None = None  # tokens generated (None: len(token_ids))


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop sequence of ``stops`` begins in ``text``, or None when it holds none."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def finish(text: str, stops: Sequence[str], n_tokens: int, max_new_tokens: int, ended: bool) -> tuple[str, str]:
    """The answer text (cut before the first stop sequence, stripped) and its finish reason.

    ``ended``: the model produced its end-of-sequence token (or decoding stopped at a stop sequence); otherwise
    the answer is ``"length"`` when it used every one of ``max_new_tokens``.
    """
    cut = stop_index(text, stops) if stops else None
    if cut is not None:
        return text[:cut].strip(), "stop"
    reason = "length" if not ended and n_tokens >= max_new_tokens else "stop"
    return text.strip(), reason


def stops_early(request: AnswerRequest, logprobs: list[float]) -> bool:
    """Whether the answer so far already decides its rung: its running confidence is below ``stop_below``.

    Only for measures whose value can only fall as tokens are added (``confidence.MONOTONE_MEASURES``): the
    full answer's confidence is then lower still, so the rung escalates either way.
    """
    if request.stop_below is None or not logprobs:
        return False
    from m3cli.matryoshka.confidence import confidence

    return confidence(logprobs, request.stop_measure) < request.stop_below


@runtime_checkable
class Backend(Protocol):
    """Encode images once; answer (pooled grid, scale, question) requests in batches."""

    name: str
    model_id: str
    grid_side: int        # per crop
    scales: list[int]     # per-crop scales (the paper's --tokens)

    def encode(self, images: Sequence[Any]) -> list[Encoded]:
        """Run vision tower + projector once per image (PIL RGB images)."""
        ...

    def answer(self, requests: Sequence[AnswerRequest]) -> list[Generation]:
        """Pool each request's grid to its scale, prefill and decode greedily, in one batch."""
        ...

    def close(self) -> None:
        """Free model memory."""
        ...
