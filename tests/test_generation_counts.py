"""Both backends report what the OpenAI usage and finish_reason need, and honour stop sequences the same way:
``prompt_tokens`` (text + visual positions, every rung), ``completion_tokens``, ``finish_reason``."""

from __future__ import annotations

from pathlib import Path

import pytest

from m3cli.answering.core import Ask, answer_asks, ask_images
from m3cli.backends.torch import TorchBackend
from m3cli.matryoshka.policy import Escalate, Fixed
from m3cli.media import load_image
from m3cli.models.registry import resolve_model

EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"


@pytest.fixture(scope="module")
def torch_backend():
    return TorchBackend(resolve_model(None), device="cpu")


@pytest.fixture(scope="module")
def cpp_backend(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from m3cli.backends import open_backend
    from m3cli.convert.gguf_writer import convert_to_gguf

    lm, mmproj = convert_to_gguf(resolve_model(None), tmp_path_factory.mktemp("gguf"), "f32")
    backend = open_backend(str(lm), backend="llamacpp", mmproj=str(mmproj), device="cpu")
    yield backend
    backend.close()


def _picture(i: int = 1):
    return load_image(EXAMPLES / f"scene-{i}.png")


@pytest.mark.parametrize("which", ["torch_backend", "cpp_backend"])
def test_counts_finish_and_stop(which, request):
    backend = request.getfixturevalue(which)
    question = "describe the image"
    full, cut = answer_asks(backend, [Ask(_picture(), question, Fixed(36), 40),
                                      Ask(_picture(), question, Fixed(36), 2)])
    assert full.finish_reason == "stop" and cut.finish_reason == "length" and cut.completion_tokens == 2
    assert full.prompt_tokens == cut.prompt_tokens == len(backend.prompt_ids(question, 36))
    words = full.answer.split()
    assert len(words) >= 3 and full.completion_tokens >= 3
    stopped = answer_asks(backend, [Ask(_picture(), question, Fixed(36), 40, stop=(" " + words[2],))])[0]
    assert stopped.answer == " ".join(words[:2]) and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens  # decoding stopped there, not after


def test_escalation_counts_every_rung(torch_backend):
    policy = Escalate((1, 9, 36, 144, 576), 0.999)
    question = "what shape is in the top right?"
    result = ask_images(torch_backend, [_picture(0)], [question], [policy], 4)[0]
    rungs = [r.scale for r in result.scales_tried]
    assert len(rungs) >= 2
    assert result.prompt_tokens == sum(len(torch_backend.prompt_ids(question, s)) for s in rungs)
    assert result.to_dict()["prompt_tokens"] == result.prompt_tokens


def test_same_counts_on_both_backends(torch_backend, cpp_backend):
    asks = [Ask(_picture(i), "what colour is the background?", Fixed(s), 4) for i, s in ((0, 1), (2, 576))]
    a, b = answer_asks(torch_backend, asks), answer_asks(cpp_backend, asks)
    assert [r.prompt_tokens for r in a] == [r.prompt_tokens for r in b]
    assert [r.answer for r in a] == [r.answer for r in b]
