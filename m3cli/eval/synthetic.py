"""The synthetic scenes as an evaluation source: the built-in ``m3 eval`` and ``--export-data``.

The built-in evaluation answers ``n`` family-balanced questions of a split; each scene is rendered and
encoded once for all its questions (the same engine as ``--data``). An answer is right when its first
word equals the one-word gold (:func:`~m3cli.eval.report.normalise`). The open ``describe`` family (asked
when named in ``families``) is scored by :mod:`m3cli.data.describe` (the share of objects and colours the
description names; correct from ``PASS_MARK``) and always gets room for the longest description. By
default the one-word families are asked in their templates, so the default questions are those of every
earlier table; ``phrasing`` asks the same questions in training or held-out phrasings
(:mod:`m3cli.data.phrasings`) and ``drawn`` about the split's drawings (:mod:`m3cli.data.drawings`: other
sizes, larger shapes). Answers that run to their token cap are counted per family and scale (``capped``).
``export_scenes`` writes the same questions as a data file (PNG images + JSONL), so ``m3 eval --data`` can
be tried on a fresh clone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

from m3cli.backends.base import Backend
from m3cli.data import describe as describe_family
from m3cli.data import drawings, phrasings, scenes
from m3cli.errors import M3Error, OutputError, UsageError, describe
from m3cli.eval.engine import DEFAULT_CACHE, EncodeCache, EvalItem, ItemResult, answer_items
from m3cli.eval.report import EvalReport, Record
from m3cli.fileio import atomic_write_text

Progress = Callable[[int, int], None]


PHRASINGS: tuple[str, ...] = ("template", "train", "held-out")


def _items(split: str, n: int, families: Sequence[str] | None, phrasing: str = "template",
           drawn: bool = False) -> list[EvalItem]:
    """The questions: each family's template (or a phrasing drawn per question: ``train``, ``held-out``)
    about the split's scenes (or its drawings)."""
    import numpy as np

    if phrasing not in PHRASINGS:
        raise UsageError(f"phrasing must be one of {', '.join(PHRASINGS)}, not {phrasing!r}")
    out = []
    source = drawings.sample if drawn else scenes.sample
    for sample, qa in scenes.iter_questions(split, n, families, source=source):
        if phrasing != "template":  # the same questions (scene, family, slots, answer), in other words
            rng = np.random.default_rng([scenes.SPLIT_SEEDS[split], sample.index,
                                         scenes.EVAL_FAMILIES.index(qa.family), PHRASINGS.index(phrasing)])
            qa = phrasings.rephrase(qa, rng, held_out=phrasing == "held-out")
        if drawn:
            name = f"{split}-drawing-{sample.index:05d}"
            key, image = ("drawing", split, sample.index), partial(_render_drawing, split, sample.index)
        else:
            name = f"{split}-{sample.index:05d}"
            key, image = ("scene", split, sample.index), partial(scenes.render, sample.scene)
        out.append(EvalItem(f"{name}-{qa.family}", key, image, qa.question, qa))
    return out


def _render_drawing(split: str, index: int):
    return drawings.render(drawings.drawing(split, index))


def _answer_all(backend: Backend, items: list[EvalItem], scales: Sequence[int], batch_size: int,
                max_new_tokens: int, describe_tokens: int) -> Iterator[list[ItemResult]]:
    """Answer ``items`` a batch at a time; ``describe`` questions get ``describe_tokens`` to answer in.

    One cache serves both lengths, so a scene asked both kinds of question in a batch is encoded once.
    """
    cache = EncodeCache(max(DEFAULT_CACHE, batch_size))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results: dict[int, ItemResult] = {}
        for tokens, keep in ((max_new_tokens, False), (describe_tokens, True)):
            part = [i for i, item in enumerate(chunk) if (item.payload.family == scenes.DESCRIBE) == keep]
            if part:
                batch = next(answer_items(backend, [chunk[i] for i in part], scales, len(part), tokens, cache))
                results.update(zip(part, batch, strict=True))
        yield [results[i] for i in range(len(chunk))]


def _record(res: ItemResult, scales: Sequence[int], cap: int) -> Record:
    qa, gens = res.item.payload, res.generations
    answers = {s: gens[s].text for s in scales}
    extra = {}
    if qa.family == scenes.DESCRIBE:
        extra = {"scores": {s: describe_family.score(answers[s], qa.answer) for s in scales},
                 "pass_mark": describe_family.PASS_MARK}
    return Record(family=qa.family, question=qa.question, truth=qa.answer, answers=answers,
                  logprobs={s: gens[s].logprobs for s in scales},
                  ms={s: gens[s].prefill_ms + gens[s].decode_ms for s in scales},
                  encode_ms=res.encode_ms, id=res.item.id,
                  visual={s: gens[s].visual_tokens or s for s in scales},
                  capped={s: len(gens[s].token_ids) >= cap for s in scales}, **extra)


def evaluate(
    backend: Backend,
    split: str = "test",
    n: int = 600,
    scales: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: Progress | None = None,
    describe_tokens: int = scenes.DESCRIPTION_MAX_WORDS,
    phrasing: str = "template",
    drawn: bool = False,
) -> EvalReport:
    """Answer ``n`` family-balanced questions of ``split`` at every scale, encoding each scene once.

    ``families`` defaults to the one-word ones; ``describe`` answers get at least ``describe_tokens``.
    ``phrasing`` asks each question in its template (default: the questions of every earlier table), in a
    training phrasing or in a held-out one (:mod:`m3cli.data.phrasings`); ``drawn`` asks about the split's
    drawings (:mod:`m3cli.data.drawings`) instead of its 48 px scenes.
    """
    scales = sorted(scales or backend.scales)
    items = _items(split, n, families, phrasing, drawn)
    describe_cap = max(max_new_tokens, describe_tokens)
    start = time.perf_counter()
    records: list[Record] = []
    if progress:
        progress(0, len(items))
    for batch in _answer_all(backend, items, scales, batch_size, max_new_tokens, describe_cap):
        for res in batch:
            if res.error is not None:  # the scenes are ours: a failure here is the model's or the backend's
                raise M3Error(f"question {res.item.id}: {res.error}")
            cap = describe_cap if res.item.payload.family == scenes.DESCRIBE else max_new_tokens
            records.append(_record(res, scales, cap))
        if progress:
            progress(len(records), len(items))
    fams = [f for f in scenes.EVAL_FAMILIES if any(r.family == f for r in records)]
    variant = [w for w, on in ((f"{phrasing} phrasings", phrasing != "template"), ("drawings", drawn)) if on]
    return EvalReport(split, scales, records, time.perf_counter() - start, fams,
                      questions=", ".join(variant) or None)


def export_scenes(out_dir: str | os.PathLike[str], split: str = "test", n: int = 600,
                  families: Sequence[str] | None = None, phrasing: str = "template",
                  drawn: bool = False) -> tuple[str, int, int]:
    """Write the questions ``evaluate(split, n, families, phrasing=..., drawn=...)`` asks as
    ``<out_dir>/<split>.jsonl`` (``id``, ``image``, ``question``, ``answer``, ``family``) and their images as
    ``<out_dir>/images/*.png``.

    Returns (the JSONL path, rows, images). Existing files of the same names are replaced. The ``describe``
    family is refused: its answers need their own scoring, which ``--data`` rows cannot name.
    """
    if families and scenes.DESCRIBE in families:
        raise UsageError("--export-data writes the one-word families; describe answers have their own scoring "
                         "(m3 eval --family describe)")
    out_dir = os.fspath(out_dir)
    items = _items(split, n, families, phrasing, drawn)
    try:
        return _export(out_dir, split, items)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write the export ({describe(exc)})") from None


def _export(out_dir: str, split: str, items: list[EvalItem]) -> tuple[str, int, int]:
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    lines, written = [], set()
    for item in items:
        name = item.id.rsplit("-", 1)[0] + ".png"
        if name not in written:
            item.load().save(os.path.join(images, name))
            written.add(name)
        qa = item.payload
        lines.append(json.dumps({"id": item.id, "image": f"images/{name}", "question": qa.question,
                                 "answer": qa.answer, "family": qa.family}))
    path = os.path.join(out_dir, f"{split}.jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, len(lines), len(written)
