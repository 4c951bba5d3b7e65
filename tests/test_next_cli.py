"""LLaVA-NeXT through the torch backend and the CLI: ``m3 ask``/``batch``/``eval``/``bench latency`` on tiny models.

Both layouts of ``next_layouts`` (llava-hf ``LlavaNextForConditionalGeneration``, and the original ``llava_llama``
anyres checkpoint converted once into the cache on first use), checked against ``reference_next`` (an independent
re-implementation of the method) and, at 576 tokens per crop, against stock transformers ``generate``. Rows keep
``tokens`` as the per-crop scale and add ``visual_tokens`` (what the LM received) and ``crops``;
``--max-visual-tokens`` caps the total per image.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("sentencepiece")

import next_layouts as nl  # noqa: E402
import reference_llava15 as ref15  # noqa: E402
import reference_next as ref  # noqa: E402
from test_next import scene, stock_ids  # noqa: E402

from m3cli.answering.core import answer_images, make_policy  # noqa: E402
from m3cli.backends.base import AnswerRequest, ModelLoadError  # noqa: E402
from m3cli.cli import cli  # noqa: E402

SCALES = (576, 144, 36, 9, 1)
QUESTION = "What is this?"
MAX_NEW = 5
WIDE = (80, 100)   # (h, w): a 2x2 layout on the tiny pinpoints, padding to remove on the pooled grid


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("next-cli")
    image = root / "wide.png"
    scene(*WIDE).save(image)
    return {"hf": nl.build_llava_next_hf(root / "llava-v1.6-tiny-hf"),
            "original": nl.build_original_next(root / "original"), "image": image, "root": root}


@pytest.fixture(scope="module")
def hf_backend(dirs):
    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(dirs["hf"]), device="cpu")


@pytest.fixture(scope="module")
def stock(dirs):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(dirs["hf"], dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(dirs["hf"])


@pytest.fixture(scope="module")
def converted(dirs, tmp_path_factory):
    """The original checkpoint through ``--model ORIGINAL`` (converted once into a private cache)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("next-cache")
    mp.setenv("M3_CACHE_DIR", str(cache))
    from m3cli.backends.torch import TorchBackend

    backend = TorchBackend(str(dirs["original"].model_dir), device="cpu")
    yield backend, cache
    mp.undo()


# --------------------------------------------------------------------------- llava-hf layout


def test_ask_json_reports_the_per_crop_scale_visual_tokens_and_crops(dirs, hf_backend, stock):
    model, processor = stock
    res = _run("ask", dirs["image"], QUESTION, "--model", dirs["hf"], "--tokens", 9, "--json", "--device", "cpu",
               "--max-new-tokens", MAX_NEW)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    fam = hf_backend.family
    want, want_n = ref.hf_reference_answer(model, processor, scene(*WIDE), QUESTION, 9, MAX_NEW)
    assert (row["tokens"], row["visual_tokens"], row["crops"]) == (9, want_n, 5)
    assert want_n == fam.n_visual_tokens(9, image_hw=WIDE) == 37        # 9 + 6 rows x 4 kept columns + 6 newlines
    assert [r["tokens"] for r in row["scales_tried"]] == [9]
    assert row["answer"] == processor.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_backend_equals_the_reference_at_every_scale_and_stock_generate_at_576(hf_backend, stock):
    model, processor = stock
    for i, hw in enumerate(((80, 100), (60, 150))):   # 2x2 and 1x3 tiles
        img = scene(*hw, seed=i)
        enc = hf_backend.encode([img])[0]
        assert (enc.crops, enc.image_hw) == (hf_backend.family.layout(hw).crops, hw)
        gens = {s: hf_backend.answer([AnswerRequest(enc, s, QUESTION, MAX_NEW)])[0] for s in SCALES}
        for s in SCALES:
            want, n = ref.hf_reference_answer(model, processor, img, QUESTION, s, MAX_NEW)
            assert (gens[s].token_ids, gens[s].visual_tokens) == (want, n), (hw, s)
            assert n == hf_backend.visual_token_count(s, hw)
        inputs = ref15.hf_inputs(processor, img, QUESTION)
        assert hf_backend.prompt_ids(QUESTION, gens[576].visual_tokens) == inputs["input_ids"][0].tolist()
        assert gens[576].token_ids == stock_ids(model, inputs, MAX_NEW), hw
        assert len({tuple(g.token_ids) for g in gens.values()}) > 1      # the scale matters
    # batched with other images and scales, and without the shared-prefix cache: the same answers
    imgs = [scene(40, 90, 3), scene(90, 40, 4)]
    encs = hf_backend.encode(imgs)
    reqs = [AnswerRequest(encs[0], 36, QUESTION, MAX_NEW), AnswerRequest(encs[1], 36, "How many shapes?", MAX_NEW),
            AnswerRequest(encs[0], 1, QUESTION, MAX_NEW)]
    batch = [g.token_ids for g in hf_backend.answer(reqs)]
    hf_backend.prefix_cache = False
    try:
        alone = [hf_backend.answer([r])[0].token_ids for r in reqs]
    finally:
        hf_backend.prefix_cache = True
    assert batch == alone


def test_max_visual_tokens_caps_the_total_per_image(hf_backend):
    fam = hf_backend.family
    wide, tall = scene(*WIDE), scene(60, 150)
    totals = [fam.tokens_per_scale(WIDE), fam.tokens_per_scale((60, 150))]
    cap = 600
    expect = [max(s for s, n in t.items() if n <= cap) for t in totals]
    assert expect == [36, 144]                  # one cap, two images (2x2 and 1x3 tiles), two scales
    results = answer_images(hf_backend, [wide, tall], [QUESTION] * 2,
                            [make_policy(24, max_visual_tokens=cap)] * 2, MAX_NEW)
    assert [(r.tokens, r.visual_tokens, r.crops) for r in results] == [
        (s, t[s], fam.layout(hw).crops) for s, t, hw in zip(expect, totals, (WIDE, (60, 150)), strict=True)]
    # with --tokens the smaller scale wins; with --auto-scale the ladder stops at the cap; too small: that item only
    fixed = answer_images(hf_backend, [wide], [QUESTION], [make_policy(24, 9, max_visual_tokens=cap)], MAX_NEW)[0]
    climbed = answer_images(hf_backend, [wide], [QUESTION], [make_policy(24, None, True, 1.0, None, cap)], MAX_NEW)[0]
    assert fixed.tokens == 9 and [r.scale for r in climbed.scales_tried] == [1, 9, 36]
    tiny = answer_images(hf_backend, [wide, tall], [QUESTION] * 2,
                         [make_policy(24, max_visual_tokens=6), make_policy(24, max_visual_tokens=40)], MAX_NEW)
    assert "cap of 6 visual tokens" in tiny[0].error and tiny[1].error is None and tiny[1].visual_tokens <= 40
    res = _run("ask", "--help")
    assert "--max-visual-tokens" in res.output


def test_batch_eval_and_bench_latency_accept_next(dirs, tmp_path):
    out = tmp_path / "rows.jsonl"
    res = _run("batch", dirs["image"], "-q", QUESTION, "--model", dirs["hf"], "--tokens", 36, "-o", out,
               "--device", "cpu", "--max-new-tokens", 3)
    assert res.exit_code == 0, res.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["tokens"], row["visual_tokens"], row["crops"]) == (36, 166, 5)
    report = tmp_path / "eval.json"
    res = _run("eval", "--n", 3, "--tokens", "1,576", "--model", dirs["hf"], "--device", "cpu", "--json", report)
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    # the scenes are square: a layout of more than one tile, so the totals are well above the per-crop scale
    assert set(data["visual_tokens"]) == {"1", "576"} and data["visual_tokens"]["576"] > 2 * 576
    assert "visual tokens (all crops)" in res.stdout
    res = _run("bench", "latency", "--model", dirs["hf"], "--device", "cpu", "--tokens", "1,576", "--repeat", 1,
               "--max-new-tokens", 2)
    assert res.exit_code == 0, res.output
    assert "| 576 |" in res.stdout and "| 1 |" in res.stdout


def test_llava15_rows_say_one_crop(tiny_model_dir, scene_png):
    res = _run("ask", scene_png, "how many shapes are there?", "--tokens", 9, "--model", tiny_model_dir, "--json",
               "--max-new-tokens", 2, "--max-visual-tokens", 5)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert (row["tokens"], row["visual_tokens"], row["crops"]) == (1, 1, 1)   # for LLaVA-1.5 the cap is the scale


# --------------------------------------------------------------------------- original layout


def test_original_checkpoint_through_auto_conversion_equals_the_reference(dirs, converted):
    backend, cache = converted
    lay = dirs["original"]
    assert (backend.spec.name, backend.spec.anyres_flavour, backend.prompt.recipe_name, backend.spec.converted) == (
        "llavanext-hf", "original", "vicuna_v1", True)
    out = backend.model_dir
    assert out.parent == cache / "converted"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == [[b, a] for a, b in nl.TINY_PINPOINTS]    # [w, h] -> [h, w], order kept
    assert (cfg["m3cli"]["family"], cfg["m3cli"]["anyres_flavour"]) == ("llavanext", "original")
    parts, newline = ref.load_original_next_parts(lay.model_dir, lay.tower_dir, image_token_id=backend.image_token_id)
    assert torch.equal(backend.model.model.image_newline.float(), newline)   # the learned newline is kept
    # (55, 88) unpads one row less with the original int() than transformers' round() at 144; (40, 45) is a tie
    # that the original pinpoint order breaks as 2x1
    for i, (hw, scales) in enumerate((((55, 88), (144, 36)), ((40, 45), SCALES))):
        img = scene(*hw, seed=20 + i)
        enc = backend.encode([img])[0]
        for s in scales:
            gen = backend.answer([AnswerRequest(enc, s, QUESTION, MAX_NEW)])[0]
            want, n = ref.original_reference_answer(parts, newline, nl.TINY_PINPOINTS, img, QUESTION, s, MAX_NEW)
            assert (gen.token_ids, gen.visual_tokens) == (want, n), (hw, s)

    # m3 ask --model ORIGINAL reuses the conversion and agrees with the reference
    res = _run("ask", dirs["image"], QUESTION, "--model", lay.model_dir, "--tokens", 9, "--json", "--device", "cpu",
               "--max-new-tokens", MAX_NEW)
    assert res.exit_code == 0, res.output
    assert "convert" not in res.stderr
    row = json.loads(res.stdout)
    want, n = ref.original_reference_answer(parts, newline, nl.TINY_PINPOINTS, scene(*WIDE), QUESTION, 9, MAX_NEW)
    assert (row["tokens"], row["visual_tokens"], row["crops"]) == (9, n, 5)
    assert row["answer"] == backend.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_converted_directory_gives_plain_transformers_anyres(converted):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    backend, _ = converted
    model = LlavaNextForConditionalGeneration.from_pretrained(backend.model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(backend.model_dir)
    assert type(processor).__name__ == "LlavaNextProcessor"
    img = scene(*WIDE, seed=7)
    inputs = ref15.hf_inputs(processor, img, QUESTION)
    gen = backend.answer([AnswerRequest(backend.encode([img])[0], 576, QUESTION, MAX_NEW)])[0]
    assert inputs["input_ids"][0].tolist() == backend.prompt_ids(QUESTION, gen.visual_tokens)
    assert stock_ids(model, inputs, MAX_NEW) == gen.token_ids


def test_next_directory_without_a_template_gets_its_language_models_conversation(tmp_path):
    from m3cli.families import detect_family, family_for

    spec = detect_family(nl.build_llava_next_hf(tmp_path / "no-template", template=None))
    assert (spec.family, spec.prompt_recipe) == ("llavanext", "vicuna_v1") and "no chat template" in spec.notes[0]
    assert type(family_for(spec)).__name__ == "LlavaNextFamily"


# --------------------------------------------------------------------------- refusals


def test_next_without_image_newline_is_refused_in_one_line(dirs, tmp_path):
    from m3cli.backends.torch import TorchBackend

    broken = nl.build_llava_next_hf(tmp_path / "no-newline")
    tensors = nl._read_shards(broken)
    del tensors["image_newline"]
    nl.rl._write_shards(tensors, broken, "safetensors", 2, torch.float16)
    with pytest.raises(ModelLoadError, match="image_newline") as err:
        TorchBackend(str(broken), device="cpu")
    assert "\n" not in str(err.value)

