"""The torch backend on models of the REAL layouts answers exactly as each layout's own recipe.

Tiny random-weight models from ``real_layouts`` (llava-hf with SentencePiece tokenizer.json in the
transformers-4.36 and -5 forms, llava-hf with byte-level BPE, the original ``llava_llama`` layout) are run
through ``TorchBackend`` / ``m3 ask`` and compared with ``reference_llava15``, an independent re-implementation:
equal prompt ids and equal answer token ids at every scale on a non-square (3:1) image. Also: the one-step
conversion of original checkpoints (and its cache), plain transformers on the converted directory, the
one-line refusals before any work, the fast failure of an unreachable hub, and corrupt weight files.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("sentencepiece")

import real_layouts as rl  # noqa: E402
import reference_llava15 as ref  # noqa: E402

from m3cli.backends.base import AnswerRequest, ModelLoadError  # noqa: E402
from m3cli.cli import cli  # noqa: E402

QUESTION = "What colours are there?"
MAX_NEW = 6


def wide_image():
    """1008x336-proportioned (3:1): red left third, grey middle, blue right third."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (144, 48), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 47, 47), fill=(220, 20, 20))
    draw.rectangle((96, 0, 143, 47), fill=(20, 20, 220))
    return img


def _run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


def _one_line_exit_2(res):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m3") and "Traceback" not in res.output, res.stderr
    assert res.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "spm-v4": rl.build_llava_hf(root / "llava-1.5-tiny-hf"),
        "spm-v5": rl.build_llava_hf(root / "llava-1.5-tiny-hf-v5", tokenizer_json="v5", template_file="jinja"),
        "bpe": rl.build_llava_hf_bpe(root / "llava-bpe-tiny-hf"),
        "original": rl.build_original_llava(root / "original"),
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh m3 cache (where conversions go) for one test."""
    folder = tmp_path / "m3-cache"
    monkeypatch.setenv("M3_CACHE_DIR", str(folder))
    return folder


def _backend(path, **kw):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(path), device="cpu", **kw)


def _answers(backend, image, question=QUESTION):
    enc = backend.encode([image])[0]
    return {s: backend.answer([AnswerRequest(enc, s, question, MAX_NEW)])[0].token_ids for s in ref.SCALES}


# --------------------------------------------------------------------------- llava-hf


@pytest.mark.parametrize("layout", ["spm-v4", "spm-v5", "bpe"])
def test_llava_hf_equals_its_own_recipe_at_every_scale(models, layout):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = models[layout]
    backend = _backend(path)
    assert (backend.spec.name, backend.spec.preprocess, backend.prompt.recipe_name) == (
        "llava15-hf", "crop", "hf_template")
    stock = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert "{% generation %}" in processor.chat_template
    image = wide_image()
    ids = ref.hf_inputs(processor, image, QUESTION)["input_ids"][0].tolist()
    image_id = stock.config.image_token_id
    first, n = ids.index(image_id), ids.count(image_id)
    ours = _answers(backend, image)
    for scale in ref.SCALES:
        assert backend.prompt_ids(QUESTION, scale) == ids[:first] + [image_id] * scale + ids[first + n:]
        assert ours[scale] == ref.reference_hf_answer(stock, processor, image, QUESTION, scale, MAX_NEW), scale
    assert len({tuple(a) for a in ours.values()}) > 1   # the scale matters: not a vacuous equality


# --------------------------------------------------------------------------- original layout


@pytest.fixture(scope="module")
def parts(models):
    return ref.load_original_parts(models["original"].model_dir)


def test_original_checkpoint_converts_once_and_equals_the_original_recipe(models, parts, cache, monkeypatch,
                                                                          tmp_path):
    original = models["original"].model_dir
    backend = _backend(original)
    assert (backend.spec.preprocess, backend.prompt.recipe_name, backend.spec.converted) == ("pad", "vicuna_v1", True)
    converted = backend.model_dir
    assert converted.parent == cache / "converted" and (converted / "config.json").is_file()
    image = wide_image()
    ours = _answers(backend, image)
    for scale in ref.SCALES:
        assert backend.prompt_ids(QUESTION, scale) == ref.reference_prompt_ids(
            parts.spm_path, QUESTION, scale, backend.image_token_id)
        assert ours[scale] == ref.reference_answer(parts, image, QUESTION, scale, MAX_NEW), scale
    assert len({tuple(a) for a in ours.values()}) > 1

    # the second load reuses the cache: converting again would fail here
    import m3cli.convert.original_llava as conv

    def no_conversion(*a, **k):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(conv, "convert_original_to_hf", no_conversion)
    again = _backend(original)
    assert again.model_dir == converted and again.prompt_ids(QUESTION, 9) == backend.prompt_ids(QUESTION, 9)

    # a changed source gets a new key (and would convert again)
    from m3cli.convert.original_cache import cache_folder
    from m3cli.families import detect_family

    assert cache_folder(detect_family(original), str(original.resolve())) == converted
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    key = cache_folder(detect_family(copy), "x").name
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert cache_folder(detect_family(copy), "x").name != key


def test_converted_directory_gives_plain_transformers_the_original_recipe(models, parts, tmp_path, capfd):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from m3cli.convert.original_llava import convert_original_to_hf

    out = convert_original_to_hf(models["original"].model_dir, tmp_path / "hf", source="mucai/llava-v1.5-7b-m3")
    captured = capfd.readouterr()
    assert "__type" not in captured.out + captured.err      # no "Ignored unknown kwarg option __type"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["m3cli"]["prompt_recipe"] == "vicuna_v1" and cfg["m3cli"]["source"] == "mucai/llava-v1.5-7b-m3"
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.do_pad
    image = wide_image()
    ids = ref.hf_inputs(processor, image, QUESTION)["input_ids"][0].tolist()
    assert ids == ref.reference_prompt_ids(parts.spm_path, QUESTION, 576, model.config.image_token_id)
    for scale in ref.SCALES:
        assert ref.reference_hf_answer(model, processor, image, QUESTION, scale, MAX_NEW) == \
            ref.reference_answer(parts, image, QUESTION, scale, MAX_NEW), scale


def test_m3_ask_original_dir_works_without_prior_convert(models, cache, tmp_path):
    image = tmp_path / "wide.png"
    wide_image().resize((1008, 336)).save(image)
    args = ("ask", image, "What colours are there?", "--model", models["original"].model_dir, "--tokens", 9, "--json")
    first = _run(*args)
    assert first.exit_code == 0, first.output
    assert "converting it once" in first.stderr and "Ignored unknown kwarg" not in first.output
    second = _run(*args)
    assert second.exit_code == 0, second.output
    assert "convert" not in second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["tokens"] == 9 and a["answer"] == b["answer"]
    assert len(list((cache / "converted").iterdir())) == 1


def _fake_hub_snapshot(cache_dir: Path, repo_id: str, files_from: Path) -> Path:
    """``repo_id`` laid out in a Hugging Face hub cache as ``snapshot_download`` leaves it."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / sha
    shutil.copytree(files_from, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return snap


def test_hub_id_and_vision_tower_from_the_local_hub_cache(tmp_path, cache, monkeypatch):
    """An original checkpoint named by hub id, whose mm_vision_tower is a hub id too, both only in the cache."""
    lay = rl.build_original_llava(tmp_path / "src", tower_inside=False, stray_buffers=False,
                                  mm_vision_tower="m3test/clip-vit-tiny")
    hub_cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # without the tower anywhere: one line saying how to give it, before any conversion
    with pytest.raises(ModelLoadError, match="--vision-tower") as err:
        _backend(lay.model_dir)
    assert "\n" not in str(err.value) and not cache.exists()
    _fake_hub_snapshot(hub_cache, "m3test/clip-vit-tiny", lay.tower_dir)
    _fake_hub_snapshot(hub_cache, "m3test/llava-tiny-m3", lay.model_dir)
    backend = _backend("m3test/llava-tiny-m3")
    assert backend.spec.preprocess == "pad" and backend.model_dir.name.startswith("m3test-llava-tiny-m3-")
    parts = ref.load_original_parts(lay.model_dir, lay.tower_dir)
    image = wide_image()
    enc = backend.encode([image])[0]
    for scale in (576, 9):
        got = backend.answer([AnswerRequest(enc, scale, QUESTION, MAX_NEW)])[0].token_ids
        assert got == ref.reference_answer(parts, image, QUESTION, scale, MAX_NEW)
    # $M3_VISION_TOWER gives the tower of a local checkpoint
    monkeypatch.setenv("M3_VISION_TOWER", str(lay.tower_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert _backend(lay.model_dir).spec.preprocess == "pad"


def test_tokenizer_model_without_sentencepiece_is_one_clear_line(models, monkeypatch, tmp_path):
    import m3cli.convert.original_parts as op
    from m3cli.errors import ConvertError

    monkeypatch.setattr(op, "_importable", lambda module: module != "sentencepiece")
    with pytest.raises(ConvertError) as err:
        op.prepare_tokenizer(models["original"].model_dir)
    msg = str(err.value)
    assert "sentencepiece" in msg and "pip install" in msg and "tiktoken" not in msg and "\n" not in msg


# --------------------------------------------------------------------------- refusals before any work


def _refused_dirs(root: Path, models) -> dict[str, tuple[Path, str]]:
    # LLaVA-NeXT is supported; a NeXT directory without image_newline: tests/test_next_cli.py
    bare = root / "llava-hf-no-template"
    shutil.copytree(models["spm-v5"], bare)
    (bare / "chat_template.jinja").unlink()
    out = {"no-template": (bare, "no chat template")}
    for name, cfg, what in (
        ("qwen2-vl", {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
                      "vision_config": {"depth": 2}}, "Qwen2-VL"),
        ("onevision", {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
                       "vision_config": {}, "text_config": {"model_type": "qwen2"}}, "LLaVA-OneVision"),
        ("llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64},
         "text-only"),
    ):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        shutil.copyfile(models["spm-v5"] / "model-00001-of-00002.safetensors", folder / "model.safetensors")
        out[name] = (folder, what)
    return out


def test_unrunnable_models_are_refused_in_one_line_before_any_work(models, tmp_path):
    from m3cli.backends import check_model
    from m3cli.families import SUPPORTED

    image = tmp_path / "wide.png"
    wide_image().save(image)
    for name, (folder, what) in _refused_dirs(tmp_path, models).items():
        for args in (("ask", image, "q?"), ("batch", image, "-q", "q?", "-o", tmp_path / f"{name}.jsonl"),
                     ("eval", "--n", 2)):
            line = _one_line_exit_2(_run(*args, "--model", folder))
            assert what in line, (name, args[0], line)
            assert SUPPORTED in line or name == "no-template"
        assert not (tmp_path / f"{name}.jsonl").exists()      # batch stopped before writing any row
        with pytest.raises(ModelLoadError, match=what):             # the same check for drivers (Ray)
            check_model(str(folder))


def test_corrupt_weight_files_are_one_line(models, tmp_path, cache):
    import torch

    src = models["spm-v5"]
    cases = {}
    trunc = tmp_path / "truncated"
    shutil.copytree(src, trunc)
    shard = trunc / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    cases["truncated"] = (trunc, "truncated")
    empty = tmp_path / "empty"
    shutil.copytree(src, empty)
    for f in empty.glob("model*.safetensors*"):
        f.unlink()
    (empty / "model.safetensors").write_bytes(b"")
    cases["empty"] = (empty, "empty")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    from safetensors.torch import load_file

    state = {}
    for f in sorted(pickled.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    (pickled / "model.safetensors.index.json").unlink()
    state["not_a_tensor"] = _Pickled()
    torch.save(state, pickled / "pytorch_model.bin")
    cases["pickled"] = (pickled, "weights_only")
    original = tmp_path / "original-truncated"
    shutil.copytree(models["original"].model_dir, original)
    first = original / "model-00001-of-00002.safetensors"
    first.write_bytes(first.read_bytes()[:-10])
    cases["original"] = (original, "truncated")
    for name, (folder, what) in cases.items():
        with pytest.raises(Exception) as err:
            _backend(folder)
        assert what in str(err.value) and "\n" not in str(err.value), name
        assert getattr(err.value, "exit_code", None) == 2, name
    image = tmp_path / "wide.png"
    wide_image().save(image)
    assert "truncated" in _one_line_exit_2(_run("ask", image, "q?", "--model", trunc))
    assert not cache.exists() or not any((cache / "converted").glob("*/config.json"))


class _Pickled:
    """An object torch.load(weights_only=True) refuses."""


# --------------------------------------------------------------------------- hub ids


def test_unreachable_hub_fails_fast_in_one_line(tmp_path, monkeypatch):
    image = tmp_path / "wide.png"
    wide_image().save(image)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # loopback, nothing listens: refused at once
    start = time.monotonic()
    line = _one_line_exit_2(_run("ask", image, "q?", "--model", "m3test/not-cached-anywhere"))
    assert time.monotonic() - start < 10
    assert "cannot reach" in line and "HF_HUB_OFFLINE=1" in line and "local directory" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_exit_2(_run("batch", image, "-q", "q?", "--model", "m3test/not-cached-anywhere"))
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE is set" in line
