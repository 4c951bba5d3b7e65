"""The shared-prefix KV cache: the prompt's text before the image is prefilled once; answers do not change."""

import pytest
import torch

from m3cli.backends.base import AnswerRequest


@pytest.mark.parametrize("scale", [576, 144, 36, 9, 1])
def test_prefix_cache_gives_the_same_answers(tiny_backend, scale):
    from m3cli.data.scenes import iter_questions, render

    pairs = list(iter_questions("test", 6))
    grids = tiny_backend.encode([render(s.scene) for s, _ in pairs])
    requests = [AnswerRequest(g, scale, qa.question, 6) for g, (_, qa) in zip(grids, pairs, strict=True)]
    tiny_backend.prefix_cache = False
    try:
        full = tiny_backend.answer(requests)
        alone = [tiny_backend.answer([r])[0] for r in requests[:2]]
    finally:
        tiny_backend.prefix_cache = True
    cached = tiny_backend.answer(requests)
    assert tiny_backend._prefix_kv is not None and len(tiny_backend._prefix_kv[0]) > 0
    for a, b in zip(full, cached, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
    for a, b in zip(alone, tiny_backend.answer(requests[:2]), strict=True):  # batch 1 too (no padding)
        assert a.token_ids == b.token_ids
