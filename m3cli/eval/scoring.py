"""Answer scoring by the benchmarks' own rules: VQA normalisation, exact match, VQA accuracy,
containment and multiple choice.

Normalisation follows the EvalAI answer processor, the one LLaVA (``llava/eval/m4c_evaluator.py``),
lmms-eval (``tasks/_task_utils/vqa_eval_metric.py``) and MMF use for VQAv2/TextVQA. The steps, in order:

1. lower case; delete every ``,`` and ``?``; ``'s`` -> `` 's``; strip;
2. newlines and tabs -> spaces;
3. each punctuation mark in ``PUNCTUATION`` is deleted if the text has it next to a space (or has a
   comma between digits), else replaced by a space; then every period NOT followed by a digit is
   deleted (so ``3.5`` stays, ``dog.`` -> ``dog``);
4. split on whitespace; number words ``zero``..``ten`` (and ``none``) -> digits; articles a/an/the
   dropped; the contractions table restores apostrophes (``isnt`` -> ``isn't``); joined by one space.

The tables (contractions, number words, articles, punctuation) equal those of the EvalAI server's
``vqaEval.py`` (Cloud-CV/VQA-Evaluation); that script's punctuation step is written
with regexes instead of the processor's loop and can differ on odd strings. The first GT-Vision-Lab
``vqaEval.py`` (VQA v1) differs more: its punctuation list also has ``:`` and ``'`` but not
``{ } - !``, and its contractions use curly apostrophes. Neither variant is followed here.
This module has no click and prints nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from m3cli.errors import UsageError

# --- the official tables (data, verbatim from the EvalAI answer processor) -------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# The reference pattern is written "(?!<=\d)(\.)(?!\d)": its first group is a (vacuous) lookahead, not
# a lookbehind, so in effect a period is dropped whenever no digit follows it.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# The reference passes re.UNICODE (32) as ``count`` to Pattern.sub, so at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)

# --- prompts ---------------------------------------------------------------------------------------

#: LLaVA / M3 ``model_vqa_mmbench.py --single-pred-prompt`` suffix.
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
#: LLaVA's VQAv2/GQA/TextVQA question suffix (lmms-eval's vqav2 ``post_prompt``).
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."

METRICS: tuple[str, ...] = ("exact", "vqa", "choice", "contains", "mmbench")
GOLD_KINDS: tuple[str, ...] = ("answer", "answers", "choice")


# --- normalisation ---------------------------------------------------------------------------------


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the text as it came in, not as rewritten so far (as the reference does).
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation (EvalAI processor; see the module docstring)."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


# --- free-form metrics -----------------------------------------------------------------------------


def exact_match(pred: str, gold: str) -> bool:
    """Whether ``pred`` and ``gold`` are equal after normalisation."""
    return normalize_answer(pred) == normalize_answer(gold)


def contains(pred: str, gold: str) -> bool:
    """Whether the normalised ``gold`` occurs in the normalised ``pred`` as whole words.

    ``contains("it is a red car", "red")`` is true, ``contains("reddish", "red")`` is not; an empty
    normalised gold never matches.
    """
    g = normalize_answer(gold)
    return bool(g) and f" {g} " in f" {normalize_answer(pred)} "


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of ``pred`` against the human ``answers`` (all normalised).

    The simple formula is ``min(#humans who gave pred / 3, 1)``. The official script averages it
    over the n leave-one-out subsets of n-1 humans: with m of n humans matching, a held-out matching
    human leaves m-1 matches, any other leaves m, so the score is
    ``(m * min((m-1)/3, 1) + (n-m) * min(m/3, 1)) / n``. For 10 humans that gives 0.3, 0.6, 0.9, 1.0
    for m = 1, 2, 3, >=4 (the simple formula: 1/3, 2/3, 1, 1). With a single reference answer there
    are no leave-one-out peers, so the score is plain exact match. Every human answer is normalised
    too, as LLaVA's TextVQA evaluator does (lmms-eval's VQAv2 scorer does so only when the humans
    disagree; VQAv2's annotations are already normalised, so the two agree there).
    """
    refs = [normalize_answer(a) for a in answers]
    if not refs:
        return 0.0
    p = normalize_answer(pred)
    if len(refs) == 1:
        return float(p == refs[0])
    n, m = len(refs), sum(r == p for r in refs)
    return (m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n


def vqa_accuracy_simple(pred: str, answers: Sequence[str]) -> float:
    """``min(#matching humans / 3, 1)`` without the leave-one-out average (for comparison only)."""
    p = normalize_answer(pred)
    return min(sum(normalize_answer(a) == p for a in answers) / 3, 1.0)


# --- multiple choice -------------------------------------------------------------------------------


def choice_letters(n: int) -> str:
    """The option letters for ``n`` choices: ``A``, ``B``, ... (at most 26)."""
    if not 0 <= n <= 26:
        raise ValueError(f"{n} choices: at most 26 are supported")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def build_choice_prompt(question: str, choices: Sequence[str], suffix: str | None = CHOICE_SUFFIX) -> str:
    """The LLaVA/M3 MMBench prompt: the question, one ``A. text`` line per option, then the suffix
    on its own line (left out when ``suffix`` is empty or None)."""
    lines = [question.rstrip("\n")]
    lines += [f"{letter}. {text}" for letter, text in zip(choice_letters(len(choices)), choices, strict=True)]
    if suffix:
        lines.append(suffix)
    return "\n".join(lines)


@functools.lru_cache(maxsize=32)
def _choice_regexes(letters: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    upper = f"[{letters}]"
    either = f"[{letters}{letters.lower()}]"
    return (
        # The whole answer is a letter, maybe wrapped or punctuated: "B", "b.", "(B)", "[B]", "**B**", "B)".
        re.compile(rf"^[\s*_`\"'(\[]*({either})[\s*_`\"')\].:,;!]*$"),
        # An explicit declaration anywhere: "The answer is B", "Answer: (C)", "option D is correct".
        re.compile(
            rf"\b(?i:answer|option|choice)\s*(?:(?i:is)\s*:?|:|=)?\s*(?:(?i:option|choice)\s*)?[*(\[]*({upper})\b(?![.'’-]\w)"
        ),
        # A leading letter used as a label: "B. a red car", "(B) red", "B) red", "B: red".
        re.compile(rf"^\s*(?:\(({upper})\)|\[({upper})\]|({upper})\s*[.):](?!\w))"),
    )


def _plain(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def extract_choice(pred: str, choices: Sequence[str]) -> str | None:
    """The option letter ``pred`` picks among ``choices``, or None when it picks none or several.

    Tried in order: the whole answer is a letter ("A", "a.", "(A)", "A)"); an explicit declaration
    ("The answer is A", "Answer: (B)"); a leading label ("A. cat", "(A) cat", "A) cat"); the answer
    equals one choice's text (case and punctuation ignored); exactly one choice's text occurs in the
    answer as whole words (like VLMEvalKit's ``can_infer_text``, used for MMBench, which also only tries
    answers at most twice as long as all the choices together; a match inside a longer matching choice
    does not count). A sentence that merely starts with the article "A" ("A cat is ...") is
    not read as option A.
    """
    letters = choice_letters(len(choices))
    if not letters or not pred or not pred.strip():
        return None
    text = pred.strip()
    bare, declared, label = _choice_regexes(letters)
    m = bare.match(text)
    if m:
        return m.group(1).upper()
    hits = {h.group(1) for h in declared.finditer(text)}
    if len(hits) == 1:
        return hits.pop()
    m = label.match(text)
    if m:
        return next(g for g in m.groups() if g)
    plain = _plain(text)
    texts = [_plain(c) for c in choices]
    exact = [letters[i] for i, t in enumerate(texts) if t and t == plain]
    if len(exact) == 1:
        return exact[0]
    if len(plain) > 2 * sum(len(t) for t in texts):
        return None
    found = [letters[i] for i, t in enumerate(texts) if t and f" {t} " in f" {plain} "]
    if len(found) > 1:
        # "red car" inside the answer also contains the choice "red": keep only the longest matches
        # that no other match contains.
        found = [
            x for x in found
            if not any(y != x and f" {texts[letters.index(x)]} " in f" {texts[letters.index(y)]} " for y in found)
        ]
    return found[0] if len(found) == 1 else None


# VLMEvalKit's answers that refuse to pick (its ``can_infer_option`` maps them to the "none" option Z).
_REFUSALS: tuple[str, ...] = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
_OPTION_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def infer_option(pred: str, choices: Sequence[str]) -> str | None:
    """The option letter MMBench's exact matching reads from ``pred`` (VLMEvalKit's ``can_infer``), or None.

    First the letter as a word: ``.()[],:;!*#{}`` become spaces, the answer is split on whitespace, and if
    exactly one option letter is among the words and it is one of the last five words, that letter. A refusal
    (or a lone ``Z``, VLMEvalKit's "none of them") picks nothing. Otherwise the option text: if the answer is at
    most twice as long as all the options together and exactly one option's text occurs in it (lower case,
    as a plain substring), that option. Without an LLM judge, anything else is wrong (VLMEvalKit's
    ``exact_matching``); CircularEval reads every rotation this way, with no length cap.
    """
    letters = choice_letters(len(choices))
    text = str(pred)
    if any(refusal in text for refusal in _REFUSALS):
        return None
    words = text.translate(_OPTION_SEPARATORS).split()
    named = [c for c in letters if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return None
    lower = text.lower()
    if len(lower) > 2 * sum(len(c) for c in choices):
        return None
    hits = [letter for letter, c in zip(letters, choices, strict=True) if c.lower() in lower]
    return hits[0] if len(hits) == 1 else None


def gold_letter(choices: Sequence[str], answer: str) -> str | None:
    """The gold option letter for ``answer`` given as a letter ("b", "B", "(B)", "B.") or as a
    choice's text; None when it is neither. A letter wins over a choice whose text is that letter."""
    letters = choice_letters(len(choices))
    a = str(answer).strip()
    m = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\.?", a)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    plain = _plain(a)
    hits = [letters[i] for i, c in enumerate(choices) if _plain(c) == plain and plain]
    return hits[0] if len(hits) == 1 else None


def choice_correct(pred: str, choices: Sequence[str], answer: str) -> bool:
    """Whether ``pred`` picks the gold option (``answer``: a letter or the choice text)."""
    gold = gold_letter(choices, answer)
    return gold is not None and extract_choice(pred, choices) == gold


# --- dispatch --------------------------------------------------------------------------------------


def _get(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def gold_kind(row: Any) -> str:
    """The gold's form: "choice" (choices + answer), "answers" (a list of human answers) or "answer".

    ``row`` is an ``EvalRow`` (its ``gold_kind``) or a mapping with the raw data-file fields.
    """
    kind = _get(row, "gold_kind")
    if kind in GOLD_KINDS:
        return kind
    if _get(row, "choices"):
        return "choice"
    if isinstance(_get(row, "answers"), (list, tuple)):
        return "answers"
    return "answer"


def metric_for(gold: Any) -> str:
    """The metric a gold's form calls for: choice -> "choice", answers -> "vqa", answer -> "exact".

    ``gold`` is a gold kind ("answer", "answers", "choice"), an ``EvalRow`` or a raw row mapping.
    """
    kind = gold if isinstance(gold, str) and gold in GOLD_KINDS else gold_kind(gold)
    return {"choice": "choice", "answers": "vqa", "answer": "exact"}[kind]


def _gold_values(row: Any) -> tuple[str, list[str], list[str]]:
    """(kind, gold texts, choices) of an EvalRow or a raw mapping; choice gold as its letter."""
    kind = gold_kind(row)
    choices = [str(c) for c in (_get(row, "choices") or [])]
    gold = _get(row, "gold")
    if gold is not None:
        values = [str(g) for g in gold]
    elif kind == "answers":
        values = [str(a) for a in _get(row, "answers")]
    else:
        values = [str(_get(row, "answer", ""))]
    if kind == "choice":
        letter = gold_letter(choices, values[0]) if values else None
        values = [letter] if letter else []
    return kind, values, choices


def score(metric: str, pred: str, row: Any) -> float:
    """Score ``pred`` for ``row`` (an ``EvalRow`` or raw mapping) with ``metric``; a float in [0, 1].

    - exact: 1 if the answer equals the gold (any of the human answers; for a choice row the gold
      letter or the gold option's text) after normalisation.
    - vqa: official VQA accuracy against the human answers (one answer: exact match; choice row:
      as "choice").
    - choice: 1 if the extracted option letter is the gold one; needs a row with choices.
    - mmbench: 1 if the letter MMBench's exact matching reads (:func:`infer_option`) is the gold one; choices.
    - contains: 1 if a gold text (any human answer; a choice row's gold option text) occurs in the
      answer as whole words.
    """
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    kind, gold, choices = _gold_values(row)
    if not gold:
        return 0.0
    if kind == "choice":
        letter = gold[0]
        text = choices[choice_letters(len(choices)).index(letter)]
        if metric == "mmbench":
            return float(infer_option(pred, choices) == letter)
        if metric in ("choice", "vqa"):
            return float(extract_choice(pred, choices) == letter)
        if metric == "exact":
            return float(exact_match(pred, letter) or exact_match(pred, text))
        return float(contains(pred, text))
    if metric in ("choice", "mmbench"):
        raise UsageError(f"metric {metric!r} needs rows with choices (row {_get(row, 'id', '?')} has none)")
    if metric == "vqa":
        return vqa_accuracy(pred, gold)
    if metric == "exact":
        p = normalize_answer(pred)
        return float(any(p == normalize_answer(g) for g in gold))
    return float(any(contains(pred, g) for g in gold))
