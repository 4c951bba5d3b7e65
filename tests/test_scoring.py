"""Scoring against hand-computed cases: the VQA normalisation table, VQA accuracy, multiple choice."""

from __future__ import annotations

import itertools

import pytest

from m3cli.errors import UsageError
from m3cli.eval.scoring import (
    ARTICLES,
    CHOICE_SUFFIX,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    build_choice_prompt,
    choice_correct,
    contains,
    exact_match,
    extract_choice,
    gold_letter,
    metric_for,
    normalize_answer,
    score,
    vqa_accuracy,
    vqa_accuracy_simple,
)

# Each output worked out by hand from the EvalAI rules (lower case; drop , ? ; 's -> " 's"; punctuation
# next to a space deleted, else made a space; periods not before a digit deleted; number words to digits;
# articles dropped; contractions table).
NORMALISATION_TABLE = [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("isnt", "isn't"),
    ("1,000", "1000"),
    ("yes.", "yes"),
    ("Yes", "yes"),
    ("  no \n", "no"),
    ("A cat", "cat"),
    ("an apple", "apple"),
    ("The Red Car", "red car"),
    ("3.5", "3.5"),
    ("3.", "3"),
    (".5", ".5"),
    ("3.14.", "3.14"),
    ("ten", "10"),
    ("none", "0"),
    ("zero", "0"),
    ("eleven", "eleven"),  # the number table stops at ten
    ("one two three", "1 2 3"),
    ("Two dogs.", "2 dogs"),
    ("dont", "don't"),
    ("won't", "won't"),  # ' is not a punctuation mark here
    ("whats", "what's"),
    ("what's", "what 's"),  # 's is split off before anything else
    ("dog's bowl", "dog 's bowl"),
    ("oclock", "o'clock"),
    ("twas", "'twas"),
    ("Im", "im"),  # lower-cased before the (capitalised) table key could match
    ("I'm", "i'm"),
    ("hello?", "hello"),
    ("yes!", "yes"),
    ("red, white", "red white"),
    ("black/white", "black white"),  # no space next to "/": it becomes a space
    ("black / white", "black white"),  # a space next to "/": it is deleted
    ("t-shirt", "t shirt"),
    ("red - white", "red white"),
    ("-5", "5"),
    ("e.g.", "eg"),
    ("u.s.a.", "usa"),
    ("$5", "$5"),
    ("50%", "50%"),
    ("1,000,000", "1000000"),
    ("line1\nline2", "line1 line2"),
    ("tab\there", "tab here"),
    ('"quoted"', "quoted"),
    ("hot_dog", "hot dog"),
    ("[left]", "left"),
    ("@home", "home"),
    ("x+y", "x y"),
    ("time: 3", "time: 3"),  # ":" is not in the EvalAI list
    ("(a)", ""),  # brackets become spaces, then the article goes
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISATION_TABLE)
def test_normalisation_table(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_table_is_big_enough():
    assert len(NORMALISATION_TABLE) >= 30


def test_reference_tables_are_complete():
    # Sizes of the EvalAI tables: 120 contractions, 12 number words, 3 articles, 21 punctuation marks.
    assert (len(CONTRACTIONS), len(NUMBER_WORDS), len(ARTICLES), len(PUNCTUATION)) == (120, 12, 3, 21)
    assert CONTRACTIONS["isnt"] == "isn't" and NUMBER_WORDS["none"] == "0"


def test_period_removal_is_capped_at_32_as_in_the_reference():
    # The reference passes re.UNICODE (32) as Pattern.sub's count: only 32 periods are ever removed.
    assert normalize_answer("." * 40) == "." * 8


def test_exact_match_normalises_both_sides():
    assert exact_match("The Dog.", "dog")
    assert exact_match("Two", "2")
    assert not exact_match("dogs", "dog")


def test_contains_whole_words_after_normalisation():
    assert contains("It is a red car.", "red")
    assert contains("I see two dogs", "2 dogs")
    assert not contains("reddish", "red")
    assert not contains("anything", "the")  # normalises to nothing


def _leave_one_out(pred: str, answers: list[str]) -> float:
    """The official definition spelled out: average of min(matches/3, 1) over each subset of n-1."""
    p = normalize_answer(pred)
    refs = [normalize_answer(a) for a in answers]
    accs = [min(sum(r == p for j, r in enumerate(refs) if j != i) / 3, 1.0) for i in range(len(refs))]
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("m", "official", "simple"),
    [(0, 0.0, 0.0), (1, 0.3, 1 / 3), (2, 0.6, 2 / 3), (3, 0.9, 1.0), (4, 1.0, 1.0), (10, 1.0, 1.0)],
)
def test_vqa_accuracy_averages_leave_one_out(m, official, simple):
    answers = ["cat"] * m + ["dog"] * (10 - m)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(official)
    assert vqa_accuracy_simple("Cat.", answers) == pytest.approx(simple)


def test_vqa_accuracy_matches_the_spelled_out_definition():
    pool = ["2", "two", "Two.", "3", "three", "a dog", "dog"]
    for answers in itertools.islice(itertools.product(pool, repeat=10), 0, 3000, 37):
        for pred in ("2", "3", "dog", "cat"):
            assert vqa_accuracy(pred, list(answers)) == pytest.approx(_leave_one_out(pred, list(answers)))


def test_vqa_accuracy_hand_case_and_edges():
    answers = ["red"] * 2 + ["dark red"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Dark red.", answers) == pytest.approx(1.0)
    assert vqa_accuracy("Two", ["2"]) == 1.0  # one reference: exact match
    assert vqa_accuracy("3", ["2"]) == 0.0
    assert vqa_accuracy("x", []) == 0.0


CHOICES = ["red car", "blue", "red", "green"]


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("A", "A"),
        ("a.", "A"),
        ("(B)", "B"),
        ("B)", "B"),
        ("[C]", "C"),
        ("**D**", "D"),
        ("The answer is C", "C"),
        ("The answer is: (D).", "D"),
        ("Answer: B", "B"),
        ("I think the correct option is B.", "B"),
        ("B. blue", "B"),
        ("C: red", "C"),
        ("(B) blue", "B"),
        ("blue", "B"),
        ("It is blue.", "B"),
        ("Red car!", "A"),
        ("the red car", "A"),  # "red" is inside the longer match "red car"
        ("red", "C"),
        ("E", None),  # not an offered letter
        ("", None),
        ("None of them", None),
        ("A cat sits on a mat", None),  # the article, not option A
        ("blue or green", None),  # two options named
    ],
)
def test_extract_choice(pred, letter):
    assert extract_choice(pred, CHOICES) == letter


def test_gold_letter_accepts_letters_and_choice_text():
    assert gold_letter(CHOICES, "b") == "B"
    assert gold_letter(CHOICES, "(C)") == "C"
    assert gold_letter(CHOICES, "Blue.") == "B"
    assert gold_letter(CHOICES, "purple") is None
    assert gold_letter(CHOICES, "E") is None
    assert gold_letter(["B", "A"], "A") == "A"  # a letter wins over a choice whose text is a letter


def test_choice_correct():
    assert choice_correct("The answer is B", CHOICES, "blue")
    assert choice_correct("B", CHOICES, "B")
    assert not choice_correct("C", CHOICES, "B")
    assert not choice_correct("B", CHOICES, "purple")  # gold that is no option never matches


def test_build_choice_prompt_matches_llava_mmbench_layout():
    prompt = build_choice_prompt("What colour is the car?", ["red", "blue"])
    assert prompt == (
        "What colour is the car?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert CHOICE_SUFFIX == "Answer with the option's letter from the given choices directly."
    assert build_choice_prompt("Q?", ["x", "y", "z"], suffix=None) == "Q?\nA. x\nB. y\nC. z"
    assert build_choice_prompt("Q?", ["x", "y"], suffix="Pick one.").endswith("\nB. y\nPick one.")


def test_metric_for_follows_the_gold_form():
    assert metric_for("answer") == "exact"
    assert metric_for("answers") == "vqa"
    assert metric_for("choice") == "choice"
    assert metric_for({"answer": "x"}) == "exact"
    assert metric_for({"answers": ["x", "y"]}) == "vqa"
    assert metric_for({"choices": ["x", "y"], "answer": "A"}) == "choice"


@pytest.mark.parametrize(
    ("metric", "pred", "row", "expected"),
    [
        ("exact", "Two", {"answer": "2"}, 1.0),
        ("exact", "3", {"answer": "2"}, 0.0),
        ("vqa", "2", {"answers": ["2"] * 2 + ["3"] * 8}, 0.6),
        ("exact", "2", {"answers": ["2"] * 2 + ["3"] * 8}, 1.0),  # any human answer
        ("vqa", "Two", {"answer": "2"}, 1.0),
        ("contains", "there are 2 dogs", {"answer": "two dogs"}, 1.0),
        ("contains", "there are 2 cats", {"answers": ["dogs", "cats"]}, 1.0),
        ("choice", "B", {"choices": ["red", "blue"], "answer": "blue"}, 1.0),
        ("choice", "A", {"choices": ["red", "blue"], "answer": "blue"}, 0.0),
        ("vqa", "B", {"choices": ["red", "blue"], "answer": "B"}, 1.0),
        ("exact", "Blue.", {"choices": ["red", "blue"], "answer": "B"}, 1.0),
        ("exact", "b", {"choices": ["red", "blue"], "answer": "blue"}, 1.0),
        ("contains", "it is blue", {"choices": ["red", "blue"], "answer": "B"}, 1.0),
        ("choice", "B", {"choices": ["red", "blue"], "answer": "purple"}, 0.0),
    ],
)
def test_score(metric, pred, row, expected):
    value = score(metric, pred, row)
    assert value == pytest.approx(expected)
    assert 0.0 <= value <= 1.0


def test_score_rejects_unusable_metrics():
    with pytest.raises(UsageError, match="needs rows with choices"):
        score("choice", "x", {"answer": "x"})
    with pytest.raises(UsageError, match="unknown metric"):
        score("bleu", "x", {"answer": "x"})
