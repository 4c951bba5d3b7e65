"""``m3 eval --samples FILE --samples-format lmms-eval``: the samples file in lmms-eval's ``--log_samples`` layout.

lmms-eval logs one JSON object per document and run. Here every scale is a run of its own, so a row gives
one line per scale, in the data's order and ascending scale:

- ``doc_id`` (the row's position in the data, from 0), ``doc`` (the row: ``id``, ``image``, ``question``,
  ``prompt``, ``family``, ``gold_kind``, ``gold``, ``choices``, ``metric`` and, if any, ``meta``),
  ``target`` (the gold: the option letter, the answer, or the list of human answers; ``""`` without one),
  ``arguments`` (``[prompt, gen_kwargs, doc_id, task, split]``; ``gen_kwargs`` holds the greedy settings
  and ``visual_tokens``, the scale), ``resps`` (``[[answer]]``), ``filtered_resps`` (``[answer]``),
  ``filter`` (``"none"``), ``doc_hash``, ``prompt_hash``, ``target_hash`` (SHA-256 hex, as lmms-eval hashes
  them), and the row's score under its metric's name (``"exact": 1.0``; none without a gold answer);
- ``tokens``: the scale, so ``jq -c 'select(.tokens == 9)' FILE`` is exactly one run's log;
- ``m3``: the rest of m3's sample for this scale (``scale``: tokens, answer, confidence, score, correct,
  logprobs, timings; ``oracle_tokens``, ``encode_ms``, ``encode_reused``, what was done to the pixels
  (``upright``, ``alpha``, ``decode_scale``, ``image_options``), ``error``, ``key``: the row's content key;
  ``part`` and ``lines``, this line's place among the row's lines), so the file is still the ``--resume``
  checkpoint and the report is computed from it.

A row that could not be evaluated is one line with empty ``resps`` and ``tokens`` null (``m3.error`` says why).

The file goes through the output guard as m3's samples do (:data:`LMMS_EVAL_SAMPLES`: checked before any work,
locked, never replaced without ``--overwrite``); ``--resume`` matches a row by its content key, and takes it
only when all of its lines were written (a row cut by a kill is evaluated again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from m3cli.errors import OutputError
from m3cli.eval.samples import SAMPLES
from m3cli.fileio import LineTooLong, escape_surrogates, iter_jsonl
from m3cli.output import RowSchema, repair_jsonl

_ROW_KEYS = ("id", "image", "question", "prompt", "family", "gold_kind", "gold", "choices", "metric", "meta")
_RUN_KEYS = ("oracle_tokens", "encode_ms", "encode_reused", "upright", "alpha", "decode_scale", "image_options",
             "error", "key")


def _sample_of(line: Any) -> Any:
    """What the output guard checks of one lmms-eval line: the m3 sample fields it carries (its row's id, image,
    question, this scale, error and content key); anything else as it is, for the checks to refuse."""
    if not (isinstance(line, dict) and isinstance(line.get("doc"), dict) and isinstance(line.get("m3"), dict)):
        return line
    doc, m3 = line["doc"], line["m3"]
    scale = m3.get("scale")
    return {"id": doc.get("id"), "image": doc.get("image"), "question": doc.get("question"),
            "scales": [] if scale is None else [scale], "error": m3.get("error"), "key": m3.get("key")}


#: The lines of a samples file in this layout, for the output guard and ``--resume``.
LMMS_EVAL_SAMPLES = RowSchema("m3 eval samples (lmms-eval layout)", "m3 eval", SAMPLES.required, ident="key",
                              start=b'{"doc_id"', run_key=None, unwrap=_sample_of)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _target(sample: dict[str, Any]) -> Any:
    gold = sample.get("gold") or []
    if sample.get("gold_kind") == "answers":
        return list(gold)
    return gold[0] if gold else ""


class LmmsEvalSamples:
    """Writes and reads the lmms-eval layout for one data source (``doc_id`` = a row's position in ``ids``)."""

    schema = LMMS_EVAL_SAMPLES

    def __init__(self, ids: Sequence[str], task: str, max_new_tokens: int, split: str = "data") -> None:
        self.doc_ids = {row_id: i for i, row_id in enumerate(ids)}
        self.task = task
        self.split = split
        self.max_new_tokens = max_new_tokens

    def lines(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """The lines of one m3 sample: one per scale (one for an error row)."""
        doc = {k: sample.get(k) for k in _ROW_KEYS if k != "meta" or sample.get("meta")}
        doc_id = self.doc_ids.get(sample["id"], -1)
        target = _target(sample)
        prompt = sample.get("prompt") or ""
        hashes = {"doc_hash": _sha256(json.dumps(doc, indent=2, ensure_ascii=False)), "prompt_hash": _sha256(prompt),
                  "target_hash": _sha256(str(target))}
        run = {k: sample.get(k) for k in _RUN_KEYS if k != "image_options" or sample.get(k)}
        entries = sample.get("scales") or []
        if not entries:
            return [{"doc_id": doc_id, "doc": doc, "target": target,
                     "arguments": [prompt, self._gen(None), doc_id, self.task, self.split], "resps": [],
                     "filtered_resps": [], "filter": "none", **hashes, "tokens": None,
                     "m3": run | {"scale": None, "part": 0, "lines": 1}}]
        out = []
        for part, entry in enumerate(entries):
            line = {"doc_id": doc_id, "doc": doc, "target": target,
                    "arguments": [prompt, self._gen(entry["tokens"]), doc_id, self.task, self.split],
                    "resps": [[entry["answer"]]], "filtered_resps": [entry["answer"]], "filter": "none", **hashes}
            if sample.get("metric") is not None:
                line[sample["metric"]] = entry["score"]
            out.append(line | {"tokens": entry["tokens"],
                               "m3": run | {"scale": entry, "part": part, "lines": len(entries)}})
        return out

    def _gen(self, tokens: int | None) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": 0, "do_sample": False, "num_beams": 1,
                "visual_tokens": tokens}

    def read(self, path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
        """The m3 samples a file in this layout holds, by content key (the last complete set of lines per row
        counts).

        A half-written last line is truncated first; a row whose lines stop short (a run killed while writing
        them) is left out, so it is evaluated again; lines without a key (an older m3) match no row. A line over
        the bounded reader's limit is an OutputError (one line).
        """
        repair_jsonl(path, LMMS_EVAL_SAMPLES.row_id)
        out: dict[str, dict[str, Any]] = {}
        try:
            f = open(path, "rb")  # closed by the with below
        except FileNotFoundError:
            return out
        current: dict[str, Any] | None = None
        complete = True
        with f:
            try:
                for _line, _end, _raw, value in iter_jsonl(f):
                    if not (isinstance(value, dict) and isinstance(value.get("doc"), dict)
                            and isinstance(value.get("m3"), dict) and value["doc"].get("id") is not None
                            and isinstance(value["m3"].get("key"), str)):
                        continue
                    doc, m3 = value["doc"], value["m3"]
                    key = m3["key"]
                    if current is None or complete or current["key"] != key or not m3.get("part"):
                        current = {k: doc.get(k) for k in _ROW_KEYS if k in doc}
                        current |= {k: m3.get(k) for k in _RUN_KEYS if k in m3}
                        current |= {"id": str(doc["id"]), "key": key, "scales": []}
                        expected = int(m3.get("lines") or 1)
                    if m3.get("scale") is not None:
                        current["scales"].append(m3["scale"])
                    complete = m3.get("scale") is None or len(current["scales"]) >= expected
                    if complete:
                        out[key] = current
            except LineTooLong as exc:
                raise OutputError(f"{escape_surrogates(os.fspath(path))}: {exc}, so this is not m3 eval samples") \
                    from None
        return out
