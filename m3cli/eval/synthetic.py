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
``export_scenes`` writes the same questions as a data file (PNG images + JSONL, or the benchmarks' layouts:
an MMBench TSV, a LLaVA question file), so ``m3 eval --data`` can be tried on a fresh clone.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

from m3cli.backends.base import Backend
from m3cli.data import describe as describe_family
from m3cli.data import drawings, phrasings, scenes
from m3cli.errors import M3Error, UsageError, describe
from m3cli.eval.engine import DEFAULT_CACHE, EncodeCache, EvalItem, ItemResult, answer_items
from m3cli.eval.report import EvalReport, Record
from m3cli.fileio import atomic_write_text
from m3cli.output import OutputWriteError

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


EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "mmbench", "llava")


def export_scenes(out_dir: str | os.PathLike[str], split: str = "test", n: int = 600,
                  families: Sequence[str] | None = None, fmt: str = "jsonl", phrasing: str = "template",
                  drawn: bool = False) -> tuple[str, int, int]:
    """Write the questions ``evaluate(split, n, families, phrasing=..., drawn=...)`` asks, in the layout
    ``fmt``:

    - ``jsonl``: ``<out_dir>/<split>.jsonl`` (``id``, ``image``, ``question``, ``answer``, ``family``) and the
      pictures as ``<out_dir>/images/*.png``;
    - ``mmbench``: ``<out_dir>/<split>.tsv``, an MMBench/VLMEvalKit TSV: each question as multiple choice over 2
      to 5 of its family's answer words (the gold among them), a hint on every fourth row, ``category`` = the
      family, ``l2-category`` = coarse or fine perception, the picture's PNG in base64 on the first row about
      it and the ``index`` of that row on the others;
    - ``llava``: ``<out_dir>/llava_<split>.jsonl`` (``question_id``, ``image`` under ``<out_dir>/images``,
      ``text``, ``category``, plus ``answer``, which LLaVA's own files do not carry) and the PNGs.

    Returns (the data file's path, rows, images). Existing files of the same names are replaced. The
    ``describe`` family is refused: its answers need their own scoring, which ``--data`` rows cannot name.
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    if families and scenes.DESCRIBE in families:
        raise UsageError("--export-data writes the one-word families; describe answers have their own scoring "
                         "(m3 eval --family describe)")
    out_dir = os.fspath(out_dir)
    items = _items(split, n, families, phrasing, drawn)
    try:
        if fmt == "mmbench":
            return _export_mmbench(out_dir, split, items)
        return _export(out_dir, split, items, llava=fmt == "llava")
    except OSError as exc:  # part-way (the file was checked before): what is written stays, exit code 1
        raise OutputWriteError(f"{out_dir}: cannot write the export ({describe(exc)})") from None


def export_path(out_dir: str | os.PathLike[str], split: str = "test", fmt: str = "jsonl") -> str:
    """The data file :func:`export_scenes` writes for ``fmt`` (what the output guard checks before any work)."""
    name = {"mmbench": f"{split}.tsv", "llava": f"llava_{split}.jsonl"}.get(fmt, f"{split}.jsonl")
    return os.path.join(os.fspath(out_dir), name)


def _picture_name(item: EvalItem) -> str:
    """The PNG of an item's picture: its id without the family (``test-00012.png``, ``test-drawing-00012.png``)."""
    return item.id.rsplit("-", 1)[0] + ".png"


def _export(out_dir: str, split: str, items: list[EvalItem], llava: bool = False) -> tuple[str, int, int]:
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    lines, written = [], set()
    for i, item in enumerate(items):
        name = _picture_name(item)
        if name not in written:
            item.load().save(os.path.join(images, name))
            written.add(name)
        qa = item.payload
        if llava:
            row = {"question_id": i, "image": name, "text": qa.question, "category": qa.family, "answer": qa.answer}
        else:
            row = {"id": item.id, "image": f"images/{name}", "question": qa.question, "answer": qa.answer,
                   "family": qa.family}
        lines.append(json.dumps(row))
    path = export_path(out_dir, split, "llava" if llava else "jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, len(lines), len(written)


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category",
                    "split", "image")
_COARSE = frozenset({"background", "exists"})
_HINT = "The picture shows coloured shapes and letters on a plain background."


def _export_mmbench(out_dir: str, split: str, items: list[EvalItem]) -> tuple[str, int, int]:
    os.makedirs(out_dir, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(MMBENCH_COLUMNS)
    first_row: dict[str, int] = {}  # picture -> index of the row carrying it
    for i, item in enumerate(items):
        qa, picture = item.payload, _picture_name(item)
        rng = random.Random(f"{split}-{i}")
        words = [w for w in scenes.answer_words(qa.family) if w != qa.answer]
        k = min(len(words) + 1, 2 + i % 4)  # 2 to 5 options
        options = [qa.answer, *rng.sample(words, k - 1)]
        rng.shuffle(options)
        if picture in first_row:
            image = str(first_row[picture])
        else:
            png = io.BytesIO()
            item.load().save(png, format="PNG")
            image = base64.b64encode(png.getvalue()).decode("ascii")
            first_row[picture] = i
        letter = "ABCDE"[options.index(qa.answer)]
        l2 = "coarse_perception" if qa.family in _COARSE else "finegrained_perception"
        writer.writerow([i, qa.question, _HINT if i % 4 == 0 else "", *(options + [""] * (5 - k)), letter,
                         qa.family, l2, "dev", image])
    path = export_path(out_dir, split, "mmbench")
    atomic_write_text(path, buffer.getvalue())
    return path, i + 1 if first_row else 0, len(first_row)
