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


# People's wording and people's pictures: no answer runs on to the token cap, at any scale.
ONE_WORD = ["What color is the background?", "what colour is the background", "Name the background colour.",
            "How many shapes are there?", "count the shapes", "Is there a red shape?",
            "Which shape is in the top-left corner?", "What's the colour of the disc?", "What letter is written?"]
OPEN = ["What is this?", "Describe the picture."]
CAP = 8


def _disc_on_blue():
    """A person's first try: a red disc on a blue 336 px canvas (not a 48 px scene)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (336, 336), (35, 85, 245))
    ImageDraw.Draw(image).ellipse((100, 100, 236, 236), fill=(220, 20, 20))
    return image


@pytest.mark.parametrize("image", ["disc", "scene-0"])
def test_answers_end_at_every_scale_however_asked(shipped, image):
    from m3cli.backends.base import AnswerRequest

    encoded = shipped.encode([_disc_on_blue() if image == "disc" else _image(0)])[0]
    scales = shipped.scales
    asked = [(q, s, CAP) for q in ONE_WORD for s in scales] + [(q, s, 16) for q in OPEN for s in scales]
    generations = shipped.answer([AnswerRequest(encoded, s, q, n) for q, s, n in asked])
    for (question, scale, cap), gen in zip(asked, generations, strict=True):
        where = f"{question!r} at {scale} tokens: {gen.text!r}"
        assert len(gen.token_ids) < cap, "ran to the cap: " + where
        words = gen.text.split()
        if cap == CAP:
            assert len(words) == 1, where
        else:  # a description: the background first, no word said twice in a row
            assert words[1:2] == ["background"], where
            assert all(a != b for a, b in zip(words, words[1:], strict=False)), where
