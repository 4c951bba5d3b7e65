"""What each backend hands its vision tower equals the recipe's pixels, from the user's file on.

Every image kind of ``pixel_cases`` (EXIF orientations 2-8, RGBA / LA / palette transparency, 16-bit grey, CMYK
JPEG and TIFF, 3000x1100, 2049x3000 and 8000x2049) is decoded by m3's loader and encoded by each backend on the
tiny real-layout models; what reaches the tower is captured where it enters it: the torch backend's normalised
``pixel_values`` (LLaVA-1.5: ``get_image_features``; NeXT: ``encode_pixels``, every crop), the llama.cpp backend's
uint8 bitmaps handed to mtmd (``native.encode_rgb``, every crop). The reference is ``pixel_cases``: the original
code's ``Image.open(p).convert('RGB')`` and its pad / crop / anyres steps at the tiny models' 48 px geometry.

Also here: ``--prefix-after-special`` / ``--no-prefix-after-special`` for a GGUF pair from llama.cpp's own converter
that cannot record how the source tokenizer treats text after a special token.
"""

from __future__ import annotations

import numpy as np
import pixel_cases as pc
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

import gguf_setup as gs  # noqa: E402
import next_layouts as nl  # noqa: E402
import real_layouts as rl  # noqa: E402

from m3cli.media import load_image  # noqa: E402

TILE = rl.TinySpec().image_size  # 48 px: the tiny towers' input, as 336 for CLIP-L/14-336
CONFIGS = ("torch-pad", "torch-crop", "llamacpp-pad", "llamacpp-crop", "torch-next", "llamacpp-next")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> (m3's decoded image, the recipe's image) for every kind, each file decoded once."""
    root = tmp_path_factory.mktemp("images")
    paths = pc.small_cases(root / "small") | pc.large_cases(root / "large")
    return {name: (load_image(path), pc.recipe_image(path)) for name, path in paths.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory, llamacpp):
    """The tiny LLaVA-1.5 (original layout: pad; llava-hf: crop) and NeXT (original layout) models and their
    GGUF pairs (llama.cpp's converters: pad and NeXT; ``m3 convert --to gguf`` of llava-hf: crop)."""
    root = tmp_path_factory.mktemp("models")
    original = rl.build_original_llava(root / "original", seed=0)
    hf = rl.build_llava_hf(root / "llava-hf", seed=0, dtype="float32")
    next_original = nl.build_original_next(root / "next-original", seed=3, stray_buffers=False)
    return {
        "original": original.model_dir, "hf": hf, "next": next_original.model_dir,
        "cpp-pad": rl.build_llamacpp_pair(root / "cpp-pad", llamacpp, hf, original.tower_dir),
        "cpp-crop": gs.m3_pair(hf, root / "cpp-crop", "tiny-hf"),
        "cpp-next": nl.build_llamacpp_next_pair(root / "cpp-next", llamacpp, next_original),
    }


def _torch(path):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(path), device="cpu", dtype="float32", threads=2)


def _cpp(pair, **options):
    from m3cli.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(str(pair.lm), mmproj=str(pair.mmproj), threads=2, **options)


def _tower_inputs(config: str, models, monkeypatch):
    """(backend, captured): ``captured`` fills with what the backend's tower receives, per image, as uint8
    ``(crops, TILE, TILE, 3)`` (the torch backend's normalised floats are kept as they are, ``(crops, 3, H, W)``)."""
    captured: list[np.ndarray] = []
    if config.startswith("torch"):
        backend = _torch(models["original" if config == "torch-pad" else "hf" if config == "torch-crop" else "next"])
        if config == "torch-next":
            import m3cli.backends.next_features as nf

            real = nf.encode_pixels

            def spy(model, pixel_values, **kw):
                captured.append(pixel_values.detach().float().numpy().copy())
                return real(model, pixel_values, **kw)

            monkeypatch.setattr(nf, "encode_pixels", spy)
        else:
            inner = backend.model.model
            real = inner.get_image_features

            def spy(*args, pixel_values, **kw):
                captured.append(pixel_values.detach().float().numpy().copy())
                return real(*args, pixel_values=pixel_values, **kw)

            monkeypatch.setattr(inner, "get_image_features", spy)
        return backend, captured
    from m3cli.backends.llamacpp import native

    backend = _cpp(models[config.replace("llamacpp", "cpp")])
    real = native.encode_rgb
    crops: list[np.ndarray] = []

    def spy(mtmd, mctx, rgb, n_embd):
        crops.append(np.array(rgb, dtype=np.uint8, copy=True))
        return real(mtmd, mctx, rgb, n_embd)

    monkeypatch.setattr(native, "encode_rgb", spy)
    backend._spy_crops = crops
    return backend, captured


def _reference(config: str, recipe_image) -> list[np.ndarray]:
    """The recipe's uint8 crops of one image for this configuration."""
    if config.endswith("next"):  # the original NeXT config's pinpoints, read as [w, h]
        return pc.next_crops_uint8(recipe_image, nl.TINY_PINPOINTS, "wh", TILE)
    return [pc.tower_uint8(recipe_image, rl.CLIP_MEAN, TILE, pad=config.endswith("pad"))]


@pytest.mark.parametrize("config", CONFIGS)
def test_the_tower_gets_the_recipes_pixels_for_every_image_kind(config, models, images, monkeypatch):
    backend, captured = _tower_inputs(config, models, monkeypatch)
    unequal = []
    try:
        for name, (image, recipe_image) in images.items():
            want = _reference(config, recipe_image)
            captured.clear()
            if config.startswith("llamacpp"):
                backend._spy_crops.clear()
            backend.encode([image])
            if config.startswith("llamacpp"):
                got = backend._spy_crops  # the first pass hands each crop once (patch 0's pass runs lazily)
                same = len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
            else:
                got = np.concatenate(captured)
                norm = np.stack([pc.normalise(w, rl.CLIP_MEAN, rl.CLIP_STD) for w in want])
                same = got.shape == norm.shape and np.allclose(got, norm, rtol=0, atol=1e-6)  # < 1/255/std
            if not same:
                unequal.append(name)
    finally:
        if config.startswith("llamacpp"):
            backend.close()
    assert unequal == [], f"{config}: not the recipe's pixels for {unequal}"
    assert len(images) == 16


# --------------------------------------------------------------------------- GGUF: "▁" after special tokens


@pytest.fixture(scope="module")
def v5(tmp_path_factory, llamacpp):
    """A llava-hf directory whose tokenizer transformers 5 re-saved (Metaspace, ``prepend_scheme: first``: no "▁"
    after ``<image>``), llama.cpp's converter pair of it (records nothing) and ``m3 convert``'s (records it)."""
    root = tmp_path_factory.mktemp("v5")
    hf = rl.build_llava_hf(root / "llava-hf-v5", seed=1, dtype="float32", tokenizer_json="v5")
    return hf, rl.build_llamacpp_pair(root / "cpp", llamacpp, hf), gs.m3_pair(hf, root / "m3", "tiny-v5")


def test_prefix_after_special_can_be_stated_for_a_pair_that_does_not_record_it(v5):
    from m3cli.backends import open_backend
    from m3cli.gguf.keys import PREFIX_AFTER_SPECIAL_KEY
    from m3cli.gguf.reader import read_metadata

    hf, cpp_pair, m3_pair = v5
    torch_backend = _torch(hf)
    assert torch_backend.family.recipe.prefix_after_special is False
    assert PREFIX_AFTER_SPECIAL_KEY not in read_metadata(cpp_pair.lm)       # llama.cpp's converter: unknown
    assert read_metadata(m3_pair.lm)[PREFIX_AFTER_SPECIAL_KEY] is False     # m3 convert: recorded
    question = gs.QUESTIONS[0]
    want = torch_backend.prompt_ids(question, 9)
    assumed, stated = _cpp(cpp_pair), _cpp(cpp_pair, prefix_after_special=False)
    recorded = open_backend(str(m3_pair.lm), prefix_after_special=None, threads=2)
    said_yes = open_backend(str(m3_pair.lm), prefix_after_special=True, threads=2)
    try:
        assert len(assumed.prompt_ids(question, 9)) == len(want) + 1        # the default assumes a "▁" there
        assert stated.prompt_ids(question, 9) == want                      # --no-prefix-after-special
        assert recorded.prompt_ids(question, 9) == want                    # the key m3 convert wrote
        assert said_yes.prompt_ids(question, 9) == assumed.prompt_ids(question, 9)  # the flag wins over the key
    finally:
        for backend in (assumed, stated, recorded, said_yes):
            backend.close()


def test_prefix_after_special_is_a_gguf_option(tiny_model_dir, scene_png):
    from click.testing import CliRunner

    from m3cli.cli import cli

    res = CliRunner().invoke(cli, ["ask", str(scene_png), "-m", str(tiny_model_dir), "--no-prefix-after-special"])
    assert res.exit_code == 2 and "--prefix-after-special apply to GGUF models" in res.stderr
    for command in ("ask", "batch", "eval"):
        res = CliRunner().invoke(cli, [command, "--help"])
        assert "--prefix-after-special / --no-prefix-after-special" in res.output, command
