"""Answer evaluation items at every scale: each image encoded once, one ``backend.answer`` pass per scale.

Items come in batches of ``batch_size`` questions. Within a batch, questions about the same image (same
``key``) share one encode; across batches a bounded LRU :class:`EncodeCache` of recent encodings catches
questions about an image seen shortly before. Every rung of every question pools that one grid, so no
image is ever encoded twice while its encoding is cached.

A problem with one item (its image cannot be read, the encoder or the LM fails on it) makes that item's
result an error and never stops the run: a failing batch call is retried item by item to find the culprit.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from m3cli.answering.encode_cache import DEFAULT_CACHE, EncodeCache
from m3cli.backends.base import AnswerRequest, Backend, Encoded, Generation
from m3cli.errors import M3Error, describe

__all__ = ["DEFAULT_CACHE", "EncodeCache", "EvalItem", "ItemResult", "answer_items"]


@dataclass
class EvalItem:
    """One question to answer at every scale.

    ``key`` names the image's identity (questions with equal keys share an encode; None: never shared);
    ``load`` returns the RGB image (raising for an unreadable one); ``payload`` is the caller's row.
    """

    id: str
    key: Hashable | None
    load: Callable[[], Any]
    prompt: str
    payload: Any = None


@dataclass
class ItemResult:
    """An item's generation at each scale, or the one-line ``error`` that stopped it."""

    item: EvalItem
    generations: dict[int, Generation] = field(default_factory=dict)
    encode_ms: float = 0.0  # this item's share of its image's encode (0 when the encoding was cached)
    reused: bool = False  # the encoding came from an earlier batch
    error: str | None = None


def _message(exc: BaseException) -> str:
    """One line for a per-item failure: an M3Error's own message, else the exception type and first line."""
    if isinstance(exc, M3Error):
        return str(exc)
    text = describe(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _batched(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    chunk: list[EvalItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _each(call, items: list[Any]) -> list[Any]:
    """``call(items)`` in one go; if it fails, one by one, a failing item giving its error message."""
    if not items:
        return []
    try:
        return list(call(items))
    except Exception as exc:  # noqa: BLE001 - isolated per item below
        if len(items) == 1:
            return [_message(exc)]
    return [_each(call, [item])[0] for item in items]


def _encode(backend: Backend, images: list[Any]) -> list[Encoded | str]:
    """Encode ``images`` in one call, or one by one when that fails."""
    return _each(backend.encode, images)


def _answer(backend: Backend, requests: list[AnswerRequest]) -> list[Generation | str]:
    """Answer ``requests`` in one call, or one by one when that fails."""
    return _each(backend.answer, requests)


def _encode_chunk(backend: Backend, chunk: Sequence[EvalItem], results: list[ItemResult],
                  cache: EncodeCache, share: bool) -> dict[int, Encoded]:
    """Each item's encoding: from the cache, shared with an earlier item of the chunk, or encoded now."""
    encoded: dict[int, Encoded] = {}
    groups: dict[Hashable, list[int]] = {}  # key -> items of this chunk that need it encoded
    images: list[Any] = []
    for i, item in enumerate(chunk):
        key = item.key if share and item.key is not None else ("item", i)
        hit = cache.get(key) if share else None
        if hit is not None:
            encoded[i] = hit
            results[i].reused = True
        elif key in groups:
            groups[key].append(i)
        else:
            try:
                image = item.load()
            except Exception as exc:  # noqa: BLE001 - a bad image is this item's error
                results[i].error = _message(exc)
                continue
            groups[key] = [i]
            images.append(image)
    outs = _encode(backend, images)
    cache.encodes += sum(not isinstance(o, str) for o in outs)
    for (key, members), out in zip(groups.items(), outs, strict=True):
        for i in members:
            if isinstance(out, str):
                results[i].error = out
            else:
                encoded[i] = out
                results[i].encode_ms = out.encode_ms / len(members)
        if not isinstance(out, str) and share:
            cache.put(key, out)
    return encoded


def answer_items(
    backend: Backend,
    items: Iterable[EvalItem],
    scales: Sequence[int],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    cache: EncodeCache | None = None,
    share: bool = True,
) -> Iterator[list[ItemResult]]:
    """Answer every item at every scale; yields each batch's results in item order.

    ``share=False`` encodes every item's image afresh (for measuring what sharing saves).
    """
    cache = cache if cache is not None else EncodeCache()
    for chunk in _batched(items, batch_size):
        results = [ItemResult(item) for item in chunk]
        encoded = _encode_chunk(backend, chunk, results, cache, share)
        live = [i for i in range(len(chunk)) if i in encoded]
        for scale in scales:
            reqs = [AnswerRequest(encoded[i], scale, chunk[i].prompt, max_new_tokens) for i in live]
            for i, gen in zip(live, _answer(backend, reqs), strict=True):
                if isinstance(gen, str):
                    results[i].error = gen
                else:
                    results[i].generations[scale] = gen
            live = [i for i in live if results[i].error is None]
        for r in results:
            if r.error is not None:
                r.generations = {}
        yield results
