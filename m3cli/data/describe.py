"""Scoring the ``describe`` family: which objects and colours a free-text description names.

A description (:func:`m3cli.data.scenes.description`) is read as a multiset of items: the background
(a background colour followed by "background") and one (colour, kind) pair per object, where the kind is a
shape or "letter". Answer and gold are read the same way, so the score is symmetric in what it forgives:
word order, extra punctuation or words around the pairs. Sizes, positions and letter identities are not
scored (the description does not carry them).

score = (items both name, counted with multiplicity) / max(items in the gold, items in the answer)

so an answer that names everything and nothing else scores 1, a missing or wrong object costs one item,
and naming objects that are not there costs as much as leaving real ones out. A description counts as
correct when its score reaches ``PASS_MARK``.
"""

from __future__ import annotations

from collections import Counter

from m3cli.data.scenes import BACKGROUND_NAMES, COLOUR_NAMES, KINDS, split_words

PASS_MARK = 0.75  # at most a quarter of the items wrong (e.g. one of bg + 3 shapes)
OBJECT_KINDS: tuple[str, ...] = (*KINDS, "letter")


def items(text: str) -> Counter[tuple[str, str]]:
    """The items a description names: ('background', colour) and (colour, kind) pairs, with counts.

    Only the first background named counts; a colour not directly followed by a kind names nothing.
    """
    words = split_words(text)
    found: Counter[tuple[str, str]] = Counter()
    background = False
    for a, b in zip(words, words[1:], strict=False):
        if b == "background" and a in BACKGROUND_NAMES and not background:
            found[("background", a)] += 1
            background = True
        elif a in COLOUR_NAMES and b in OBJECT_KINDS:
            found[(a, b)] += 1
    return found


def score(answer: str, truth: str) -> float:
    """How much of the gold description ``truth`` the ``answer`` names, in [0, 1] (see the module doc)."""
    gold, said = items(truth), items(answer)
    denominator = max(sum(gold.values()), sum(said.values()))
    if not denominator:
        return 0.0
    return sum((gold & said).values()) / denominator


def correct(answer: str, truth: str) -> bool:
    """The description reaches ``PASS_MARK``."""
    return score(answer, truth) >= PASS_MARK
