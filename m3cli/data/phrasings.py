"""How people phrase the scenes' questions: many wordings per family, and a held-out set never trained on.

The test split's questions keep the fixed templates of :mod:`m3cli.data.scenes` (``TEMPLATES``), so accuracy
stays comparable across models. Training (``phrasing_rate`` in a stage) and ``m3 eval --phrasing`` replace
a template question by a *phrasing*: a sentence frame of its family (``TRAIN``, or ``HELD_OUT`` for the
held-out report) with its slots filled by synonyms, then a surface variant (capitalisation, punctuation).

* frames: "what's the background colour?", "count the shapes.", "which shape is in the {q}?", ...;
  ``{cw}`` is "colour" or "color" (British or American, drawn per question);
* slots: ``{a_colour}`` ("a red", "an orange"), ``{colour}``, ``{q}`` (a quadrant: "top left", "upper-left",
  "top left corner", ...), ``{kind}`` (a shape kind: "circle", "disc", "round shape", ...);
* surface: lower case, capitalised, upper case or title case; the final "?" or "." kept, dropped, doubled or
  spaced off.

A held-out phrasing uses a frame no training phrasing uses, and may use kind and quadrant words that training
never sees (``HELD_OUT_KINDS``, ``HELD_OUT_QUADRANTS``); the answer never changes (a "disc" is answered
"circle"). Slot values are read back from the template question, so any ``QA`` of the scenes can be
rephrased.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from m3cli.data.scenes import DESCRIBE, DESCRIBE_QUESTIONS, QA, QUADRANTS, TEMPLATES

TRAIN: dict[str, tuple[str, ...]] = {
    "background": (
        "what {cw} is the background?",
        "what is the {cw} of the background?",
        "what's the background {cw}?",
        "which {cw} is the background?",
        "name the background {cw}.",
        "background {cw}?",
        "what {cw} is the backdrop?",
        "tell me the background {cw}.",
        "the background is what {cw}?",
        "what {cw} is the background of the image?",
        "what is the background {cw}?",
        "what {cw} background does the image have?",
        "which {cw} is the background of the picture?",
        "give the background {cw}.",
        "background: what {cw}?",
        "what {cw} is the background here?",
        "tell me what {cw} the background is.",
        "what {cw} is the image's background?",
    ),
    "exists": (
        "is there {a_colour} shape?",
        "is there any {colour} shape?",
        "are there any {colour} shapes?",
        "do you see {a_colour} shape?",
        "can you see {a_colour} shape?",
        "is {a_colour} shape present?",
        "does the image contain {a_colour} shape?",
        "any {colour} shapes?",
        "is there {a_colour} shape in the image?",
        "is any shape {colour}?",
        "is there at least one {colour} shape?",
        "are any of the shapes {colour}?",
        "is {a_colour} shape there?",
        "does the picture contain {a_colour} shape?",
        "is there {a_colour} shape here?",
        "can you find {a_colour} shape?",
        "are any shapes {colour}?",
        "is there {a_colour} shape anywhere?",
    ),
    "count": (
        "how many shapes are there?",
        "how many shapes?",
        "count the shapes.",
        "how many shapes do you see?",
        "how many shapes are in the image?",
        "how many shapes can you see?",
        "what is the number of shapes?",
        "number of shapes?",
        "how many figures are there?",
        "count the figures.",
        "how many shapes are shown?",
        "tell me how many shapes there are.",
        "how many shapes does the image have?",
        "how many shapes are drawn?",
        "what's the shape count?",
        "count the shapes in the image.",
        "how many shapes are visible?",
        "how many shapes are there in total?",
    ),
    "corner": (
        "what shape is in the {q}?",
        "which shape is in the {q}?",
        "what's in the {q}?",
        "name the shape in the {q}.",
        "what is the shape in the {q}?",
        "what kind of shape is in the {q}?",
        "what shape do you see in the {q}?",
        "what is in the {q}?",
        "the shape in the {q} is what?",
        "tell me the shape in the {q}.",
        "what shape is at the {q}?",
        "in the {q}, what shape is there?",
        "what shape can be seen in the {q}?",
        "what shape is located in the {q}?",
        "give the shape in the {q}.",
        "what is drawn in the {q}?",
        "what shape appears in the {q}?",
        "the {q} has what shape?",
    ),
    "colour_of": (
        "what {cw} is the {kind}?",
        "what is the {cw} of the {kind}?",
        "what's the {kind}'s {cw}?",
        "which {cw} is the {kind}?",
        "name the {cw} of the {kind}.",
        "what {cw} does the {kind} have?",
        "the {kind} is what {cw}?",
        "tell me the {cw} of the {kind}.",
        "what {cw} is the {kind} in the image?",
        "{cw} of the {kind}?",
        "what {cw} has the {kind}?",
        "what is the {kind}'s {cw}?",
        "what {cw} is the {kind} in the picture?",
        "give the {cw} of the {kind}.",
        "which {cw} has the {kind}?",
        "tell me what {cw} the {kind} is.",
        "what {cw} is that {kind}?",
        "the {kind}: what {cw}?",
    ),
    "letter": (
        "what letter is written?",
        "which letter is written?",
        "what letter is it?",
        "what's the letter?",
        "name the letter.",
        "what letter do you see?",
        "read the letter.",
        "which letter is shown?",
        "what letter is in the image?",
        "what is the letter?",
        "what letter can you see?",
        "which letter is there?",
        "which letter do you see?",
        "what letter is shown?",
        "what letter is drawn?",
        "give the letter.",
        "which letter is in the image?",
        "what letter is written in the image?",
    ),
    DESCRIBE: (
        *DESCRIBE_QUESTIONS,
        "what's this?",
        "what's in the image?",
        "what's in the picture?",
        "describe what you see.",
        "tell me what you see.",
        "what is in the scene?",
        "describe it.",
        "what is in this picture?",
        "describe this picture.",
        "what do you see here?",
        "tell me about the image.",
        "what is shown in the image?",
        "describe the image in a few words.",
    ),
}

HELD_OUT: dict[str, tuple[str, ...]] = {
    "background": (
        "what's the {cw} of the background?",
        "what {cw} is behind the shapes?",
        "identify the background {cw}.",
        "which {cw} is the backdrop?",
        "what {cw} is the background in this picture?",
    ),
    "exists": (
        "is there {a_colour} shape in the picture?",
        "do you see any {colour} shapes?",
        "is one of the shapes {colour}?",
        "does the picture have {a_colour} shape?",
        "can I see {a_colour} shape here?",
    ),
    "count": (
        "how many shapes are in the picture?",
        "what's the number of shapes?",
        "count how many shapes there are.",
        "how many figures can you see?",
        "give the number of shapes.",
    ),
    "corner": (
        "what's the shape in the {q}?",
        "which shape can you see in the {q}?",
        "identify the shape in the {q}.",
        "what sort of shape is in the {q}?",
        "what shape sits in the {q}?",
    ),
    "colour_of": (
        "what's the {cw} of the {kind}?",
        "which {cw} does the {kind} have?",
        "identify the {cw} of the {kind}.",
        "what {cw} is the {kind} painted?",
        "in what {cw} is the {kind} drawn?",
    ),
    "letter": (
        "what letter is in the picture?",
        "tell me the letter.",
        "which capital letter is written?",
        "what letter appears?",
        "identify the letter.",
    ),
    DESCRIBE: (
        "what does this picture show?",
        "can you describe this image?",
        "give me a description of the image.",
        "what's shown here?",
        "tell me what is in the picture.",
    ),
}

# Shape kinds as people name them (the answer stays the kind itself).
KIND_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
HELD_OUT_KINDS: dict[str, tuple[str, ...]] = {
    "circle": ("disk", "dot"),
    "square": ("square shape",),
    "triangle": ("triangle shape",),
    "cross": ("plus",),
}
_VERTICAL = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}


def _quadrant_words(quadrant: str, forms: Sequence[str]) -> tuple[str, ...]:
    vertical, horizontal = quadrant.split()
    return tuple(form.format(v=v, h=horizontal) for form in forms for v in _VERTICAL[vertical])


QUADRANT_WORDS: dict[str, tuple[str, ...]] = {
    q: _quadrant_words(q, ("{v} {h}", "{v}-{h}", "{v} {h} corner", "{v}-{h} corner")) for q in QUADRANTS
}
HELD_OUT_QUADRANTS: dict[str, tuple[str, ...]] = {
    q: _quadrant_words(q, ("{v} {h}-hand corner", "{v} {h} part")) for q in QUADRANTS
}
SPELLINGS = ("colour", "color")

# Slot values are read back from the template questions (the test split's own wording).
_SLOT_RE = {family: re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[a-z ]+?)", re.escape(template)) + "$")
            for family, template in TEMPLATES.items()}


def template_slots(qa: QA) -> dict[str, str]:
    """The slot values of a template question: ``{'colour': 'red'}``, ``{'quadrant': 'top left'}``, ...

    Raises ValueError for a question that is not its family's template (a describe question has no slots).
    """
    if qa.family == DESCRIBE:
        return {}
    match = _SLOT_RE[qa.family].match(qa.question)
    if match is None:
        raise ValueError(f"{qa.question!r} is not the {qa.family} template {TEMPLATES[qa.family]!r}")
    return match.groupdict()


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def surface(text: str, rng: np.random.Generator) -> str:
    """A surface variant as people type: case (lower, Capitalised, UPPER, Title) and final punctuation."""
    r = rng.random()
    if r < 0.45:
        out = text
    elif r < 0.9:
        out = text[0].upper() + text[1:]
    elif r < 0.95:
        out = text.upper()
    else:
        out = " ".join(w[0].upper() + w[1:] for w in text.split(" "))
    if out[-1] in "?.":
        end, r = out[-1], rng.random()
        if r < 0.25:
            out = out[:-1]
        elif r < 0.32:
            out = out[:-1] + " " + end
        elif r < 0.4:
            out = out + end
    return out


def phrase(qa: QA, rng: np.random.Generator, held_out: bool = False) -> str:
    """A phrasing of ``qa``'s question: a training frame (or a held-out one) with synonyms and a surface
    variant, all drawn from ``rng``."""
    slots = template_slots(qa)
    frame = _pick((HELD_OUT if held_out else TRAIN)[qa.family], rng)
    values = {"cw": _pick(SPELLINGS, rng)}
    if "colour" in slots:
        values["colour"] = slots["colour"]
        values["a_colour"] = f"{slots['article']} {slots['colour']}"
    if "quadrant" in slots:
        q = slots["quadrant"]
        values["q"] = _pick(QUADRANT_WORDS[q] + (HELD_OUT_QUADRANTS[q] if held_out else ()), rng)
    if "kind" in slots:
        k = slots["kind"]
        values["kind"] = _pick(KIND_WORDS[k] + (HELD_OUT_KINDS[k] if held_out else ()), rng)
    return surface(frame.format(**values), rng)


def rephrase(qa: QA, rng: np.random.Generator, held_out: bool = False) -> QA:
    """``qa`` asked in another phrasing (:func:`phrase`); the family and answer are unchanged."""
    return QA(qa.family, phrase(qa, rng, held_out), qa.answer)


def counts() -> dict[str, tuple[int, int]]:
    """Frames per family: (training, held-out); the template is one of the training frames."""
    return {family: (len(TRAIN[family]), len(HELD_OUT[family])) for family in TRAIN}

