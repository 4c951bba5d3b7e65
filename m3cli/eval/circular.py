"""MMBench's CircularEval for ``m3 eval --data ... --circular``: every multiple-choice question is asked once per
rotation of its options and counts as right only when every rotation is.

Rotations, as LLaVA's ``model_vqa_mmbench.py --all-rounds`` makes them: a question with n options is asked n
times; round k shows the options rotated by k (round 1 of ``A. cat / B. dog / C. bird`` is ``A. dog / B. bird
/ C. cat``), the letters stay ``A``, ``B``, ``C`` and the gold letter moves with its option. An MMBench file
that already holds its rotations (VLMEvalKit's copies: rows ``index + k * 1,000,000``) is used as it is: those
rows are the question's rounds, as MMBench's own scoring groups them (``index % 1e6``). Rows without options
are asked once.

Every round of a question shows the same picture, and the rounds are kept next to one another, so the
question's image is encoded once for all of them and every scale (the engine shares an encoding by image).

A round is a row of its own (id ``<question id>@<k>`` for a generated round k >= 1, its content key the
question's with ``@<k>``), answered, sampled and resumed like any row; its ``meta`` names its ``group`` (the
question) and ``round``. The reports are made from the samples: the circular one (a question per group,
:func:`m3cli.eval.report.combine`) and the single pass (round 0 of each question: the options as in the file,
LLaVA's ordinary run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from m3cli.eval import samples as sm
from m3cli.eval.data import BadRow, EvalRow
from m3cli.eval.mmbench import CIRCULAR_OFFSET, lay_out
from m3cli.eval.report import Record, combine
from m3cli.eval.scoring import choice_letters


def _is_mmbench(row: EvalRow) -> bool:
    return bool(row.meta) and row.meta.get("format") == "mmbench"  # type: ignore[union-attr]


def rotate(row: EvalRow, k: int) -> EvalRow:
    """Round ``k`` of a multiple-choice row: its options rotated by ``k``, the gold letter with them."""
    n = len(row.choices)
    letters = choice_letters(n)
    choices = row.choices[k:] + row.choices[:k]
    gold = row.gold
    if row.gold_kind == "choice":
        gold = (letters[(letters.index(row.gold[0]) - k) % n],)
    meta: dict[str, Any] = dict(row.meta or {})
    prompt = row.prompt
    if _is_mmbench(row):
        prompt = lay_out(row.question, meta.get("hint"), choices)
        meta |= {"options": list(choices), "option_char": list(letters[k:] + letters[:k]), "rotated": k}
    # the round is part of what the row is: its content key names it, so --resume matches each round
    return replace(row, id=f"{row.id}@{k}", key=f"{row.key}@{k}", choices=choices, gold=gold, prompt=prompt,
                   meta=meta)


def _rotatable(row: EvalRow) -> bool:
    # a row whose text another layout fixed (not MMBench's) cannot have its options moved
    return len(row.choices) >= 2 and (row.prompt is None or _is_mmbench(row))


def _group_key(row: EvalRow) -> tuple[Any, ...]:
    if _is_mmbench(row):  # VLMEvalKit's grouping, within one file
        index = int(row.meta["index"])  # type: ignore[index]
        return "mmbench", row.source, index % CIRCULAR_OFFSET if index >= 0 else index
    return "row", row.id


def _tag(row: EvalRow, group: str, k: int) -> EvalRow:
    return replace(row, meta=dict(row.meta or {}) | {"group": group, "round": k})


def expand(rows: Sequence[EvalRow | BadRow]) -> list[EvalRow | BadRow]:
    """Every question's rounds, each question's rounds together, in the order questions first appear.

    MMBench rows sharing ``index % 1e6`` are one question whose rounds the file holds (ordered by index);
    any other multiple-choice question gets its rotations generated; bad rows stay where they are.
    """
    groups: dict[tuple[Any, ...], list[EvalRow]] = {}
    for row in rows:
        if isinstance(row, EvalRow):
            groups.setdefault(_group_key(row), []).append(row)
    out: list[EvalRow | BadRow] = []
    done: set[tuple[Any, ...]] = set()
    for row in rows:
        if isinstance(row, BadRow):
            out.append(row)
            continue
        key = _group_key(row)
        if key in done:
            continue
        done.add(key)
        members = groups[key]
        if len(members) > 1:  # the file's own copies
            members = sorted(members, key=lambda r: int(r.meta["index"]))  # type: ignore[index]
        elif _rotatable(row):
            members = [row] + [rotate(row, k) for k in range(1, len(row.choices))]
        group = members[0].id
        out.extend(_tag(m, group, k) for k, m in enumerate(members))
    return out


def has_file_copies(rows: Sequence[EvalRow | BadRow]) -> bool:
    """Whether an MMBench file holds its own CircularEval copies (rows ``index + k * 1e6``)."""
    return any(isinstance(r, EvalRow) and _is_mmbench(r) and int(r.meta["index"]) >= CIRCULAR_OFFSET  # type: ignore[index]
               for r in rows)


@dataclass
class Circular:
    """The questions of a circular run, from its samples."""

    questions: list[Record]  # one per question all of whose rounds were answered and scored
    single: list[Record]  # round 0 of those questions
    asked: int  # rounds answered (queries) of those questions
    incomplete: list[str]  # questions with a round not evaluated (left out of both)


def group_samples(samples: Sequence[dict[str, Any]], scales: Sequence[int]) -> Circular:
    """Group a circular run's samples (data order) by question; build each question's combined record."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        meta = s.get("meta") or {}
        by_group.setdefault(str(meta.get("group", s["id"])), []).append(s)
    questions, single, incomplete = [], [], []
    asked = 0
    for group, members in by_group.items():
        members.sort(key=lambda s: (s.get("meta") or {}).get("round", 0))
        if any(s.get("error") is not None for s in members):
            incomplete.append(group)
            continue
        if any(s.get("metric") is None for s in members):
            continue  # no gold answer: nothing to score
        parts = [sm.record(s, scales) for s in members]
        questions.append(combine(parts, group, parts[0].family))
        single.append(parts[0])
        asked += len(parts)
    return Circular(questions, single, asked, incomplete)
