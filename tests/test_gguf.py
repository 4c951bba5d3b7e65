"""GGUF conversion and the llama.cpp backend, on the tiny random LLaVA (skips without llama_cpp/gguf)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from m3cli.backends.base import AnswerRequest, ModelLoadError  # noqa: E402
from m3cli.convert.gguf_writer import convert_to_gguf, mmproj_tensors_from_hf  # noqa: E402
from m3cli.convert.hf_llava import load_hf_llava  # noqa: E402
from m3cli.errors import ConvertError  # noqa: E402
from m3cli.gguf.layout import LAYOUT_KEY, VARIANT_KEY, mmproj_kv, mmproj_tensor_list  # noqa: E402
from m3cli.gguf.mmproj import MmprojError, fix_mmproj, validate_mmproj  # noqa: E402
from m3cli.gguf.writer import write_gguf  # noqa: E402
from m3cli.models.build import ModelSpec, make_tiny_model  # noqa: E402

QUESTIONS = ["what colour is the background?", "how many shapes are there?"]


def write_legacy_mmproj(hf_dir, path):
    """An mmproj as llama.cpp's legacy LLaVA converter writes it: L-1 blocks, no feature_layer,
    natural position order, post-layernorm kept."""
    m = load_hf_llava(hf_dir)
    tensors = mmproj_tensors_from_hf(m)
    n_layers = int(m.vision["num_hidden_layers"])
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"v.blk.{n_layers - 1}.")}
    tensors["v.post_ln.weight"] = m.tensors["vision.post_layernorm.weight"]
    tensors["v.post_ln.bias"] = m.tensors["vision.post_layernorm.bias"]
    v = m.vision
    kv = mmproj_kv(name="legacy", image_size=v["image_size"], patch_size=v["patch_size"], hidden=v["hidden_size"],
                   ff=v["intermediate_size"], n_blocks=n_layers - 1, n_heads=v["num_attention_heads"],
                   eps=v.get("layer_norm_eps", 1e-5), proj_dim=v.get("projection_dim", 768), mean=m.image_mean,
                   std=m.image_std, use_gelu=False, file_type=0, layout="natural", variant="main")
    kv = [item for item in kv if item[0] not in ("clip.vision.feature_layer", LAYOUT_KEY, VARIANT_KEY)]
    return write_gguf(path, "clip", kv, mmproj_tensor_list(tensors, "f32"))


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    lm, mm = convert_to_gguf(tiny_model_dir, out, "f32", name="tiny")
    return lm, mm


@pytest.fixture(scope="module")
def cpp(gguf_files):
    from m3cli.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(gguf_files[0]), patch0="exact", threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def images():
    from PIL import Image, ImageDraw

    out = []
    for i, (bg, fg) in enumerate([((90, 90, 90), (220, 30, 30)), ((20, 140, 40), (240, 240, 20))]):
        img = Image.new("RGB", (48, 48), bg)
        draw = ImageDraw.Draw(img)
        draw.ellipse((4 + 3 * i, 4, 20 + 3 * i, 20), fill=fg)
        draw.rectangle((28, 26 - 4 * i, 42, 40), fill=(30, 40, 220))
        out.append(img)
    return out


@pytest.fixture(scope="module")
def torch_grids(tiny_backend, images):
    return [e.grid.float().numpy() for e in tiny_backend.encode(images)]


def test_convert_layout(gguf_files):
    lm, mm = gguf_files
    assert lm.is_file() and mm.is_file()
    assert mm.with_name(mm.name.replace(".gguf", ".rot180.gguf")).is_file()
    info = validate_mmproj(mm, n_embd_text=64)
    assert (info.layout, info.n_patches, info.n_blocks, info.feature_layers) == ("cls_last", 576, 2, [1])


def test_convert_rejects_non_llava(tmp_path):
    with pytest.raises(ConvertError) as exc:
        convert_to_gguf(tmp_path, tmp_path / "out")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConvertError):
        convert_to_gguf(tmp_path / "missing", tmp_path / "out")


def test_probe_recognises_build():
    from m3cli.backends.llamacpp import SIG_BUGGY, SIG_FIXED, probe_llamacpp

    assert probe_llamacpp().signature in (SIG_BUGGY, SIG_FIXED)


def test_prompt_tokens_match_torch(cpp, tiny_backend):
    for q in QUESTIONS:
        assert cpp.prompt_ids(q, 9) == tiny_backend.prompt_ids(q, 9)


def test_grid_matches_torch(cpp, images, torch_grids):
    encoded = cpp.encode(images)
    for enc, ref in zip(encoded, torch_grids, strict=True):
        assert enc.grid.shape == (576, 64) and enc.side == 24
        assert cosines(enc.grid, ref).min() > 0.999


def test_every_scale_answers_and_agrees(cpp, tiny_backend, images):
    enc_cpp = cpp.encode(images[:1])[0]
    enc_t = tiny_backend.encode(images[:1])[0]
    for scale in cpp.scales:
        reqs = [AnswerRequest(enc_cpp, scale, q, max_new_tokens=4) for q in QUESTIONS]
        gens = cpp.answer(reqs)
        refs = tiny_backend.answer([AnswerRequest(enc_t, scale, q, max_new_tokens=4) for q in QUESTIONS])
        for g, r in zip(gens, refs, strict=True):
            assert len(g.token_ids) == len(g.logprobs) and all(lp <= 1e-6 for lp in g.logprobs)
            assert_same_greedy(g, r, scale)


def test_auto_patch0_is_lazy(gguf_files, images, torch_grids):
    from m3cli.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(gguf_files[0]), patch0="auto", threads=1)
    try:
        enc = backend.encode(images[:1])[0]
        assert enc.patch0_exact is False
        assert cosines(enc.grid[1:], torch_grids[0][1:]).min() > 0.999
        backend.answer([AnswerRequest(enc, s, QUESTIONS[0], max_new_tokens=1) for s in (1, 9)])
        assert enc.patch0_exact is False          # small scales never pay for the second pass
        backend.answer([AnswerRequest(enc, 36, QUESTIONS[0], max_new_tokens=1)])
        assert enc.patch0_exact is True
        assert cosines(enc.grid, torch_grids[0]).min() > 0.999
    finally:
        backend.close()


def assert_same_greedy(got, ref, scale, tie=0.05):
    """Equal greedy tokens, except that a random model may diverge at a near-tie (two top
    candidates whose log-probs differ by less than ``tie``); logprobs agree up to there."""
    n = 0
    while n < min(len(got.token_ids), len(ref.token_ids)) and got.token_ids[n] == ref.token_ids[n]:
        n += 1
    assert np.allclose(got.logprobs[:n], ref.logprobs[:n], atol=tie), (scale, got.logprobs, ref.logprobs)
    if n < max(len(got.token_ids), len(ref.token_ids)):
        assert n < len(got.token_ids) and n < len(ref.token_ids), (scale, got.text, ref.text)
        assert abs(got.logprobs[n] - ref.logprobs[n]) < tie, (scale, got.text, ref.text)


def _one_line_load_error(*args, **kwargs) -> str:
    from m3cli.backends.llamacpp import LlamaCppBackend

    with pytest.raises(ModelLoadError) as exc:
        LlamaCppBackend(*args, **kwargs)
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_load_errors(gguf_files, tmp_path):
    lm, mm = gguf_files
    assert "not found" in _one_line_load_error(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert "not a GGUF" in _one_line_load_error(str(junk))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(lm, alone / lm.name)
    assert "mmproj" in _one_line_load_error(str(alone / lm.name))
    assert "language model" in _one_line_load_error(str(mm))


def test_mismatched_mmproj(gguf_files, tmp_path):
    spec = ModelSpec(vision_hidden=16, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1,
                     text_heads=2, text_kv_heads=2, text_intermediate=64)
    other = make_tiny_model(tmp_path / "other", ["red", "blue", "yes", "no"], spec)
    _, other_mm = convert_to_gguf(other, tmp_path / "other-gguf", "f32", name="other", rot180=False)
    with pytest.raises(MmprojError, match="mismatched"):
        validate_mmproj(other_mm, 64)
    assert "mismatched" in _one_line_load_error(str(gguf_files[0]), mmproj=str(other_mm))


def test_truncated_position_table_is_caught(gguf_files, tmp_path, tiny_model_dir):
    m = load_hf_llava(tiny_model_dir)
    tensors = mmproj_tensors_from_hf(m)
    tensors["v.position_embd.weight"] = tensors["v.position_embd.weight"][:100]
    v = m.vision
    kv = mmproj_kv(name="short", image_size=48, patch_size=2, hidden=v["hidden_size"], ff=v["intermediate_size"],
                   n_blocks=2, n_heads=2, eps=1e-5, proj_dim=64, mean=m.image_mean, std=m.image_std,
                   use_gelu=False, file_type=0, layout="cls_last", variant="main")
    bad = write_gguf(tmp_path / "short-mmproj.gguf", "clip", kv, mmproj_tensor_list(tensors, "f32"))
    with pytest.raises(MmprojError, match="position table"):
        validate_mmproj(bad, 64)
    assert "position table" in _one_line_load_error(str(gguf_files[0]), mmproj=str(bad))


def test_fix_legacy_mmproj(gguf_files, tiny_model_dir, tmp_path, images, cpp):
    from m3cli.backends.llamacpp import LlamaCppBackend

    legacy = write_legacy_mmproj(tiny_model_dir, tmp_path / "mmproj-legacy-f32.gguf")
    fixed = fix_mmproj(legacy, tmp_path / "fixed")
    backend = LlamaCppBackend(str(gguf_files[0]), mmproj=str(fixed), patch0="exact", threads=1)
    try:
        got = backend.encode(images[:1])[0].grid
    finally:
        backend.close()
    ref = cpp.encode(images[:1])[0].grid
    assert np.abs(got - ref).max() < 1e-4


def test_legacy_mmproj_is_fixed_once_into_the_cache(gguf_files, tiny_model_dir, tmp_path, images, cpp, monkeypatch):
    """A third-party mmproj just works: a corrected copy is written into the cache on the first load,
    reused afterwards, and the user's file is never written."""
    import hashlib

    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.gguf.cache import cached_fixed_mmproj

    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path / "cache"))
    legacy = write_legacy_mmproj(tiny_model_dir, tmp_path / "user" / "mmproj-legacy-f32.gguf")
    digest = hashlib.sha256(legacy.read_bytes()).hexdigest()
    mtime = legacy.stat().st_mtime_ns
    backend = LlamaCppBackend(str(gguf_files[0]), mmproj=str(legacy), patch0="exact", threads=1)
    try:
        got = backend.encode(images[:1])[0].grid
        assert backend.mmproj_path == legacy and backend.loaded_mmproj_path != legacy
        assert tmp_path / "cache" in backend.loaded_mmproj_path.parents
    finally:
        backend.close()
    assert np.abs(got - cpp.encode(images[:1])[0].grid).max() < 1e-4
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == digest and legacy.stat().st_mtime_ns == mtime
    cached, created = cached_fixed_mmproj(legacy)
    assert not created and cached == backend.loaded_mmproj_path
    assert list((tmp_path / "cache" / "mmproj").iterdir()) == [cached.parent]  # no partial folders left


def test_unwritable_cache_is_one_line(gguf_files, tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("M3_CACHE_DIR", str(blocker / "cache"))
    legacy = write_legacy_mmproj(tiny_model_dir, tmp_path / "mmproj-legacy-f32.gguf")
    message = _one_line_load_error(str(gguf_files[0]), mmproj=str(legacy))
    assert "M3_CACHE_DIR" in message and "--fix-mmproj" in message


def test_bench_gguf_against_the_stock_handler(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from m3cli.cli import cli

    res = CliRunner().invoke(cli, ["bench", "gguf", "--model", str(tiny_model_dir), "-n", "3", "--batch-size", "2",
                                   "--max-new-tokens", "1", "--threads", "1", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| ") and "items" not in line]
    labels = [r[1].strip() for r in rows]
    assert labels == ["stock `Llava15ChatHandler`, 576 tokens, one by one",
                      "stock `Llava15ChatHandler`, 576 tokens, one by one, flash_attn=True",
                      "m3 batch --backend llamacpp --tokens 576",
                      "m3 batch --backend llamacpp --tokens 9", "m3 batch --backend torch --tokens 9"]
    assert all(r[2].strip() == "3" and float(r[4]) > 0 for r in rows) and rows[0][5].strip() == "1.00x"


def test_bench_gguf_bad_input_is_one_line(gguf_files, tmp_path):
    from click.testing import CliRunner

    from m3cli.cli import cli

    cases = ((["--model", str(gguf_files[0])], "--gguf"), (["--gguf", str(tmp_path / "no.gguf")], "not found"))
    for args, needle in cases:
        res = CliRunner().invoke(cli, ["bench", "gguf", *args, "-n", "1", "--workdir", str(tmp_path)])
        assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, res.output
