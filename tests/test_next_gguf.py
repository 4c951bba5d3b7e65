"""The llama.cpp backend on LLaVA-1.6 (NeXT) GGUF pairs made by llama.cpp's own 1.6 instructions.

The pair comes from a tiny original-layout NeXT checkpoint (``next_layouts.build_original_next``) through
``llava_surgery_v2.py``, the legacy ``convert_image_encoder_to_gguf.py`` (pinpoints, ``spatial_unpad``,
``model.image_newline``) and ``convert_legacy_llama.py`` (``next_layouts.build_llamacpp_next_pair``). The torch
backend on the same checkpoint is the reference: the same crops, per-crop M3 pooling, packing with the newline,
prompt and greedy answers at every scale, for 1x2, 2x1 and 2x2 tile layouts and a square image (a pinpoint tie).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

import gguf_setup as gs  # noqa: E402
import next_layouts as nl  # noqa: E402

from m3cli.backends.base import AnswerRequest  # noqa: E402

# (width, height): 2x1 tiles (wide), 1x2 (tall), 2x2, 1x3 and 3x1, and a square image whose two 3-crop layouts tie
SIZES = [(100, 40), (40, 100), (90, 90), (60, 150), (150, 60), (48, 48)]
QUESTIONS = gs.QUESTIONS[:3]
MAX_NEW = 5


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return nl.build_original_next(tmp_path_factory.mktemp("next-original"), seed=3, stray_buffers=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, llamacpp, original):
    return nl.build_llamacpp_next_pair(tmp_path_factory.mktemp("next-gguf"), llamacpp, original)


@pytest.fixture(scope="module")
def cpp(pair):
    from m3cli.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(pair.lm), threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_next(original):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(original.model_dir), device="cpu", dtype="float32", threads=2)


def test_pair_is_what_llamacpp_writes_for_llava_16(pair):
    import gguf

    reader = gguf.GGUFReader(str(pair.mmproj))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF")}
    assert fields["clip.vision.image_grid_pinpoints"] == [v for p in nl.TINY_PINPOINTS for v in p]
    assert fields["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert "model.image_newline" in {t.name for t in reader.tensors}
    assert "clip.vision.feature_layer" not in fields      # legacy: L-1 blocks, natural positions


def test_family_from_the_gguf_pair_is_the_original_recipe(cpp, torch_next):
    assert (cpp.spec.family, cpp.spec.preprocess, cpp.spec.anyres_flavour) == ("llavanext", "anyres", "original")
    # llama.cpp reads the flat pinpoints as (width, height), as the original code reads the config's pairs
    assert cpp.spec.grid_pinpoints == torch_next.spec.grid_pinpoints
    assert cpp.recipe.name == torch_next.family.recipe.name == "vicuna_v1"
    assert cpp.n_ctx == 4096
    for w, h in SIZES:
        assert cpp.family.layout((h, w)) == torch_next.family.layout((h, w))


def test_crops_and_visual_tokens_equal_the_torch_backend(cpp, torch_next):
    images = [gs.scene(w, h, i) for i, (w, h) in enumerate(SIZES)]
    for image, ec, et in zip(images, cpp.encode(images), torch_next.encode(images), strict=True):
        assert (ec.crops, ec.image_hw) == (et.crops, et.image_hw) == (ec.grid.shape[0], (image.height, image.width))
        for scale in cpp.scales:
            assert cpp.visual_token_count(scale, ec.image_hw) == torch_next.visual_token_count(scale, et.image_hw)
            assert cpp._visual(ec, scale).shape[0] == cpp.visual_token_count(scale, ec.image_hw)


def test_two_by_two_token_counts_follow_the_formula(cpp):
    enc = cpp.encode([gs.scene(90, 90, 0)])[0]
    assert enc.crops == 5
    got = {s: cpp.answer([AnswerRequest(enc, s, QUESTIONS[0], 1)])[0].visual_tokens for s in cpp.scales}
    assert got == {576: 2928, 144: 744, 36: 192, 9: 51, 1: 7}


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_answers_equal_the_torch_backend_at_every_scale(cpp, torch_next, size):
    image = gs.scene(*size, seed=sum(size))
    enc_c, enc_t = cpp.encode([image])[0], torch_next.encode([image])[0]
    assert cpp.scales == torch_next.scales == [576, 144, 36, 9, 1]
    for scale in cpp.scales:
        got = cpp.answer([AnswerRequest(enc_c, scale, q, MAX_NEW) for q in QUESTIONS])
        want = torch_next.answer([AnswerRequest(enc_t, scale, q, MAX_NEW) for q in QUESTIONS])
        for q, a, b in zip(QUESTIONS, got, want, strict=True):
            assert a.visual_tokens == b.visual_tokens
            assert a.token_ids and gs.same_up_to_near_tie(a, b), (scale, q, a.token_ids, b.token_ids)


def test_newline_is_the_checkpoints_and_steers_the_answer(cpp, original):
    import reference_llava15 as ref

    want = ref.read_checkpoint(original.model_dir)["model.image_newline"].float().numpy()
    assert np.allclose(cpp.newline, want, atol=1e-2)   # F32 in the mmproj, bf16 in the shards
    enc = cpp.encode([gs.scene(90, 90, 1)])[0]
    base = [g.logprobs for g in cpp.answer([AnswerRequest(enc, 36, q, MAX_NEW) for q in QUESTIONS])]
    saved = cpp.newline
    try:
        cpp.newline = np.zeros_like(saved)
        zeroed = [g.logprobs for g in cpp.answer([AnswerRequest(enc, 36, q, MAX_NEW) for q in QUESTIONS])]
    finally:
        cpp.newline = saved
    assert base != zeroed


def test_corrected_mmproj_copy_moves_the_anyres_keys_and_loads_directly(cpp, pair, tmp_path):
    import gguf

    from m3cli.backends.llamacpp import LlamaCppBackend

    reader = gguf.GGUFReader(str(cpp.loaded_mmproj_path))
    keys = set(reader.fields)
    assert "clip.vision.image_grid_pinpoints" not in keys and "clip.vision.mm_patch_merge_type" not in keys
    assert {"m3cli.anyres.image_grid_pinpoints", "m3cli.anyres.mm_patch_merge_type"} <= keys
    assert "model.image_newline" in {t.name for t in reader.tensors}
    again = LlamaCppBackend(str(pair.lm), mmproj=str(cpp.loaded_mmproj_path), threads=2)
    try:
        assert again.spec.grid_pinpoints == cpp.spec.grid_pinpoints and again.next
        image = gs.scene(100, 40, 7)
        a = cpp.answer([AnswerRequest(cpp.encode([image])[0], 9, QUESTIONS[0], MAX_NEW)])[0]
        b = again.answer([AnswerRequest(again.encode([image])[0], 9, QUESTIONS[0], MAX_NEW)])[0]
        assert a.token_ids == b.token_ids and a.visual_tokens == b.visual_tokens
    finally:
        again.close()


def test_mmproj_without_newline_is_refused_in_one_line(pair, tmp_path):
    from m3cli.backends.base import ModelLoadError
    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.gguf.mmproj import _read_all
    from m3cli.gguf.writer import write_gguf

    kv, tensors = _read_all(pair.mmproj)
    del tensors["model.image_newline"]
    broken = tmp_path / "mmproj-no-newline.gguf"
    write_gguf(broken, "clip", [(k, v, t, s) for k, v, t, s in kv if k != "general.architecture"],
               [(n, a.astype(np.float16) if a.ndim >= 2 else a, None) for n, a in tensors.items()])
    with pytest.raises(ModelLoadError, match="without model.image_newline") as info:
        LlamaCppBackend(str(pair.lm), mmproj=str(broken), threads=2)
    assert "\n" not in str(info.value)


def test_cli_ask_reports_tokens_visual_tokens_and_crops(pair, cpp, tmp_path):
    from click.testing import CliRunner

    from m3cli.cli import cli

    image = gs.scene(100, 40, 11)
    path = tmp_path / "wide.png"
    image.save(path)
    res = CliRunner().invoke(cli, ["ask", str(path), "What is this?", "--model", str(pair.lm), "--tokens", "9",
                                    "--json", "--threads", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    enc = cpp.encode([image])[0]
    want = cpp.answer([AnswerRequest(enc, 9, "What is this?", 16)])[0]
    assert (row["tokens"], row["crops"], row["visual_tokens"]) == (9, enc.crops, want.visual_tokens)
    assert enc.crops == 4                                       # 1x3 tiles + base
    assert row["answer"] == want.text


def test_cli_max_visual_tokens_picks_the_largest_scale_that_fits(pair, tmp_path):
    from click.testing import CliRunner

    from m3cli.cli import cli

    path = tmp_path / "square.png"
    gs.scene(90, 90, 5).save(path)
    res = CliRunner().invoke(cli, ["ask", str(path), "What is this?", "--model", str(pair.lm),
                                    "--max-visual-tokens", "200", "--json", "--threads", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert (row["tokens"], row["visual_tokens"], row["crops"]) == (36, 192, 5)
