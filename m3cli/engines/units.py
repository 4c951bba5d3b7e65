"""What every ``m3 batch`` engine shares: the run's options, one input decoded into units of work, and the
per-batch step that answers loaded units and turns them into rows.

The local engine calls these in this process, the Ray engine in its decode tasks and answering actors, so
both write the same rows for the same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator
from dataclasses import dataclass, field

from m3cli.answering import DEFAULT_MAX_QUESTION_CHARS, answer_images, make_policy
from m3cli.backends.base import Backend
from m3cli.confidence import DEFAULT_MEASURE
from m3cli.engines.defaults import DEFAULT_QUESTION
from m3cli.errors import M3Error
from m3cli.media import BadInput, Item, MediaError, expand_video, load_image
from m3cli.output import make_row
from m3cli.policy import DEFAULT_THRESHOLD, Policy
from m3cli.scales import budget_to_scale

log = logging.getLogger(__name__)


@dataclass
class BatchOptions:
    """How every item is answered unless its own row (stdin JSONL) says otherwise.

    ``question`` None means :data:`DEFAULT_QUESTION`. ``run`` is the record of what the run's rows are made
    with (written in every row; ``--resume`` compares it), None for none.
    """

    question: str | None = DEFAULT_QUESTION
    tokens: int | None = None
    auto_scale: bool = False
    threshold: float = DEFAULT_THRESHOLD
    ladder: list[int] | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS
    measure: str = DEFAULT_MEASURE
    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    prefetch: int = 0  # queue depth; 0 means 2 x batch_size
    done_ids: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)  # done ids whose earlier row is an error
    run: dict | None = None

    @property
    def run_question(self) -> str:
        """The question of every item that brings none of its own."""
        return self.question or DEFAULT_QUESTION


@dataclass
class Unit:
    """One unit of work in input order: a loaded image, or an error to report."""

    seq: int
    item: Item | BadInput
    image: object | None = None
    error: str | None = None
    skip: bool = False


Decoded = tuple[Item | BadInput, object | None, str | None, bool]  # (item, image, error, skip)


def decode_input(
    item: Item | BadInput,
    done: Container[str],
    fps: float | None = None,
    every: int | None = None,
    max_frames: int | None = None,
) -> Iterator[Decoded]:
    """One input as its units of work, in order: an image, a video's sampled frames, or an error.

    Ids in ``done`` (a resumed run) are skipped without decoding. A video that fails part-way keeps the
    frames already yielded and ends with an error unit for the video itself.
    """
    if isinstance(item, BadInput):
        yield item, None, item.error, item.id in done
    elif item.kind == "video":
        try:
            for frame_item, frame in expand_video(item, fps, every, max_frames):
                skip = frame_item.id in done
                yield frame_item, None if skip else frame.image, None, skip
        except (MediaError, ValueError) as exc:
            yield item, None, str(exc), item.id in done
    elif item.id in done:
        yield item, None, None, True
    else:
        try:
            yield item, load_image(item.source), None, False
        except MediaError as exc:
            yield item, None, str(exc), False


def budget_note(tokens: int | None, grid: int) -> str | None:
    """The note for a ``--tokens`` budget that is not itself a nested scale (None when it is, or unset)."""
    if tokens is None:
        return None
    budget = budget_to_scale(tokens, grid)
    if not budget.rounded:
        return None
    return f"--tokens {budget.requested} rounded down to {budget.scale}, the largest nested scale <= it"


def question_for(item: Item | BadInput, opts: BatchOptions) -> str:
    """The item's own question (stdin JSONL), else the run's (-q, else :data:`DEFAULT_QUESTION`)."""
    return getattr(item, "question", None) or opts.run_question


def policy_for(item: Item, opts: BatchOptions, grid: int) -> Policy:
    """The item's scale policy: its own budget (JSONL ``tokens``) or the run's, fixed or escalating."""
    tokens = item.tokens if item.tokens is not None else opts.tokens
    return make_policy(grid, tokens, opts.auto_scale, opts.threshold, opts.ladder)


def answer_units(backend: Backend, units: list[Unit], opts: BatchOptions) -> list[tuple[int, dict]]:
    """The per-batch step every engine shares: encode the loaded units once, run each item's policy,
    and return ``(seq, row)`` in input order; per-item problems become error rows, never exceptions."""
    rows: dict[int, dict] = {}
    ready: list[tuple[Unit, str, Policy]] = []
    for unit in units:
        question = question_for(unit.item, opts)
        if unit.error is not None:
            rows[unit.seq] = _row(unit, backend, opts, error=unit.error)
        else:
            try:
                ready.append((unit, question, policy_for(unit.item, opts, backend.grid_side)))
            except (M3Error, ValueError) as exc:  # a bad per-item budget or ladder: that item's error row
                rows[unit.seq] = _row(unit, backend, opts, error=str(exc))
    if ready:
        # never raises for one item: a refused question or a failed encode/answer is that item's error row
        results = answer_images(backend, [u.image for u, _, _ in ready], [q for _, q, _ in ready],
                                [p for _, _, p in ready], opts.max_new_tokens, opts.measure, opts.max_question_chars)
        for (unit, question, _), result in zip(ready, results, strict=True):
            rows[unit.seq] = _row(unit, backend, opts, question=question, result=result)
    return sorted(rows.items())


def _row(unit: Unit, backend: Backend, opts: BatchOptions, question=None, result=None, error=None) -> dict:
    item = unit.item
    fields = {
        "id": item.id,
        "source": item.source,
        "frame": getattr(item, "frame", None),
        "time_s": getattr(item, "time_s", None),
        "question": question or question_for(item, opts),
        "model": backend.model_id,
        "backend": backend.name,
        "error": error,
        "run": opts.run,
    }
    if result is not None:
        fields.update(result.to_dict())
        fields["note"] = result.note
    return make_row(**fields)
