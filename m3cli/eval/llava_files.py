"""LLaVA's evaluation files for ``m3 eval --data``: question JSONL in, answer JSONL out.

Question files (``llava/eval/model_vqa_loader.py``, ``model_vqa.py``; e.g. ``llava_gqa_testdev_balanced.jsonl``,
``llava_textvqa_val_v051_ocr.jsonl``, ``llava_pope_test.jsonl``, ``llava-mm-vet.jsonl``) hold one JSON object a
line: ``question_id``, ``image`` (relative to ``--image-folder``), ``text`` (the question as the model sees
it, the task's instruction included, e.g. ``"...\\nAnswer the question using a single word or phrase."``) and
``category``. Such a row is recognised by ``question_id`` + ``text`` without ``question``. The text is asked
exactly as written (``--question-suffix`` would add a line; the files already carry theirs). LLaVA's files
have no gold answers (their scoring scripts read the benchmark's annotations): a row with none is answered and
written, not scored. A row may carry one to be scored here: ``answer``, ``answers`` (VQAv2-style), or
``label`` (POPE's ``coco_pope_*.json`` label files are question files with ``label``).

Answer files (``--answers-out FILE``): one per scale, ``FILE`` with ``{tokens}`` replaced by the scale, or with
``-<tokens>`` before its extension (``answers/m3.jsonl`` -> ``answers/m3-576.jsonl``), so that each is
exactly the file LLaVA's script would write for a model run at that budget and LLaVA's own scoring scripts
(``scripts/convert_gqa_for_eval.py``, ``convert_vqav2_for_submission.py``, ``llava/eval/eval_textvqa.py``,
``eval_pope.py``, ``convert_mmbench_for_submission.py``, ``convert_mmvet_for_eval.py``) read them unchanged.
A line has exactly LLaVA's fields: ``question_id`` (as in the question file; MMBench: the TSV ``index``),
``prompt`` (the question file's ``text``; MMBench: hint, question and options without the instruction),
``text`` (the answer), ``answer_id`` (stable: the same row, round, scale and model give the same id; LLaVA's
is random), ``model_id`` (the model's name as LLaVA derives it from its path) and ``metadata`` (``{}``);
MMBench lines also ``round_id``, ``options`` and ``option_char`` after ``question_id``, as LLaVA's MMBench
script writes them (with ``--circular``, generated rotations are rounds 1, 2, ... of their question). Lines
follow the data's order, one per row (POPE's scorer pairs answers with labels by position): a row that could
not be evaluated gets an empty ``text``, which every scorer counts wrong (the report lists why). The files
are written when the run ends, from every sample (resumed ones too).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from m3cli.errors import OutputError, describe
from m3cli.eval.data import BadRow, EvalRow
from m3cli.eval.fields import Bad, image_path, json_type, parse_gold, scalar_text
from m3cli.eval.mmbench import lay_out
from m3cli.fileio import atomic_write_text


def parse_question(raw: Mapping[str, Any], path: str, line: int, base_dir: str) -> EvalRow | BadRow:
    """One LLaVA question row (``question_id``, ``image``, ``text``, ``category``; gold optional)."""
    qid = raw.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return BadRow(f"{os.path.splitext(os.path.basename(path))[0]}:{line}", path, line,
                      f"'question_id' must be a string or an integer (got {json_type(qid)})")
    row_id = str(qid)
    try:
        text = raw.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Bad("'text' must be the question (a non-empty string)")
        family = scalar_text(raw.get("category"), "category")
        gold_fields = {k: raw[k] for k in ("answer", "answers") if k in raw}
        if not gold_fields and raw.get("label") is not None:
            gold_fields = {"answer": raw["label"]}
        kind, gold, _ = parse_gold(gold_fields, False) if gold_fields else ("none", (), ())
        image = image_path(raw.get("image"), base_dir)
    except Bad as bad:
        return BadRow(row_id, path, line, str(bad))
    return EvalRow(row_id, image, text, kind, gold, (), family, path, line,  # type: ignore[arg-type]
                   meta={"format": "llava", "question_id": qid})


# --- answer files ------------------------------------------------------------------------------------


def model_name(model_id: str) -> str:
    """The model's name as LLaVA's ``get_model_name_from_path`` gives it: the path's last part (a
    ``checkpoint-*`` folder is named with its parent: ``run_checkpoint-500``)."""
    parts = model_id.strip("/").split("/")
    if len(parts) > 1 and parts[-1].startswith("checkpoint-"):
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def answers_path(pattern: str, tokens: int) -> str:
    """The answer file of one scale: ``{tokens}`` in ``pattern`` replaced, else ``-<tokens>`` before the suffix."""
    if "{tokens}" in pattern:
        return pattern.replace("{tokens}", str(tokens))
    stem, ext = os.path.splitext(pattern)
    return f"{stem}-{tokens}{ext}"


def _answer_id(*parts: Any) -> str:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=11).hexdigest()


def answer_line(sample: Mapping[str, Any], entry: Mapping[str, Any], model: str) -> dict[str, Any]:
    """LLaVA's answer line for one sample at one scale (``entry``: the sample's ``scales`` item)."""
    meta = sample.get("meta") or {}
    fmt = meta.get("format")
    if fmt == "mmbench" and "options" in meta:
        qid, rotated = meta["index"], int(meta.get("rotated", 0))
        line: dict[str, Any] = {
            "question_id": qid, "round_id": rotated,
            "prompt": lay_out(sample["question"], meta.get("hint"), meta["options"]), "text": entry["answer"],
            "options": list(meta["options"]), "option_char": list(meta["option_char"])}
    else:
        qid = meta["question_id"] if fmt == "llava" else sample["id"]
        prompt = sample["question"] if fmt == "llava" else sample.get("prompt") or sample.get("question") or ""
        rotated = 0
        line = {"question_id": qid, "prompt": prompt, "text": entry["answer"]}
    return line | {"answer_id": _answer_id(sample["id"], rotated, entry["tokens"], model), "model_id": model,
                   "metadata": {}}


def write_answers(pattern: str, samples: Sequence[Mapping[str, Any]], scales: Sequence[int],
                  model_id: str) -> list[str]:
    """Write one LLaVA answer file per scale from ``samples`` (every row, data order); returns the paths."""
    model = model_name(model_id)
    paths = []
    for tokens in scales:
        lines = []
        for s in samples:
            entry = next((e for e in s.get("scales") or [] if int(e["tokens"]) == tokens), None)
            if entry is None:  # not evaluated: an empty answer keeps every later line in its place
                entry = {"tokens": tokens, "answer": ""}
            lines.append(json.dumps(answer_line(s, entry, model)))
        path = answers_path(pattern, tokens)
        try:
            folder = os.path.dirname(path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            atomic_write_text(path, "".join(x + "\n" for x in lines))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the answers ({describe(exc)})") from None
        paths.append(path)
    return paths
