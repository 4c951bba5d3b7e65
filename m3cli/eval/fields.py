"""Field parsing of eval data rows (:mod:`m3cli.eval.data`): text, lists, the gold, the image path.

Each helper returns the field's value or raises :class:`Bad` with the one-line reason the row is bad.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from m3cli.eval.scoring import choice_letters, gold_letter
from m3cli.fileio import input_problem, looks_like_url

MAX_CHOICES = 26

GoldKind = Literal["answer", "answers", "choice", "none"]  # none: answered, not scored (a test split)


class Bad(Exception):
    """The current row is bad, with this reason."""


def scalar_text(value: Any, name: str, what: str | None = None) -> str | None:
    """A string or number as text (ids, answers: ``3`` is a fine answer to "how many"); None when missing or
    empty; Bad for anything else, a boolean included (``true`` is not the text of any answer)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Bad(f"{what or repr(name)} must be a string or a number (got {json_type(value)})")
    text = str(value).strip()
    return text or None


def question_text(value: Any) -> str:
    """The question: a non-empty string (a number is no question); Bad otherwise."""
    if value is None:
        raise Bad("missing field 'question'")
    if not isinstance(value, str):
        raise Bad(f"'question' must be a string (got {json_type(value)})")
    text = value.strip()
    if not text:
        raise Bad("'question' is empty")
    return text


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


def csv_list(cell: str, name: str) -> list[Any]:
    """A CSV list cell: a JSON list, or ``|``-separated text."""
    text = cell.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise Bad(f"'{name}' looks like a JSON list but is not valid JSON") from None
        if not isinstance(value, list):
            raise Bad(f"'{name}' must be a list")
        return value
    return [part for part in (p.strip() for p in text.split("|")) if part]


def text_list(value: Any, name: str, csv_cell: bool) -> list[str] | None:
    if value is None or (csv_cell and not str(value).strip()):
        return None
    if csv_cell:
        value = csv_list(value, name)
    if not isinstance(value, list):
        raise Bad(f"'{name}' must be a list (got {json_type(value)})")
    out = []
    for number, item in enumerate(value, start=1):
        if name == "answers" and isinstance(item, dict):
            item = item.get("answer")  # VQAv2 annotations: [{"answer": ..., "answer_id": ...}, ...]
        if item is None:
            raise Bad(f"'{name}' item {number} is null")
        text = scalar_text(item, name, f"'{name}' item {number}")
        if text is None:
            raise Bad(f"'{name}' item {number} is empty")
        out.append(text)
    if not out:
        raise Bad(f"'{name}' is empty")
    return out


def parse_gold(raw: Mapping[str, Any], csv_cell: bool) -> tuple[GoldKind, tuple[str, ...], tuple[str, ...]]:
    choices = text_list(raw.get("choices"), "choices", csv_cell)
    answer_value = raw.get("answer")
    if choices is not None:
        if not 2 <= len(choices) <= MAX_CHOICES:
            raise Bad(f"'choices' needs 2 to {MAX_CHOICES} options (got {len(choices)})")
        answer = scalar_text(answer_value, "answer")
        if answer is None:
            raise Bad("'choices' given without the gold 'answer' (a letter or a choice's text)")
        letter = gold_letter(choices, answer)
        if letter is None:
            letters = choice_letters(len(choices))
            raise Bad(f"'answer' {answer!r} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices")
        return "choice", (letter,), tuple(choices)
    answers = text_list(raw.get("answers"), "answers", csv_cell)
    if answers is None and isinstance(answer_value, list):
        answers = text_list(answer_value, "answers", False)
    if answers is not None:
        return "answers", tuple(answers), ()
    answer = scalar_text(answer_value, "answer")
    if answer is None:
        raise Bad("no gold answer: give 'answer', 'answers', or 'choices' with 'answer'")
    return "answer", (answer,), ()


def image_path(value: Any, base_dir: str) -> str:
    """The row's image as an absolute path, checked by type (:func:`m3cli.fileio.input_problem`) without
    opening it: a FIFO or a device is refused for what it is, a URL is said to be one."""
    if value is not None and not isinstance(value, str):
        raise Bad(f"'image' must be a string (got {json_type(value)})")
    image = value.strip() if value else ""
    if not image:
        raise Bad("missing field 'image'")
    if looks_like_url(image):
        raise Bad(f"image is a URL: m3 reads local files only, not URLs (download it first): {image}")
    path = os.path.normpath(os.path.join(base_dir, image))
    problem = input_problem(path, empty_ok=False)
    if problem == "file not found":
        raise Bad(f"image not found: {path}")
    if problem == "is a directory, not a file":
        raise Bad(f"image is a folder: {path}")
    if problem == "empty file":
        raise Bad(f"image is an empty file: {path}")
    if problem is not None:
        raise Bad(f"image {problem}: {path}")
    return path
