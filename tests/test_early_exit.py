"""The exact early exit inside a rung: same final answers and rungs as the full decode, fewer decode steps."""

import pytest

from m3cli.answering.core import Query, answer_queries, stop_below
from m3cli.matryoshka.policy import Escalate, Fixed


class CountingBackend:
    """The backend, counting the tokens its answers decoded."""

    def __init__(self, backend):
        self.backend = backend
        self.tokens = 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def answer(self, requests):
        gens = self.backend.answer(requests)
        self.tokens += sum(len(g.token_ids) for g in gens)
        return gens


@pytest.fixture(scope="module")
def encoded_items(tiny_backend):
    from m3cli.data.scenes import iter_questions, render

    pairs = list(iter_questions("test", 32))
    grids = tiny_backend.encode([render(s.scene) for s, _ in pairs])
    return [(g, qa.question) for g, (_, qa) in zip(grids, pairs, strict=True)]


def test_stop_below_only_where_it_is_exact():
    ladder = Escalate((1, 9, 36, 144, 576), 0.4)
    assert stop_below(ladder, 9, "sequence") == 0.4 and stop_below(ladder, 1, "min") == 0.4
    assert stop_below(ladder, 576, "sequence") is None  # the last rung answers in full
    assert stop_below(ladder, 9, "mean") is None  # a mean can rise again
    assert stop_below(Fixed(9), 9, "sequence") is None


@pytest.mark.parametrize("measure", ["sequence", "min", "first"])
def test_early_exit_equals_the_full_decode(tiny_backend, encoded_items, measure):
    saved = 0
    for threshold in (0.05, 0.3):
        def run(early, threshold=threshold):
            counter = CountingBackend(tiny_backend)
            queries = [Query(g, q, Escalate((1, 9, 36, 144, 576), threshold), 8) for g, q in encoded_items]
            return answer_queries(counter, queries, measure, early_exit=early), counter.tokens

        full, full_tokens = run(False)
        fast, fast_tokens = run(True)
        for a, b in zip(full, fast, strict=True):
            assert (a.answer, a.confidence, a.tokens) == (b.answer, b.confidence, b.tokens)
            assert [r.scale for r in a.scales_tried] == [r.scale for r in b.scales_tried]
            assert not b.scales_tried[-1].stopped_early
            for ra, rb in zip(a.scales_tried[:-1], b.scales_tried[:-1], strict=True):
                if rb.answer:  # (an empty partial answer scores 0 and escalates by the empty-answer rule)
                    assert rb.confidence >= ra.confidence  # a prefix is at least as confident as the whole
        assert fast_tokens <= full_tokens
        saved += full_tokens - fast_tokens
    assert saved > 0
