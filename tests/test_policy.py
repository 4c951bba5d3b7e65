import math

import pytest

from m3cli.answering.core import Query, answer_queries, ask_images
from m3cli.backends.base import Encoded, Generation
from m3cli.matryoshka.confidence import (
    confidence,
    expected_calibration_error,
    first_token_prob,
    min_token_prob,
    sequence_prob,
)
from m3cli.matryoshka.policy import Escalate, Fixed, Policy, Rung, make_ladder, oracle_scale


def test_fixed_never_escalates():
    p = Fixed(36)
    assert p.first() == 36
    assert p.next([Rung(36, "x", 0.0)]) is None


def test_escalate_stops_at_first_confident_rung():
    p = Escalate((1, 9, 36, 144, 576), threshold=0.8)
    assert p.first() == 1
    assert p.next([Rung(1, "a", 0.5)]) == 9
    assert p.next([Rung(1, "a", 0.5), Rung(9, "b", 0.85)]) is None
    assert p.next([Rung(576, "z", 0.1)]) is None  # top of the ladder


def test_ladder_validation_and_cap():
    assert make_ladder(24) == (1, 9, 36, 144, 576)
    assert make_ladder(24, [9, 36, 576]) == (9, 36, 576)
    assert make_ladder(24, None, cap=100) == (1, 9, 36)
    assert make_ladder(24, [36, 144], cap=9) == (9,)  # the budget always wins
    with pytest.raises(ValueError):
        make_ladder(24, [10, 36])
    with pytest.raises(ValueError):
        Escalate((36, 9))
    with pytest.raises(ValueError):
        Escalate((1, 9), threshold=1.5)


def test_fixed_and_escalate_are_policies():
    assert isinstance(Fixed(36), Policy) and isinstance(Escalate(), Policy)
    assert not isinstance(Rung(1, "a", 0.5), Policy)


def test_oracle():
    assert oracle_scale({1: False, 9: True, 36: True}) == 9
    assert oracle_scale({1: False, 9: False}) is None


def test_confidence_measures():
    lps = [math.log(0.9), math.log(0.5)]
    assert sequence_prob(lps) == pytest.approx(0.45)
    assert min_token_prob(lps) == pytest.approx(0.5)
    assert first_token_prob(lps) == pytest.approx(0.9)
    assert confidence([], "sequence") == 0.0
    with pytest.raises(ValueError):
        confidence(lps, "nope")


def test_ece():
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9], [False, False]) == pytest.approx(0.9)
    assert expected_calibration_error([0.25, 0.75], [False, True], bins=2) == pytest.approx(0.25)


class ScriptedBackend:
    """A backend whose confidence per scale is scripted, to test the escalation loop alone."""

    name, model_id, grid_side, scales = "scripted", "scripted", 24, [576, 144, 36, 9, 1]

    def __init__(self, script):
        self.script = script  # question -> {scale: probability of the answer}
        self.encodes = 0
        self.calls = []

    def encode(self, images):
        self.encodes += len(images)
        return [Encoded(grid=None, side=24, encode_ms=1.0) for _ in images]

    def answer(self, requests):
        self.calls.append([(r.question, r.scale) for r in requests])
        return [Generation(f"{r.question}@{r.scale}", [1], [math.log(self.script[r.question][r.scale])], 2.0, 3.0)
                for r in requests]

    def close(self):
        pass


def test_escalation_records_every_rung_and_batches_by_rung():
    script = {
        "easy": {1: 0.95, 9: 0.99, 36: 0.99, 144: 0.99, 576: 0.99},
        "mid": {1: 0.3, 9: 0.6, 36: 0.9, 144: 0.99, 576: 0.99},
        "hard": {1: 0.1, 9: 0.1, 36: 0.1, 144: 0.1, 576: 0.2},
    }
    backend = ScriptedBackend(script)
    policy = Escalate((1, 9, 36, 144, 576), 0.8)
    results = ask_images(backend, [None] * 3, list(script), [policy] * 3)
    assert backend.encodes == 3  # once per image, whatever the number of rungs
    easy, mid, hard = results
    assert [r.scale for r in easy.scales_tried] == [1] and easy.tokens == 1
    assert [r.scale for r in mid.scales_tried] == [1, 9, 36] and mid.tokens == 36
    assert mid.answer == "mid@36" and mid.confidence == pytest.approx(0.9)
    assert [r.scale for r in hard.scales_tried] == [1, 9, 36, 144, 576] and hard.tokens == 576
    # every rung's call carried all the queries on it
    assert backend.calls[0] == [("easy", 1), ("mid", 1), ("hard", 1)]
    assert backend.calls[1] == [("mid", 9), ("hard", 9)]
    assert mid.timings["prefill_ms"] == pytest.approx(6.0) and mid.timings["encode_ms"] == pytest.approx(1.0)


def test_cap_is_never_exceeded():
    backend = ScriptedBackend({"q": {s: 0.01 for s in (1, 9, 36, 144, 576)}})
    res = answer_queries(backend, [Query(Encoded(None, 24, 1.0), "q", Escalate(make_ladder(24, cap=40), 0.9))])[0]
    assert [r.scale for r in res.scales_tried] == [1, 9, 36]
    assert res.tokens == 36


def test_real_model_encodes_once_during_escalation(tiny_backend):
    """With a real (tiny) LLaVA the vision tower runs once per image even when every rung is tried."""
    from PIL import Image

    calls = []
    tower = tiny_backend.model.model.vision_tower
    handle = tower.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0] if inp else 1))
    try:
        images = [Image.new("RGB", (48, 48), (i * 40, 10, 10)) for i in range(3)]
        results = ask_images(tiny_backend, images, ["what colour is the background?"] * 3,
                             [Escalate((1, 9, 36, 144, 576), threshold=1.0)] * 3, max_new_tokens=2)
    finally:
        handle.remove()
    assert all(len(r.scales_tried) == 5 for r in results)  # threshold 1.0: every rung tried
    assert sum(calls) == 3  # one tower pass over the three images
