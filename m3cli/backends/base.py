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
    """One image's projected visual-token grid (G*G rows, LM width), backend-owned storage."""

    grid: Any
    side: int
    encode_ms: float


@dataclass
class AnswerRequest:
    """Answer ``question`` about an encoded image using ``scale`` pooled visual tokens."""

    encoded: Encoded
    scale: int
    question: str
    max_new_tokens: int = 16


@dataclass
class Generation:
    """A greedy answer with the log-probability of each generated token (EOS excluded)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prefill_ms: float
    decode_ms: float


@runtime_checkable
class Backend(Protocol):
    """Encode images once; answer (pooled grid, scale, question) requests in batches."""

    name: str
    model_id: str
    grid_side: int
    scales: list[int]

    def encode(self, images: Sequence[Any]) -> list[Encoded]:
        """Run vision tower + projector once per image (PIL RGB images)."""
        ...

    def answer(self, requests: Sequence[AnswerRequest]) -> list[Generation]:
        """Pool each request's grid to its scale, prefill and decode greedily, in one batch."""
        ...

    def close(self) -> None:
        """Free model memory."""
        ...
