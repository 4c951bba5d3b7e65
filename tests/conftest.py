"""Shared fixtures: a tiny random LLaVA built from configs and loaded through the real code."""

from __future__ import annotations

import pytest

from m3cli.models.build import ModelSpec, make_tiny_model

TINY_WORDS = (
    "what colour is the background red green blue yellow how many shapes are there one two three "
    "circle square yes no letter written"
).split()

TINY_SPEC = ModelSpec(
    vision_hidden=32, vision_layers=2, vision_heads=2,
    text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=2, text_intermediate=128,
    init_std=0.3,
)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache (corrected mmproj copies go here instead)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("M3_CACHE_DIR", str(tmp_path_factory.mktemp("m3-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random LLaVA with a 24x24 grid (48x48 images, patch 2)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llava"), TINY_WORDS, TINY_SPEC, seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(tiny_model_dir), device="cpu")


@pytest.fixture
def scene_png(tmp_path):
    """A small RGB PNG with some structure."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48, 48), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 20, 20), fill=(220, 30, 30))
    draw.rectangle((28, 26, 42, 40), fill=(30, 40, 220))
    path = tmp_path / "scene.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def llamacpp(tmp_path_factory):
    """llama.cpp's converter scripts (from the llama-cpp-python sdist the README's test command fetches); the
    real-layout GGUF tests fail, saying how to get them, when they are missing."""
    import gguf_setup as gs

    try:
        return gs.require_llamacpp(tmp_path_factory.mktemp("llamacpp-src"))
    except gs.LlamaCppSourcesMissing as exc:
        pytest.fail(str(exc), pytrace=False)
