"""The synthetic scenes as an evaluation source: the built-in ``m3 eval`` and ``--export-data``.

The built-in evaluation answers ``n`` family-balanced questions of a split; each scene is rendered and
encoded once for all its questions (the same engine as ``--data``). An answer is right when its first
word equals the one-word gold (:func:`~m3cli.eval.report.normalise`). The open ``describe`` family (asked
when named in ``families``) is scored by :mod:`m3cli.data.describe` (the share of objects and colours the
description names; correct from ``PASS_MARK``) and always gets room for the longest description. By
default the one-word families are asked, so the default questions are those of every earlier table.
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

from m3cli.backends.base import Backend
from m3cli.data import describe as describe_family
from m3cli.data import scenes
from m3cli.errors import M3Error, OutputError, UsageError, describe
from m3cli.eval.engine import DEFAULT_CACHE, EncodeCache, EvalItem, ItemResult, answer_items
from m3cli.eval.report import EvalReport, Record
from m3cli.fileio import atomic_write_text

Progress = Callable[[int, int], None]


def _items(split: str, n: int, families: Sequence[str] | None) -> list[EvalItem]:
    out = []
    for sample, qa in scenes.iter_questions(split, n, families):
        out.append(EvalItem(f"{split}-{sample.index:05d}-{qa.family}", ("scene", split, sample.index),
                            lambda scene=sample.scene: scenes.render(scene), qa.question, qa))
    return out


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


def _record(res: ItemResult, scales: Sequence[int]) -> Record:
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
                  visual={s: gens[s].visual_tokens or s for s in scales}, **extra)


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
) -> EvalReport:
    """Answer ``n`` family-balanced questions of ``split`` at every scale, encoding each scene once.

    ``families`` defaults to the one-word ones; ``describe`` answers get at least ``describe_tokens``.
    """
    scales = sorted(scales or backend.scales)
    items = _items(split, n, families)
    start = time.perf_counter()
    records: list[Record] = []
    if progress:
        progress(0, len(items))
    for batch in _answer_all(backend, items, scales, batch_size, max_new_tokens,
                             max(max_new_tokens, describe_tokens)):
        for res in batch:
            if res.error is not None:  # the scenes are ours: a failure here is the model's or the backend's
                raise M3Error(f"question {res.item.id}: {res.error}")
            records.append(_record(res, scales))
        if progress:
            progress(len(records), len(items))
    fams = [f for f in scenes.EVAL_FAMILIES if any(r.family == f for r in records)]
    return EvalReport(split, scales, records, time.perf_counter() - start, fams)


EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "mmbench", "llava")


def export_scenes(out_dir: str | os.PathLike[str], split: str = "test", n: int = 600,
                  families: Sequence[str] | None = None, fmt: str = "jsonl") -> tuple[str, int, int]:
    """Write the questions ``evaluate(split, n, families)`` asks, in the layout ``fmt``:

    - ``jsonl``: ``<out_dir>/<split>.jsonl`` (``id``, ``image``, ``question``, ``answer``, ``family``) and the
      scenes as ``<out_dir>/images/*.png``;
    - ``mmbench``: ``<out_dir>/<split>.tsv``, an MMBench/VLMEvalKit TSV: each question as multiple choice over 2
      to 5 of its family's answer words (the gold among them), a hint on every fourth row, ``category`` = the
      family, ``l2-category`` = coarse or fine perception, the scene's PNG in base64 on the first row about it
      and the ``index`` of that row on the others;
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
    try:
        if fmt == "mmbench":
            return _export_mmbench(out_dir, split, n, families)
        return _export(out_dir, split, n, families, llava=fmt == "llava")
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write the export ({describe(exc)})") from None


def _export(out_dir: str, split: str, n: int, families: Sequence[str] | None,
            llava: bool = False) -> tuple[str, int, int]:
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    lines, written = [], set()
    for i, (sample, qa) in enumerate(scenes.iter_questions(split, n, families)):
        name = f"{split}-{sample.index:05d}.png"
        if name not in written:
            scenes.render(sample.scene).save(os.path.join(images, name))
            written.add(name)
        if llava:
            row = {"question_id": i, "image": name, "text": qa.question, "category": qa.family, "answer": qa.answer}
        else:
            row = {"id": f"{split}-{sample.index:05d}-{qa.family}", "image": f"images/{name}",
                   "question": qa.question, "answer": qa.answer, "family": qa.family}
        lines.append(json.dumps(row))
    path = os.path.join(out_dir, f"llava_{split}.jsonl" if llava else f"{split}.jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, len(lines), len(written)


_MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category",
                    "split", "image")
_COARSE = frozenset({"background", "exists"})
_HINT = "The picture shows coloured shapes and letters on a plain background."


def _export_mmbench(out_dir: str, split: str, n: int, families: Sequence[str] | None) -> tuple[str, int, int]:
    os.makedirs(out_dir, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(_MMBENCH_COLUMNS)
    first_row: dict[int, int] = {}  # scene -> index of the row carrying its picture
    for i, (sample, qa) in enumerate(scenes.iter_questions(split, n, families)):
        rng = random.Random(f"{split}-{i}")
        words = [w for w in scenes.answer_words(qa.family) if w != qa.answer]
        k = min(len(words) + 1, 2 + i % 4)  # 2 to 5 options
        options = [qa.answer, *rng.sample(words, k - 1)]
        rng.shuffle(options)
        if sample.index in first_row:
            image = str(first_row[sample.index])
        else:
            png = io.BytesIO()
            scenes.render(sample.scene).save(png, format="PNG")
            image = base64.b64encode(png.getvalue()).decode("ascii")
            first_row[sample.index] = i
        letter = "ABCDE"[options.index(qa.answer)]
        l2 = "coarse_perception" if qa.family in _COARSE else "finegrained_perception"
        writer.writerow([i, qa.question, _HINT if i % 4 == 0 else "", *(options + [""] * (5 - k)), letter,
                         qa.family, l2, "dev", image])
    path = os.path.join(out_dir, f"{split}.tsv")
    atomic_write_text(path, buffer.getvalue())
    return path, i + 1 if first_row else 0, len(first_row)
