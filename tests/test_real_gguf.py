"""The llama.cpp backend on real-layout GGUF pairs: the ones llama.cpp's own converters make (LM from
``convert_hf_to_gguf.py``, legacy mmproj) and the ones ``m3 convert --to gguf`` makes, for SentencePiece and
byte-level BPE vocabularies. Prompt ids equal the torch backend's and the independent reference's; answers equal
the torch backend's at every scale on a non-square image; preprocessing equals the torch backend's pixel for
pixel. The tiny models and pairs come from ``gguf_setup`` (llama.cpp's converters from its sdist: see
``real_layouts.find_llamacpp``; without it these tests fail and say how to get it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

import gguf_setup as gs  # noqa: E402
import real_layouts as rl  # noqa: E402
import reference_llava15 as ref  # noqa: E402

from m3cli.backends.base import AnswerRequest  # noqa: E402

QUESTIONS = gs.QUESTIONS[:3]
MAX_NEW = 5


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return gs.build_dirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, llamacpp, dirs):
    """(llama.cpp's pair with the llava-hf template, the same without a template)."""
    return gs.llamacpp_pairs(tmp_path_factory.mktemp("gguf"), llamacpp, dirs)


def _torch(path):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(path), device="cpu", dtype="float32", threads=2)


@pytest.fixture(scope="module")
def torch_hf(dirs):
    return _torch(dirs.hf)


@pytest.fixture(scope="module")
def torch_original(dirs):
    return _torch(dirs.original.model_dir)


@pytest.fixture(scope="module")
def torch_bpe(dirs):
    return _torch(dirs.bpe)


def _cpp(pair, **options):
    from m3cli.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(str(pair.lm), mmproj=str(pair.mmproj), threads=2, **options)


@pytest.fixture(scope="module")
def cpp_template(pairs):
    backend = _cpp(pairs[0])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cpp_no_template(pairs):
    backend = _cpp(pairs[1])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def m3_spm(tmp_path_factory, dirs):
    return gs.m3_pair(dirs.hf, tmp_path_factory.mktemp("m3-spm"), "llava-tiny-hf")


@pytest.fixture(scope="module")
def m3_bpe(tmp_path_factory, dirs):
    return gs.m3_pair(dirs.bpe, tmp_path_factory.mktemp("m3-bpe"), "llava-tiny-bpe")


@pytest.fixture(scope="module")
def processors(dirs):
    from transformers import AutoProcessor

    return {"hf": AutoProcessor.from_pretrained(dirs.hf), "bpe": AutoProcessor.from_pretrained(dirs.bpe)}


# --------------------------------------------------------------------------- helpers
def processor_ids(processor, question: str, n: int) -> list[int]:
    """The llava-hf recipe's ids (its processor, its chat template) with the placeholder run cut to ``n``."""
    ids = ref.hf_inputs(processor, gs.scene(48, 48, 0), question)["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    first, count = ids.index(image_id), ids.count(image_id)
    return ids[:first] + [image_id] * n + ids[first + count:]


def original_ids(dirs, question: str, n: int, image_id: int) -> list[int]:
    return ref.reference_prompt_ids(dirs.original.model_dir / "tokenizer.model", question, n, image_id)


def assert_same_answers(cpp, torch_backend, image, questions=QUESTIONS):
    """Greedy answers at every scale equal the torch backend's (up to a near-tie, see gguf_setup)."""
    enc_c, enc_t = cpp.encode([image])[0], torch_backend.encode([image])[0]
    assert cpp.scales == torch_backend.scales == [576, 144, 36, 9, 1]
    for scale in cpp.scales:
        got = cpp.answer([AnswerRequest(enc_c, scale, q, MAX_NEW) for q in questions])
        want = torch_backend.answer([AnswerRequest(enc_t, scale, q, MAX_NEW) for q in questions])
        for q, a, b in zip(questions, got, want, strict=True):
            assert a.token_ids and gs.same_up_to_near_tie(a, b), (scale, q, a.token_ids, b.token_ids,
                                                                  a.logprobs, b.logprobs)


def gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# --------------------------------------------------------------------------- llama.cpp's own pairs
def test_generation_template_pair(cpp_template, torch_hf, processors, pairs):
    """The official llava-hf template ({% generation %} tags) copied by llama.cpp's converter just works."""
    assert "{% generation %}" in gguf_fields(pairs[0].lm)["tokenizer.chat_template"]
    cpp = cpp_template
    assert (cpp.spec.name, cpp.recipe.name, cpp.spec.preprocess, cpp.notice) == \
        ("llava15-gguf", "hf_template", "pad", None)
    assert cpp.loaded_mmproj_path != pairs[0].mmproj            # the legacy mmproj was fixed into the cache
    for q in gs.QUESTIONS:
        for n in (576, 9):
            assert cpp.prompt_ids(q, n) == processor_ids(processors["hf"], q, n), q
            assert cpp.prompt_ids(q, n) == torch_hf.prompt_ids(q, n), q
    # square: pad and crop see the same pixels, so the llava-hf directory is the same model
    assert_same_answers(cpp, torch_hf, gs.scene(96, 96, 3))


def test_no_template_falls_back_with_a_notice(pairs, dirs, torch_original, caplog):
    """A GGUF without a chat template gets LLaVA-1.5's vicuna_v1 (one line on stderr) and pads: exactly the
    original checkpoint's recipe, so it answers as the torch backend does on that checkpoint."""
    assert "tokenizer.chat_template" not in gguf_fields(pairs[1].lm)
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        cpp = _cpp(pairs[1])
    try:
        notices = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
        assert len(notices) == 1 and "\n" not in notices[0], notices
        assert "vicuna_v1" in notices[0] and "--chat-template" in notices[0]
        assert cpp.notice == notices[0]
        assert (cpp.recipe.name, cpp.spec.preprocess) == ("vicuna_v1", "pad")
        image_id = cpp.image_token_id
        for q in gs.QUESTIONS:
            assert cpp.prompt_ids(q, 576) == original_ids(dirs, q, 576, image_id), q
            assert cpp.prompt_ids(q, 576) == torch_original.prompt_ids(q, 576), q
        assert_same_answers(cpp, torch_original, gs.wide_image())
    finally:
        cpp.close()


def test_chat_template_override(pairs, dirs, torch_original, processors, tmp_path):
    """--chat-template NAME and FILE override what the GGUF says (or lacks)."""
    cpp = _cpp(pairs[0], chat_template="vicuna_v1")
    try:
        assert (cpp.recipe.name, cpp.notice) == ("vicuna_v1", None)
        for q in QUESTIONS:
            assert cpp.prompt_ids(q, 36) == original_ids(dirs, q, 36, cpp.image_token_id)
            assert cpp.prompt_ids(q, 36) == torch_original.prompt_ids(q, 36)
        # the llava-hf weights are the original's: with its recipe they answer as the original on a wide image
        assert_same_answers(cpp, torch_original, gs.wide_image(), QUESTIONS[:2])
    finally:
        cpp.close()
    template = tmp_path / "llava.jinja"
    template.write_text(rl.LLAVA15_HF_CHAT_TEMPLATE, encoding="utf-8")
    cpp = _cpp(pairs[1], chat_template=str(template))
    try:
        assert (cpp.recipe.name, cpp.notice) == ("hf_template", None)
        assert cpp.prompt_ids(QUESTIONS[0], 9) == processor_ids(processors["hf"], QUESTIONS[0], 9)
    finally:
        cpp.close()


def test_bad_chat_template_is_one_line_before_loading(pairs, tmp_path):
    from m3cli.errors import M3Error

    bad = tmp_path / "broken.jinja"
    bad.write_text("{% for x in %}", encoding="utf-8")
    for value, needle in ((str(tmp_path / "missing.jinja"), "neither a recipe"), (str(bad), "not valid jinja")):
        with pytest.raises(M3Error) as exc:
            _cpp(pairs[0], chat_template=value)
        assert needle in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- m3 convert --to gguf
def test_m3_convert_spm_vocabulary(m3_spm, pairs, dirs):
    """The SentencePiece vocabulary as llama.cpp's `llama` model: the same tokens and scores llama.cpp's own
    converter writes, and the family's recipe keys."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(dirs.original.model_dir / "tokenizer.model"))
    ours, theirs = gguf_fields(m3_spm.lm), gguf_fields(pairs[0].lm)
    n = sp.vocab_size()
    assert ours["tokenizer.ggml.model"] == "llama" and ours["tokenizer.ggml.add_space_prefix"] is True
    assert ours["tokenizer.ggml.tokens"] == theirs["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert np.allclose(ours["tokenizer.ggml.scores"][3:n], theirs["tokenizer.ggml.scores"][3:n])
    assert ours["tokenizer.ggml.token_type"][3:] == theirs["tokenizer.ggml.token_type"][3:]
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == rl.LLAVA15_HF_CHAT_TEMPLATE
    assert (ours["m3cli.prompt_recipe"], ours["m3cli.image_aspect_ratio"], ours["m3cli.prefix_after_special"]) == \
        ("hf_template", "crop", True)


def test_m3_convert_spm_pair(m3_spm, torch_hf, processors):
    from m3cli.backends.llamacpp import LlamaCppBackend

    cpp = LlamaCppBackend(str(m3_spm.lm), threads=2)
    try:
        assert (cpp.recipe.name, cpp.spec.preprocess) == ("hf_template", "crop")
        for q in gs.QUESTIONS:
            assert cpp.prompt_ids(q, 144) == processor_ids(processors["hf"], q, 144), q
            assert cpp.prompt_ids(q, 144) == torch_hf.prompt_ids(q, 144), q
        assert_same_answers(cpp, torch_hf, gs.wide_image())
    finally:
        cpp.close()


def test_m3_convert_spm_from_tokenizer_json(dirs, tmp_path):
    """A Llama tokenizer.json without tokenizer.model converts too: llama.cpp then tokenises as transformers."""
    import shutil

    from transformers import AutoTokenizer

    from m3cli.families import HFTokenizerAdapter, PieceEncoder

    src = tmp_path / "no-spm-model"
    shutil.copytree(dirs.hf, src)
    (src / "tokenizer.model").unlink()
    pair = gs.m3_pair(src, tmp_path / "gguf", "json-only")
    assert gguf_fields(pair.lm)["tokenizer.ggml.model"] == "llama"
    cpp = _vocab_adapter(pair.lm)
    hf = PieceEncoder(HFTokenizerAdapter(AutoTokenizer.from_pretrained(dirs.hf)))
    texts = gs.QUESTIONS + rl._bpe_corpus()[:80] + ["  two  spaces", "naïve café 日本", "1234567"]
    for text in texts:
        assert PieceEncoder(cpp).plain(text) == hf.plain(text), text


def _vocab_adapter(path):
    import llama_cpp

    from m3cli.backends.llamacpp import native
    from m3cli.backends.llamacpp.tokenizer import LlamaCppAdapter
    from m3cli.gguf.reader import read_metadata

    llama, mtmd = native.libs()
    native.backend_init(llama)
    native.set_logging(llama, mtmd, False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    adapter = LlamaCppAdapter(llama, llama_cpp.llama_model_get_vocab(model), read_metadata(path))
    adapter._model = model    # keep the vocabulary alive with the adapter
    return adapter


def test_m3_convert_bpe_pair(m3_bpe, torch_bpe, processors):
    from m3cli.backends.llamacpp import LlamaCppBackend

    fields = gguf_fields(m3_bpe.lm)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert "tokenizer.ggml.bos_token_id" not in fields and fields["tokenizer.ggml.add_bos_token"] is False
    cpp = LlamaCppBackend(str(m3_bpe.lm), threads=2)
    try:
        assert (cpp.recipe.name, cpp.spec.preprocess, cpp.tokenizer.bos_id) == ("hf_template", "crop", None)
        for q in gs.QUESTIONS:
            assert cpp.prompt_ids(q, 36) == processor_ids(processors["bpe"], q, 36), q
            assert cpp.prompt_ids(q, 36) == torch_bpe.prompt_ids(q, 36), q
        assert_same_answers(cpp, torch_bpe, gs.wide_image())
    finally:
        cpp.close()


def test_m3_convert_of_an_original_checkpoint(torch_original, dirs, tmp_path):
    """The original checkpoint's conversion keeps vicuna_v1 and pad in its GGUF."""
    from m3cli.backends.llamacpp import LlamaCppBackend

    pair = gs.m3_pair(torch_original.model_dir, tmp_path, "original")
    fields = gguf_fields(pair.lm)
    assert (fields["m3cli.prompt_recipe"], fields["m3cli.image_aspect_ratio"]) == ("vicuna_v1", "pad")
    cpp = LlamaCppBackend(str(pair.lm), threads=2)
    try:
        assert (cpp.recipe.name, cpp.spec.preprocess, cpp.notice) == ("vicuna_v1", "pad", None)
        for q in QUESTIONS:
            assert cpp.prompt_ids(q, 9) == original_ids(dirs, q, 9, cpp.image_token_id)
        assert_same_answers(cpp, torch_original, gs.wide_image(), QUESTIONS[:2])
    finally:
        cpp.close()


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_pixels_equal_over_aspect_ratios(cpp_no_template, m3_spm, torch_original, torch_hf):
    """The bitmap handed to mtmd is the torch backend's tower image, pixel for pixel, padded or cropped."""
    import torch

    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.families import pixel_array

    crop = LlamaCppBackend(str(m3_spm.lm), threads=2)
    try:
        for i, (w, h) in enumerate(gs.aspect_sizes(40, seed=2)):
            image = gs.scene(w, h, seed=100 + i)
            for cpp, tb, pad in ((cpp_no_template, torch_original, True), (crop, torch_hf, False)):
                arr = cpp.preprocess(image)
                assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8
                assert np.array_equal(arr, np.asarray(tb.family.crops(image)[0])), (w, h, pad)
                pixels = tb.pixel_values([image])[0].to(torch.float32).numpy()
                assert np.array_equal(pixel_array(_pil(arr), cpp.spec.image), pixels), (w, h, pad)
                want = ref.reference_pixels(image, rl.CLIP_MEAN, rl.CLIP_STD, 48, pad=pad)
                assert np.abs(pixel_array(_pil(arr), cpp.spec.image) - want).max() < 1e-5, (w, h, pad)
    finally:
        crop.close()


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr)


def test_resize_truncates_like_clip(m3_spm):
    """300x480 -> 48x76 before the crop (CLIP's int(), not round(): 76.8 -> 76), like the torch backend."""
    from PIL import Image

    from m3cli.backends.llamacpp import LlamaCppBackend

    grad = np.tile(np.linspace(0, 255, 480, dtype=np.float32)[:, None], (1, 300)).astype(np.uint8)
    image = Image.fromarray(np.stack([grad, 255 - grad, grad // 2], axis=-1))
    cpp = LlamaCppBackend(str(m3_spm.lm), threads=2)
    try:
        got = cpp.preprocess(image)
    finally:
        cpp.close()
    resized = np.asarray(image.resize((48, 76), Image.Resampling.BICUBIC))
    assert np.array_equal(got, resized[14:62])
    rounded = np.asarray(image.resize((48, 77), Image.Resampling.BICUBIC))
    assert not np.array_equal(got, rounded[14:62])


def test_mtmd_only_normalises_an_exact_size_bitmap(cpp_no_template, torch_original, tmp_path):
    """Features of a padded non-square image equal the torch backend's: mtmd did not resample the bitmap."""
    from m3cli.backends.llamacpp import LlamaCppBackend

    exact = LlamaCppBackend(str(cpp_no_template.model_id), mmproj=str(cpp_no_template.mmproj_path), threads=2,
                            patch0="exact")
    try:
        for image in (gs.wide_image(), gs.scene(50, 170, 7)):
            got = exact.encode([image])[0].grid
            want = torch_original.encode([image])[0].grid.float().numpy()
            cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
            assert cos.min() > 0.999, cos.min()
            # the bitmap itself passed in: the same features
            assert np.array_equal(exact.encode([_pil(exact.preprocess(image))])[0].grid, got)
    finally:
        exact.close()


def test_vocabulary_without_the_image_token_gets_a_virtual_one(m3_bpe):
    """The LM GGUF of an original LLaVA-1.5 has LLaMA's 32000 tokens only: the placeholder is virtual (-200,
    the original IMAGE_TOKEN_INDEX); it only marks where the embeddings go and is never fed as a token."""
    from m3cli.backends.llamacpp.tokenizer import VIRTUAL_IMAGE_ID, LlamaCppAdapter
    from m3cli.families import recipe_named

    real = _vocab_adapter(m3_bpe.lm)
    adapter = LlamaCppAdapter(real._llama, real._vocab, {}, image_token="<no-such-token>")
    assert adapter.image_token_id == VIRTUAL_IMAGE_ID == -200
    parts = recipe_named("vicuna_v1").parts("What is it?", adapter, "<no-such-token>")
    assert parts.image_token_id == -200 and -200 not in parts.before + parts.after
    assert parts.after == recipe_named("vicuna_v1").parts("What is it?", real).after


def test_header_reader_matches_the_gguf_library(pairs, m3_bpe):
    from m3cli.gguf.reader import read_metadata

    for path in (pairs[0].lm, pairs[0].mmproj, m3_bpe.lm):
        ours, full = read_metadata(path), gguf_fields(path)
        long = {k for k, v in full.items() if isinstance(v, list) and len(v) > 64}
        assert set(ours) == set(full) - long and long <= {"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                            "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
        for key, value in ours.items():
            assert value == pytest.approx(full[key]) if isinstance(value, float) else value == full[key], key


def test_convert_to_gguf_takes_an_original_checkpoint(dirs, torch_original, tmp_path):
    """`m3 convert ORIGINAL --to gguf OUT` goes through the cached transformers conversion: the pair keeps the
    original's recipe (pad, vicuna_v1) and answers as the torch backend does on the checkpoint itself."""
    from click.testing import CliRunner

    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.cli import cli

    res = CliRunner().invoke(cli, ["convert", str(dirs.original.model_dir), "--to", "gguf", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lm, mmproj = res.stdout.split()
    cpp = LlamaCppBackend(lm, mmproj=mmproj, threads=2)
    try:
        assert (cpp.spec.preprocess, cpp.recipe.name) == ("pad", "vicuna_v1")
        assert_same_answers(cpp, torch_original, gs.wide_image())
    finally:
        cpp.close()
