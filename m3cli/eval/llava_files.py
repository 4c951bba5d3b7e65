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
are written when the run ends, from every sample (resumed ones too), each atomically through the output guard,
which checks them before any work (:func:`check_answers`): never an input of the run, and an existing file is
replaced only with ``--overwrite``, or with ``--resume`` when it is an answer file (written again from every
sample).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from m3cli.eval.data import BadRow, EvalRow, file_version, raw_key
from m3cli.eval.fields import Bad, image_path, json_type, parse_gold, scalar_text
from m3cli.eval.mmbench import lay_out
from m3cli.fileio import content_hash
from m3cli.output import FolderInput, OutputFile


def parse_question(raw: Mapping[str, Any], path: str, line: int, base_dir: str) -> EvalRow | BadRow:
    """One LLaVA question row (``question_id``, ``image``, ``text``, ``category``; gold optional)."""
    qid = raw.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return BadRow(f"{os.path.splitext(os.path.basename(path))[0]}:{line}", path, line,
                      f"'question_id' must be a string or an integer (got {json_type(qid)})", raw_key(raw))
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
        return BadRow(row_id, path, line, str(bad), raw_key(raw))
    # the row by content: its question_id (as the file types it), the image file, text, category and gold
    key = content_hash("llava", qid, image, file_version(image), text, kind, gold, family)
    return EvalRow(row_id, image, text, kind, gold, (), family, path, line, key,  # type: ignore[arg-type]
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


def is_answer_file(path: str) -> bool:
    """Whether ``path`` is a LLaVA answer file as ``--answers-out`` writes it (its first line an answer line)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20) or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(first)


def _pattern_files(pattern: str) -> list[str]:
    """The files that exist now under names ``pattern`` gives some scale (``{tokens}`` or ``-<tokens>``)."""
    if "{tokens}" in pattern:
        head, _, tail = pattern.partition("{tokens}")
        shape = re.escape(head) + r"(\d+)" + re.escape(tail).replace(re.escape("{tokens}"), r"\1")
        candidates = glob.glob(glob.escape(head) + "*" + glob.escape(tail).replace(glob.escape("{tokens}"), "*"))
    else:
        stem, ext = os.path.splitext(pattern)
        shape = re.escape(stem) + r"-\d+" + re.escape(ext)
        candidates = glob.glob(glob.escape(stem) + "-*" + glob.escape(ext))
    return sorted(c for c in candidates if re.fullmatch(shape, c))


def check_answers(pattern: str, scales: Sequence[int] | None, *, overwrite: bool = False, resume: bool = False,
                  inputs: Sequence[str] = (), folders: Sequence[FolderInput] = ()) -> list[OutputFile]:
    """The answer files of ``--answers-out`` checked by the output guard before any work (not an input; the
    folder created and writable; an existing file replaced only with ``overwrite``, or with ``resume`` when it
    is an answer file, which the run then writes again from every sample). ``scales`` None (not known before
    the model loads): every file that exists now under a name the pattern gives, and the folder; returns the
    files of ``scales`` (none when None)."""
    def check(path: str) -> OutputFile:
        return OutputFile.check(path, "--answers-out", overwrite=overwrite, results=not resume,
                                ours=is_answer_file, inputs=inputs, folders=folders, create_parent=True)

    if scales is None:
        for path in _pattern_files(pattern):
            check(path)
        if "{tokens}" not in os.path.dirname(pattern):
            check(answers_path(pattern, 1))  # the folder: created, and taking a new file
        return []
    return [check(answers_path(pattern, tokens)) for tokens in scales]


def write_answers(pattern: str | Sequence[OutputFile], samples: Sequence[Mapping[str, Any]], scales: Sequence[int],
                  model_id: str) -> list[str]:
    """Write one LLaVA answer file per scale from ``samples`` (every row, data order), each atomically through the
    output guard (``pattern``, or the files :func:`check_answers` returned for ``scales``); returns the paths."""
    model = model_name(model_id)
    files = check_answers(pattern, scales) if isinstance(pattern, str) else list(pattern)
    paths = []
    for tokens, out in zip(scales, files, strict=True):
        lines = []
        for s in samples:
            entry = next((e for e in s.get("scales") or [] if int(e["tokens"]) == tokens), None)
            if entry is None:  # not evaluated: an empty answer keeps every later line in its place
                entry = {"tokens": tokens, "answer": ""}
            lines.append(json.dumps(answer_line(s, entry, model)))
        out.write_text("".join(x + "\n" for x in lines))  # a full disk: OutputWriteError (exit 1), the old file kept
        paths.append(out.path)
    return paths
