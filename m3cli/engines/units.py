"""What every ``m3 batch`` engine shares: the run's options, one input decoded into units of work, and the
per-batch step that answers loaded units and turns them into rows.

The local engine calls these in this process, the Ray engine in its decode tasks and answering actors, so
both write the same rows for the same inputs.

One decoded picture (an image, a sampled frame, a video's collage) becomes one unit per question asked
about it (:func:`unit_questions`); the units of one picture share its pixels and its identity ``key``, and
:func:`answer_units` encodes each key once per batch, or not at all when an :class:`EncodeCache` still
holds its encoding from an earlier batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable
from dataclasses import dataclass, field
from typing import Any

from m3cli.answering.collage import DEFAULT_FRAMES, collage_question
from m3cli.answering.core import (
    DEFAULT_MAX_QUESTION_CHARS,
    MODEL_FAILURE,
    REFUSED,
    Query,
    Result,
    answer_queries,
    check_question,
    each_alone,
    policy_from_spec,
)
from m3cli.answering.defaults import DEFAULT_QUESTION
from m3cli.answering.encode_cache import EncodeCache
from m3cli.backends.base import Backend, Encoded
from m3cli.engines.decode import VIDEO_MODES, AllDone, Decoded, RecentKeys, Sampling, decode_input
from m3cli.errors import M3Error
from m3cli.matryoshka.policy import Policy, PolicySpec
from m3cli.media import BadInput, ImageOptions, Item, MediaError
from m3cli.media.inputs import question_ids
from m3cli.output import make_row

log = logging.getLogger(__name__)

__all__ = ["VIDEO_MODES", "AllDone", "BatchOptions", "Decoded", "RecentKeys", "Sampling", "Unit", "answer_units",
           "decode_input", "done_for", "question_count", "unit_questions"]

# Encodings kept for questions about an image answered in an earlier batch. Smaller than m3 eval's: a batch
# run's repeats are mostly one image's questions, adjacent, and each entry holds a grid on the model's device.
DEFAULT_BATCH_CACHE = 16


@dataclass
class BatchOptions:
    """How every item is answered unless its own row (stdin JSONL) says otherwise.

    ``question`` None means :data:`DEFAULT_QUESTION`; ``questions`` (several ``-q``) asks each item without
    a question of its own every one of them, one row each (ids ``ID#q1``, ``ID#q2``, ...). ``run`` is the
    record of what the run's rows are made with (written in every row; ``--resume`` compares it), None for
    none. ``video_mode`` ``"collage"`` answers a video once, about ``collage_frames`` frames tiled
    ``collage_layout`` (columns, rows; None: IG-VLM's).

    The scale policy is what the flags state (``tokens``, ``auto_scale``, ``threshold``, ``ladder``,
    ``measure``, ``on_miss``; None: unstated), the rest taken from ``default_policy`` (the model's tuned
    policy, :func:`m3cli.answering.defaults.model_policy`), then from the fallback: :attr:`run_policy`.
    """

    question: str | None = DEFAULT_QUESTION
    tokens: int | None = None
    auto_scale: bool = False
    threshold: float | None = None
    ladder: list[int] | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS
    measure: str | None = None
    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    prefetch: int = 0  # queue depth; 0 means 2 x batch_size
    done_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)  # done ids whose earlier row is an error
    run: dict | None = None
    questions: tuple[str, ...] = ()
    video_mode: str = "frames"
    collage_frames: int = DEFAULT_FRAMES
    collage_layout: tuple[int, int] | None = None
    encode_cache: int = DEFAULT_BATCH_CACHE
    max_visual_tokens: int | None = None  # --max-visual-tokens: a cap on each image's total (answering.VisualCap)
    image: ImageOptions = ImageOptions()  # --upright / --alpha-background / --fast-decode (default: the recipe)
    on_miss: str | None = None
    default_policy: PolicySpec | None = None

    def policy_spec(self, tokens: int | None = None) -> PolicySpec:
        """What the run's flags state about the scale policy (``tokens``: an item's own budget instead)."""
        return PolicySpec(self.tokens if tokens is None else tokens, self.auto_scale, self.threshold,
                          self.measure, tuple(self.ladder) if self.ladder else None, self.on_miss)

    @property
    def run_policy(self) -> PolicySpec:
        """The run's policy in full: the flags, then the model's policy, then the fallback."""
        return self.policy_spec().over(self.default_policy)

    @property
    def run_question(self) -> str:
        """The question of every item that brings none of its own (the first, when there are several)."""
        return self.questions[0] if self.questions else (self.question or DEFAULT_QUESTION)

    @property
    def run_questions(self) -> list[str]:
        """Every question asked of an item that brings none of its own, in order."""
        return list(self.questions) if self.questions else [self.run_question]

    @property
    def sampling(self) -> Sampling:
        """How videos are turned into pictures."""
        return Sampling(self.fps, self.every, self.max_frames, self.video_mode, self.collage_frames,
                        self.collage_layout)


@dataclass
class Unit:
    """One unit of work in input order: one question about a loaded picture, or an error to report.

    ``id`` and ``question`` are the row's (None: the item's own id, and its question or the run's). Units
    with equal ``key`` show the same pixels and share one encode; ``load`` decodes the picture when
    ``image`` was not kept because its encoding is expected in the cache. ``frames``: the video frames a
    collage tiles (its question is then asked with :data:`~m3cli.answering.collage.COLLAGE_PREFIX`).
    """

    seq: int
    item: Item | BadInput
    image: object | None = None
    error: str | None = None
    skip: bool = False
    id: str | None = None
    question: str | None = None
    key: Hashable | None = None
    load: Callable[[], Any] | None = None
    frames: list[int] | None = None
    pixels: dict[str, Any] | None = None  # what was done to an image file's pixels (its rows' fields)
    # a unit that brings its own answering (an OpenAI request): policy, answer length and stop sequences
    policy: Policy | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    failure: str | None = None  # set when answered with an error: answering.core's REFUSED or MODEL_FAILURE

    @property
    def row_id(self) -> str:
        return self.id if self.id is not None else self.item.id


def question_count(item: Item | BadInput, n_questions: int) -> int:
    """How many rows an item makes: one when it brings its own question, else one per run question."""
    return 1 if getattr(item, "question", None) else n_questions


def unit_questions(item: Item | BadInput, opts: BatchOptions) -> list[tuple[str, str]]:
    """``(row id, question)`` for every question asked about one picture of an input, in order."""
    own = getattr(item, "question", None)
    if own:
        return [(item.id, own)]
    questions = opts.run_questions
    return list(zip(question_ids(item.id, len(questions)), questions, strict=True))


def done_for(item: Item | BadInput, opts: BatchOptions) -> Container[str]:
    """What :func:`decode_input` needs to skip the pictures of ``item`` whose every row is done."""
    n = question_count(item, len(opts.run_questions))
    return opts.done_ids if n == 1 else AllDone(opts.done_ids, n)


def question_for(item: Item | BadInput, opts: BatchOptions) -> str:
    """The item's own question (stdin JSONL), else the run's (-q, else :data:`DEFAULT_QUESTION`)."""
    return getattr(item, "question", None) or opts.run_question


def policy_for(item: Item, opts: BatchOptions, grid: int) -> Policy:
    """The item's scale policy: its own budget (JSONL ``tokens``, which like ``--tokens`` replaces the model's
    policy) or the run's, fixed or escalating."""
    return policy_from_spec(grid, opts.policy_spec(item.tokens), opts.max_visual_tokens, opts.default_policy)


def _failed(error: str) -> Result:
    return Result("", 0.0, None, [], {}, error=error)


def answer_units(backend: Backend, units: list[Unit], opts: BatchOptions,
                 cache: EncodeCache | None = None) -> list[tuple[int, dict]]:
    """The per-batch step every engine shares: encode each picture of the batch once (none whose encoding
    ``cache`` holds), run each unit's policy, and return ``(seq, row)`` in input order; per-item problems
    become error rows, never exceptions.

    A refused question costs no encode. When several units share a picture its encode time is split among
    them; a unit answered from the cache reports ``encode_ms`` 0.
    """
    rows: dict[int, dict] = {}
    ready: list[tuple[Unit, str, Policy]] = []
    for unit in units:
        question = unit.question or question_for(unit.item, opts)
        if unit.error is not None:
            # a unit that never learnt its question (an OpenAI request that could not be read) records none
            rows[unit.seq] = _row(unit, backend, opts, question if unit.question is not None else None,
                                  error=unit.error)
            continue
        try:
            policy = unit.policy or policy_for(unit.item, opts, backend.grid_side)
        except (M3Error, ValueError) as exc:  # a bad per-item budget or ladder: that item's error row
            unit.failure = REFUSED
            rows[unit.seq] = _row(unit, backend, opts, question, error=str(exc))
            continue
        problem = check_question(backend, _asked(unit, question), policy, _max_new(unit, opts),
                                 opts.max_question_chars)
        if problem is not None:
            unit.failure = REFUSED
            rows[unit.seq] = _row(unit, backend, opts, question, result=_failed(problem))
        else:
            ready.append((unit, question, policy))
    if ready:
        encodings, shares = _encode_units(backend, [u for u, _, _ in ready], cache)
        live = [(u, q, p) for u, q, p in ready if isinstance(encodings[u.seq], Encoded)]
        for unit, question, _ in ready:
            if not isinstance(encodings[unit.seq], Encoded):
                unit.failure = MODEL_FAILURE
                rows[unit.seq] = _row(unit, backend, opts, question, result=_failed(encodings[unit.seq]))
        queries = [Query(encodings[u.seq], _asked(u, q), p, _max_new(u, opts), u.stop) for u, q, p in live]
        # never raises for one item: a failed answer is that item's error result
        results = answer_queries(backend, queries, None, opts.max_question_chars)  # each policy's measure
        for (unit, question, _), result in zip(live, results, strict=True):
            _charge(result, shares[unit.seq])
            unit.failure = result.failure
            rows[unit.seq] = _row(unit, backend, opts, question, result=result)
    return sorted(rows.items())


def _max_new(unit: Unit, opts: BatchOptions) -> int:
    return unit.max_new_tokens if unit.max_new_tokens is not None else opts.max_new_tokens


def _asked(unit: Unit, question: str) -> str:
    """What the model is asked: the question, prefixed as the paper does for a video collage."""
    return collage_question(question) if unit.frames is not None else question


def _encode_units(backend: Backend, units: list[Unit], cache: EncodeCache | None
                  ) -> tuple[dict[int, Encoded | str], dict[int, float | None]]:
    """Each unit's encoding (or error message) by seq, each picture encoded once, and each unit's share of
    its encode time (None: the whole of it, as when nothing is shared)."""
    groups: OrderedDict[Hashable, list[Unit]] = OrderedDict()
    for unit in units:
        # a picture without a file identity is still shared by the units that hold its very pixels
        local = ("image", id(unit.image)) if unit.image is not None else ("unit", unit.seq)
        groups.setdefault(unit.key if unit.key is not None else local, []).append(unit)
    encodings: dict[int, Encoded | str] = {}
    shares: dict[int, float | None] = {}
    todo: list[tuple[Hashable, list[Unit], Any]] = []
    for key, members in groups.items():
        hit = cache.get(key) if cache is not None and members[0].key is not None else None
        if hit is not None:
            for unit in members:
                encodings[unit.seq], shares[unit.seq] = hit, 0.0
            continue
        image = next((u.image for u in members if u.image is not None), None)
        if image is None:
            loader = next((u.load for u in members if u.load is not None), None)
            try:
                image = loader() if loader is not None else None
            except MediaError as exc:
                for unit in members:
                    encodings[unit.seq] = str(exc)
                continue
        if image is None:  # a unit built without pixels: a caller's bug, still only that item's error
            for unit in members:
                encodings[unit.seq] = "internal error: no image to encode"
            continue
        todo.append((key, members, image))
    outcomes = each_alone(backend.encode, [image for _, _, image in todo], "encoding a batch")
    for (key, members, _), enc in zip(todo, outcomes, strict=True):
        if isinstance(enc, Encoded):
            if cache is not None:
                cache.encodes += 1
                if members[0].key is not None:
                    cache.put(key, enc)
        share = None if len(members) == 1 or not isinstance(enc, Encoded) else enc.encode_ms / len(members)
        for unit in members:
            encodings[unit.seq], shares[unit.seq] = enc, share
    return encodings, shares


def _charge(result: Result, share: float | None) -> None:
    """Make a result's timings count its share of a shared encode (``share`` None: left as it is)."""
    if share is None or result.error is not None or "encode_ms" not in result.timings:
        return
    timings = result.timings
    timings["total_ms"] = timings.get("total_ms", 0.0) - timings["encode_ms"] + share
    timings["encode_ms"] = share


def _row(unit: Unit, backend: Backend, opts: BatchOptions, question: str | None, result=None, error=None) -> dict:
    item = unit.item
    fields = {
        "id": unit.row_id,
        "source": item.source,
        "frame": getattr(item, "frame", None),
        "time_s": getattr(item, "time_s", None),
        "question": question,
        "model": backend.model_id,
        "backend": backend.name,
        "error": error,
        "run": opts.run,
    }
    if unit.frames is not None:
        fields["frames"] = list(unit.frames)
    if unit.pixels is not None:
        fields.update(unit.pixels)
    if result is not None:
        fields.update(result.to_dict())
        fields["note"] = result.note
    return make_row(**fields)
