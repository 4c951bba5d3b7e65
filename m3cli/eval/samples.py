"""``m3 eval --samples``: one JSON line per data row with its answer, confidence and score at each scale.

The file is also the checkpoint of ``--resume``: a row whose content ``key`` already has a line is not answered
again (its last line counts), and the report is computed from the lines, so a resumed run reports exactly what
one uninterrupted run would, whatever rows were inserted, removed or reordered in between. The file goes
through the output guard (:class:`m3cli.output.OutputTarget` with :data:`SAMPLES`): checked before any work,
locked while written, each batch's lines appended and flushed in data order. Row fields:

- ``id``, ``image``, ``question``, ``prompt`` (the text the model saw), ``family``; ``meta`` only for a row whose
  layout has fields of its own (MMBench: ``index``, ``hint``, ``l2-category``, the options as asked, the
  CircularEval ``group`` and ``round``; LLaVA question files: ``question_id``);
- ``gold_kind`` (answer / answers / choice / none), ``gold`` (list; a choice row's gold letter), ``choices``;
- ``metric`` (exact / vqa / choice / contains / mmbench; None for a row without a gold answer, whose
  ``score`` and ``correct`` are None too);
- ``scales``: one entry per scale, ascending: ``tokens``, ``answer``, ``confidence`` (the run's measure),
  ``score`` (the metric's value in [0, 1]), ``correct`` (``score == 1``), ``logprobs`` (per generated
  token, so every confidence measure can be recomputed), ``prefill_ms``, ``decode_ms``, and for LLaVA-NeXT
  ``visual_tokens`` (what the LM received at that per-crop scale, all crops and newlines);
- ``oracle_tokens``: the fewest tokens reaching the row's best score (None when every scale scores 0);
- ``encode_ms`` (this row's share of its image's encode; 0 when the encoding was reused), ``encode_reused``;
- ``upright``, ``alpha``, ``decode_scale``: what was done to the image's pixels, as in ``m3 batch`` rows, and
  ``image_options`` (only when ``--upright`` / ``--alpha-background`` / ``--fast-decode`` was given: ``--resume``
  then checks it);
- ``error``: None, or one line saying why the row was not evaluated (then ``scales`` is empty);
- ``key``: the row's content key (:mod:`m3cli.eval.data`), what ``--resume`` matches. Lines of an older m3
  without it match no row: their rows are evaluated again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from m3cli.errors import OutputError
from m3cli.eval.data import BadRow, EvalRow
from m3cli.eval.engine import ItemResult
from m3cli.eval.report import Record
from m3cli.eval.scoring import score
from m3cli.fileio import LineTooLong, escape_surrogates, iter_jsonl
from m3cli.matryoshka.confidence import MEASURES
from m3cli.output import RowSchema, repair_jsonl

NO_FAMILY = "(none)"

# What the output guard and --resume check a samples file against (every line of one, error lines included).
SAMPLES = RowSchema("m3 eval samples", "m3 eval", frozenset({"id", "image", "question", "scales", "error"}),
                    ident="key", run_key=None)


def _row_fields(row: EvalRow, prompt: str | None, metric: str | None) -> dict[str, Any]:
    fields = {"id": row.id, "image": row.image, "question": row.question, "prompt": prompt, "family": row.family,
              "gold_kind": row.gold_kind, "gold": list(row.gold), "choices": list(row.choices), "metric": metric}
    return fields | {"meta": dict(row.meta)} if row.meta else fields


def result_sample(row: EvalRow, res: ItemResult, metric: str | None, measure: str, pixels: dict[str, Any] | None = None,
                  image_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sample line of an answered row (or of one whose answering failed: ``res.error``).

    ``pixels``: what was done to its image's pixels (``Picture.fields``); ``image_options``: the options on.
    """
    if res.error is not None:
        return error_sample(row, res.error, res.item.prompt, metric)
    per_scale = []
    for tokens in sorted(res.generations):
        gen = res.generations[tokens]
        value = score(metric, gen.text, row) if metric is not None else None
        per_scale.append({"tokens": tokens, "answer": gen.text, "confidence": MEASURES[measure](gen.logprobs),
                          "score": value, "correct": value >= 1.0 if value is not None else None,
                          "logprobs": list(gen.logprobs),
                          "prefill_ms": round(gen.prefill_ms, 3), "decode_ms": round(gen.decode_ms, 3)})
        if gen.visual_tokens not in (None, tokens):  # LLaVA-NeXT only: a LLaVA-1.5 sample line is unchanged
            per_scale[-1]["visual_tokens"] = gen.visual_tokens
    best = max(s["score"] for s in per_scale) if metric is not None else 0
    oracle = min(s["tokens"] for s in per_scale if s["score"] == best) if best > 0 else None
    extra: dict[str, Any] = {"upright": None, "alpha": None, "decode_scale": None} | (pixels or {})
    if image_options:
        extra["image_options"] = dict(image_options)
    return _row_fields(row, res.item.prompt, metric) | {
        "scales": per_scale, "oracle_tokens": oracle, "encode_ms": round(res.encode_ms, 3),
        "encode_reused": res.reused} | extra | {"error": None, "key": row.key}


def error_sample(row: EvalRow | BadRow, message: str, prompt: str | None = None,
                 metric: str | None = None) -> dict[str, Any]:
    """The sample line of a row that was not evaluated."""
    if isinstance(row, BadRow):
        base = {"id": row.id, "image": None, "question": None, "prompt": None, "family": None, "gold_kind": None,
                "gold": [], "choices": [], "metric": None}
    else:
        base = _row_fields(row, prompt, metric)
    return base | {"scales": [], "oracle_tokens": None, "encode_ms": 0.0, "encode_reused": False,
                   "error": message, "key": row.key}


def record(sample: dict[str, Any], scales: Sequence[int]) -> Record:
    """The report's view of an evaluated sample, at ``scales`` (each must be in the sample)."""
    by = {int(s["tokens"]): s for s in sample["scales"]}
    gold = sample.get("gold") or [""]
    truth = gold[0] if sample.get("gold_kind") != "answers" else max(gold, key=gold.count)
    return Record(
        family=sample.get("family") or NO_FAMILY, question=sample.get("question") or "", truth=str(truth),
        answers={t: by[t]["answer"] for t in scales}, logprobs={t: list(by[t]["logprobs"]) for t in scales},
        ms={t: float(by[t]["prefill_ms"]) + float(by[t]["decode_ms"]) for t in scales},
        encode_ms=float(sample.get("encode_ms") or 0.0), scores={t: float(by[t]["score"]) for t in scales},
        id=str(sample["id"]), visual={t: int(by[t].get("visual_tokens") or t) for t in scales},
    )


def read_samples(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The last sample line per content key of a samples file, after truncating a half-written last line.

    A missing file gives nothing; lines that are not sample objects, or have no key (an older m3), are
    skipped. A line over the bounded reader's limit is an OutputError (one line).
    """
    repair_jsonl(path)
    out: dict[str, dict[str, Any]] = {}
    try:
        f = open(path, "rb")  # closed by the with below
    except FileNotFoundError:
        return out
    with f:
        try:
            for _line, _end, _raw, value in iter_jsonl(f):
                if isinstance(value, dict) and isinstance(value.get("key"), str) \
                        and isinstance(value.get("scales"), list):
                    out[value["key"]] = value
        except LineTooLong as exc:
            raise OutputError(f"{escape_surrogates(os.fspath(path))}: {exc}, so this is not m3 eval samples") \
                from None
    return out


def mismatch(sample: dict[str, Any], prompt: str, metric: str, scales: Sequence[int],
             image_options: dict[str, Any] | None = None) -> str | None:
    """Why an evaluated sample cannot be reused for this run (other prompt, metric, scales or image options), or
    None."""
    if (sample.get("image_options") or {}) != (image_options or {}):
        return f"other image options ({_options_text(sample.get('image_options'))}; this run: " \
               f"{_options_text(image_options)})"
    if sample.get("prompt") != prompt:
        return "another prompt (question or --prompt-suffix/--question-suffix changed)"
    if sample.get("metric") != metric:
        return f"--metric {sample.get('metric')}"
    have = {int(s.get("tokens", -1)) for s in sample["scales"] if isinstance(s, dict)}
    missing = [t for t in scales if t not in have]
    if missing:
        return f"no answers at {', '.join(map(str, missing))} tokens"
    return None


def _options_text(options: Any) -> str:
    """``--upright --alpha-background #ffffff`` for an options record, ``none`` for none."""
    if not isinstance(options, dict) or not options:
        return "none"
    words = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)
