"""The shipped default model: loads offline and keeps answering what it answered when it shipped.

Regression guards, not accuracy claims (those live in docs/models.md).
"""

from pathlib import Path

import pytest
from click.testing import CliRunner

from m3cli.answering.core import ask_images
from m3cli.backends.torch import TorchBackend
from m3cli.cli import cli
from m3cli.matryoshka.policy import DEFAULT_THRESHOLD, Escalate, Fixed
from m3cli.media import load_image
from m3cli.models.registry import resolve_model

EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"
BACKGROUNDS = {0: "brown", 1: "gray", 2: "white", 3: "brown"}


@pytest.fixture(scope="module")
def shipped():
    return TorchBackend(resolve_model(None), device="cpu")


def _image(i):
    return load_image(EXAMPLES / f"scene-{i}.png")


def test_default_model_resolves_to_the_shipped_one(shipped):
    assert Path(shipped.model_id).name == "m3-shapes"
    assert shipped.grid_side == 24 and shipped.scales == [576, 144, 36, 9, 1]


def test_coarse_questions_right_at_one_token(shipped):
    images = [_image(i) for i in BACKGROUNDS]
    results = ask_images(shipped, images, ["what colour is the background?"] * 4, [Fixed(1)] * 4, max_new_tokens=4)
    assert [r.answer for r in results] == list(BACKGROUNDS.values())


def test_fine_question_right_at_576(shipped):
    res = ask_images(shipped, [_image(2)], ["how many shapes are there?"], [Fixed(576)], max_new_tokens=4)[0]
    assert res.answer == "six"


def test_auto_scale_coarse_stops_fine_escalates(shipped):
    policy = Escalate((1, 9, 36, 144, 576), DEFAULT_THRESHOLD)
    coarse, fine = ask_images(shipped, [_image(0), _image(0)],
                              ["what colour is the background?", "what shape is in the top right?"],
                              [policy, policy], max_new_tokens=4)
    assert coarse.tokens == 1 and len(coarse.scales_tried) == 1 and coarse.answer == "brown"
    assert fine.tokens > 1 and len(fine.scales_tried) >= 2
    assert fine.answer == "square"  # scene-0 has a yellow square top right; unsure at 1 token, it climbs


def test_readme_first_command():
    res = CliRunner().invoke(cli, ["ask", str(EXAMPLES / "scene-0.png"), "what colour is the background?",
                                   "--tokens", "1"])
    assert res.exit_code == 0 and res.stdout.strip() == "brown"
