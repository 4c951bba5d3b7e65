"""LLaVA-NeXT with M3 pooling per crop: the family, the torch feature path, both real layouts, the collage.

Tiny random NeXT models of the llava-hf and the original layout (``next_layouts``), checked against stock
transformers ``generate`` at 576 tokens per crop and against an independent reference (``reference_next``) at
every scale, on non-square images whose layouts are 1x2, 2x1, 2x2 and 1x3 tiles.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("sentencepiece")

import next_layouts as nl  # noqa: E402
import reference_llava15 as ref15  # noqa: E402
import reference_next as ref  # noqa: E402

from m3cli.answering.collage import COLLAGE_PREFIX, collage, collage_question  # noqa: E402
from m3cli.backends import next_features as nf  # noqa: E402
from m3cli.families import HFTokenizerAdapter, detect_family  # noqa: E402
from m3cli.families import anyres as A  # noqa: E402
from m3cli.families.llavanext import LlavaNextFamily, fallback_recipe  # noqa: E402
from m3cli.families.spec import FamilySpec, ImageSpec  # noqa: E402
from m3cli.matryoshka.scales import BudgetError  # noqa: E402

SCALES = (576, 144, 36, 9, 1)
QUESTIONS = ["What colours are there?", "How many shapes are there?"]
# (height, width) -> the tiny pinpoints' layout (tiles_high, tiles_wide); none of them square
LAYOUTS = {(40, 90): (1, 2), (90, 40): (2, 1), (80, 100): (2, 2), (60, 150): (1, 3)}


def scene(h: int, w: int, seed: int = 0) -> Image.Image:
    """A non-square picture with coloured shapes and a little noise (so every tile differs)."""
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 40, (h, w, 3)) + np.array([60, 90, 120])).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 10, h // 10, w // 2, h // 2), fill=(230, 30, 30))
    draw.rectangle((w // 2, h // 2, w - 3, h - 3), fill=(30, 40, 230))
    draw.line((0, h - 1, w - 1, 0), fill=(250, 240, 20), width=3)
    return img


def stock_ids(model, inputs, max_new_tokens=8):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:]
    out = out.tolist()
    return out[:-1] if out and out[-1] == model.generation_config.eos_token_id else out


def m3_answer(model, family, tok, image, question, scale, *, max_new_tokens=8, enc=None):
    """The path the torch backend takes: encode the crops once, pool + pack, the family's prompt, greedy."""
    enc = enc or nf.encode_images(model, family, [image])[0]
    visual = nf.visual_sequence(model, family, enc, scale)
    ids = family.prompt_ids(question, visual.shape[0], tok)
    eos = model.generation_config.eos_token_id
    [gen] = nf.greedy_batch(model, [ids], [visual], model.config.image_token_id, eos_ids=[eos],
                            max_new_tokens=max_new_tokens)
    return gen.token_ids, visual.shape[0], ids


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    # the llava-hf repositories' tokenizer.json (a "▁" after <image>); transformers 5's own: see the prompt test
    root = nl.build_llava_next_hf(tmp_path_factory.mktemp("next-hf") / "llava-v1.6-tiny-hf")
    model = LlavaNextForConditionalGeneration.from_pretrained(root, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(root)
    spec = detect_family(root)
    return model, processor, LlavaNextFamily(spec), HFTokenizerAdapter(processor.tokenizer)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    from transformers import AddedToken, AutoTokenizer

    lay = nl.build_original_next(tmp_path_factory.mktemp("next-original"))
    spec = detect_family(lay.model_dir, vision_tower=lay.tower_dir)
    tok = AutoTokenizer.from_pretrained(lay.model_dir)
    n_vocab = len(tok)
    # what the converter does: <image> added after the vocabulary
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    twin = nl.hf_twin_of_original(lay.model_dir, lay.tower_dir, pinpoints_hw=[list(p) for p in spec.grid_pinpoints],
                                  image_token_id=n_vocab)
    parts, newline = ref.load_original_next_parts(lay.model_dir, lay.tower_dir, image_token_id=n_vocab)
    return twin, LlavaNextFamily(spec), HFTokenizerAdapter(tok), parts, newline, lay


# --------------------------------------------------------------------------- detection and family


def test_specs_of_both_layouts(hf, original):
    _, processor, fam, _ = hf
    spec = fam.spec
    assert (spec.name, spec.family, spec.layout, spec.preprocess, spec.anyres_flavour, spec.prompt_recipe) == (
        "llavanext-hf", "llavanext", "hf", "anyres", "hf", "hf_template")
    assert [list(p) for p in spec.grid_pinpoints] == nl.TINY_PINPOINTS == processor.image_processor.image_grid_pinpoints
    assert fam.tile == 48 and fam.grid == 24 and fam.scales() == list(SCALES)
    ofam = original[1]
    o = ofam.spec
    assert (o.name, o.layout, o.anyres_flavour, o.prompt_recipe) == ("llavanext-original", "original", "original",
                                                                    "vicuna_v1")
    # the original code reads [w, h]: detection stores the swapped pairs, order kept (ties follow that order)
    assert [list(p) for p in o.grid_pinpoints] == [[b, a] for a, b in nl.TINY_PINPOINTS]
    assert o.source.patch_merge_type == "spatial_unpad" and o.source.image_aspect_ratio == "anyres"


def test_layouts_of_the_test_images(hf):
    fam = hf[2]
    for hw, grid in LAYOUTS.items():
        lay = fam.layout(hw)
        assert (lay.tiles_high, lay.tiles_wide) == grid and lay.crops == grid[0] * grid[1] + 1
        assert len(fam.crops(scene(*hw))) == lay.crops


def test_crops_equal_the_processor_pixels(hf):
    _, processor, fam, _ = hf
    for i, hw in enumerate(LAYOUTS):
        img = scene(*hw, seed=i)
        want = processor.image_processor(img, return_tensors="pt")
        got = nf.crop_pixels(fam.crops(img), fam.spec.image)
        assert torch.equal(got, want["pixel_values"][0]), hw
        assert want["image_sizes"][0].tolist() == list(hw)


# --------------------------------------------------------------------------- llava-hf layout


def test_576_equals_stock_generate(hf):
    model, processor, fam, tok = hf
    for i, hw in enumerate(LAYOUTS):
        img = scene(*hw, seed=i)
        enc = nf.encode_images(model, fam, [img])[0]
        for q in QUESTIONS if i == 0 else QUESTIONS[1:]:
            inputs = processor(images=img, text=processor.apply_chat_template(ref15.hf_conversation(q),
                                                                              add_generation_prompt=True),
                               return_tensors="pt")
            got, n, ids = m3_answer(model, fam, tok, img, q, 576, enc=enc, max_new_tokens=6)
            assert ids == inputs["input_ids"][0].tolist(), (hw, q)   # same prompt, same placeholder count
            assert n == fam.n_visual_tokens(576, image_hw=hw) == A.visual_token_count(hw, nl.TINY_PINPOINTS, 48, 576)
            assert got == stock_ids(model, inputs, 6), (hw, q)


def test_features_at_576_equal_transformers_packed_features(hf):
    model, processor, fam, _ = hf
    img = scene(80, 100)
    inputs = processor.image_processor(img, return_tensors="pt")
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                image_sizes=inputs["image_sizes"]).pooler_output[0]
    enc = nf.encode_images(model, fam, [img])[0]
    assert enc.crops == 5 and tuple(enc.grids.shape) == (5, 576, 64) and enc.image_hw == (80, 100)
    assert torch.allclose(nf.visual_sequence(model, fam, enc, 576), packed, atol=1e-6)


# every scale on the 2x2 layout; the other layouts at a few scales each (the CPU budget of the suite)
HF_PLAN = {(80, 100): SCALES, (40, 90): (144, 9), (90, 40): (36, 1), (60, 150): (144, 9)}


def test_every_scale_equals_the_reference(hf):
    model, processor, fam, tok = hf
    answers = set()
    for i, (hw, scales) in enumerate(HF_PLAN.items()):
        img = scene(*hw, seed=i)
        enc = nf.encode_images(model, fam, [img])[0]
        for s in scales:
            got, n, _ = m3_answer(model, fam, tok, img, QUESTIONS[0], s, enc=enc, max_new_tokens=5)
            want, want_n = ref.hf_reference_answer(model, processor, img, QUESTIONS[0], s, max_new_tokens=5)
            assert (got, n) == (want, want_n), (hw, s)
            assert n == fam.n_visual_tokens(s, image_hw=hw)
            answers.add(tuple(got))
    assert len(answers) >= 4  # the scale and the image change the answer: the check is not vacuous


def test_escalation_repools_without_reencoding(hf):
    model, _, fam, tok = hf
    img = scene(90, 40)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        enc = nf.encode_images(model, fam, [img])[0]
        assert len(calls) == 1                                  # all 3 crops in one tower pass
        lengths = [nf.visual_sequence(model, fam, enc, s).shape[0] for s in SCALES]
        m3_answer(model, fam, tok, img, QUESTIONS[1], 9, enc=enc)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert lengths == [fam.n_visual_tokens(s, image_hw=(90, 40)) for s in SCALES] == [1680, 408, 120, 33, 5]


def test_batched_greedy_mixes_images_and_scales(hf):
    model, _, fam, tok = hf
    imgs = [scene(40, 90, 1), scene(80, 100, 2), scene(60, 150, 3)]
    encs = nf.encode_images(model, fam, imgs)
    assert [e.crops for e in encs] == [3, 5, 4]
    scales = [576, 9, 36]
    visuals = [nf.visual_sequence(model, fam, e, s) for e, s in zip(encs, scales, strict=True)]
    prompts = [fam.prompt_ids(QUESTIONS[0], v.shape[0], tok) for v in visuals]
    eos = [model.generation_config.eos_token_id]
    batch = nf.greedy_batch(model, prompts, visuals, model.config.image_token_id, eos_ids=eos, max_new_tokens=6)
    alone = [nf.greedy_batch(model, [p], [v], model.config.image_token_id, eos_ids=eos, max_new_tokens=6)[0]
             for p, v in zip(prompts, visuals, strict=True)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert all(len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs) for g in batch)
    # the same images encoded one by one give the same grids (crops batched across images changes nothing)
    single = nf.encode_images(model, fam, imgs[1:2])[0]
    assert torch.allclose(single.grids, encs[1].grids, atol=1e-5)


@pytest.mark.parametrize("tokenizer_json", ["v4", "v5"])
def test_prompt_equals_the_processor_for_both_tokenizer_pipelines(tmp_path, tokenizer_json):
    from transformers import AutoProcessor

    root = nl.build_llava_next_hf(tmp_path / f"next-{tokenizer_json}", tokenizer_json=tokenizer_json)
    processor = AutoProcessor.from_pretrained(root)
    fam = LlavaNextFamily(detect_family(root))
    img = scene(40, 90)
    text = processor.apply_chat_template(ref15.hf_conversation(QUESTIONS[0]), add_generation_prompt=True)
    want = processor(images=img, text=text, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    after = want[len(want) - want[::-1].index(image_id):]
    # what transformers 5 does with each pipeline: the 4.3x Prepend normaliser prefixes text after <image>
    first = processor.tokenizer.convert_ids_to_tokens(after[:2])
    assert first == (["\u2581", "<0x0A>"] if tokenizer_json == "v4" else ["<0x0A>", "W"])
    got = fam.prompt_ids(QUESTIONS[0], fam.n_visual_tokens(576, image_hw=(40, 90)),
                         HFTokenizerAdapter(processor.tokenizer))
    assert got == want


def test_byte_level_bpe_directory(tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    root = nl.build_llava_next_hf(tmp_path / "next-bpe", tokenizer="bpe")
    model = LlavaNextForConditionalGeneration.from_pretrained(root, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(root)
    fam = LlavaNextFamily(detect_family(root))
    tok = HFTokenizerAdapter(processor.tokenizer)
    img = scene(90, 40, 5)
    text = processor.apply_chat_template(ref15.hf_conversation(QUESTIONS[1]), add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<image>\n")
    inputs = processor(images=img, text=text, return_tensors="pt")
    got, _, ids = m3_answer(model, fam, tok, img, QUESTIONS[1], 576)
    assert ids == inputs["input_ids"][0].tolist()
    assert got == stock_ids(model, inputs)


# --------------------------------------------------------------------------- original layout

# (40, 45): a tie that the original order breaks as 2x1 (transformers' as 1x2); (55, 88): a 2x2 layout whose
# pooled grid at 144 keeps one row more with transformers' round() than with the original int()
ORIGINAL_SIZES = [(40, 90), (90, 40), (80, 100), (40, 45), (55, 88)]


def test_original_layout_geometry_follows_the_original_code(original):
    fam = original[1]
    assert (fam.layout((40, 45)).tiles_high, fam.layout((40, 45)).tiles_wide) == (2, 1)
    assert A.grid_shape((40, 45), nl.TINY_PINPOINTS, 48) == (1, 2)  # transformers reads the same list as [h, w]
    assert fam.n_visual_tokens(144, image_hw=(55, 88)) == A.visual_token_count(
        (55, 88), fam.pinpoints, 48, 144, flavour="original") != A.visual_token_count((55, 88), fam.pinpoints, 48, 144)


def test_original_576_equals_stock_generate_on_the_twin(original):
    twin, fam, tok, parts, _, _ = original
    for i, hw in enumerate(ORIGINAL_SIZES[:4]):  # (55, 88) unpads differently in transformers at 144 only
        img = scene(*hw, seed=10 + i)
        crops = fam.crops(img)
        pixels = nf.crop_pixels(crops, fam.spec.image)[None]
        q = QUESTIONS[i % 2]
        got, n, ids = m3_answer(twin, fam, tok, img, q, 576, max_new_tokens=6)
        assert ids == ref15.reference_prompt_ids(parts.spm_path, q, n, twin.config.image_token_id)
        mask = torch.ones(1, len(ids), dtype=torch.long)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": mask, "pixel_values": pixels,
                  "image_sizes": torch.tensor([list(hw)])}
        assert got == stock_ids(twin, inputs, 6), (hw, q)


ORIGINAL_PLAN = {(40, 45): SCALES, (55, 88): (576, 144), (90, 40): (36, 1), (40, 90): (9,)}


def test_original_every_scale_equals_the_reference(original):
    twin, fam, tok, parts, newline, lay = original
    pins = nl.TINY_PINPOINTS  # as the original config stores them, [w, h]
    answers = set()
    for i, (hw, scales) in enumerate(ORIGINAL_PLAN.items()):
        img = scene(*hw, seed=10 + i)
        enc = nf.encode_images(twin, fam, [img])[0]
        for s in scales:
            got, n, _ = m3_answer(twin, fam, tok, img, QUESTIONS[0], s, enc=enc, max_new_tokens=5)
            want, want_n = ref.original_reference_answer(parts, newline, pins, img, QUESTIONS[0], s, 5)
            assert (got, n) == (want, want_n), (hw, s)
            answers.add(tuple(got))
    assert len(answers) >= 4


# --------------------------------------------------------------------------- token counts


def v16_family(pinpoints=nl.V16_PINPOINTS, flavour="hf") -> LlavaNextFamily:
    """The real 336 px geometry (CLIP-L/14-336, LLaVA-1.6's pinpoints) without a model."""
    from pathlib import Path

    spec = FamilySpec(name="llavanext-hf", family="llavanext", layout="hf", preprocess="anyres",
                      image=ImageSpec(size=336, shortest_edge=336, patch_size=14), prompt_recipe="vicuna_v1",
                      model_dir=Path("llava-v1.6-vicuna-7b-hf"), architecture="LlavaNextForConditionalGeneration",
                      grid_pinpoints=tuple(tuple(p) for p in pinpoints), anyres_flavour=flavour)
    return LlavaNextFamily(spec)


def test_token_counts_on_the_real_geometry():
    fam = v16_family()
    assert fam.grid == 24 and fam.scales() == list(SCALES)
    counts = [fam.n_visual_tokens(s, image_hw=(672, 672)) for s in SCALES]
    assert counts == [A.visual_token_count((672, 672), nl.V16_PINPOINTS, 336, s) for s in SCALES]
    assert counts == [2928, 744, 192, 51, 7]
    assert [A.visual_token_count((672, 672), nl.V16_PINPOINTS, 336, s, newline=False) for s in SCALES] == \
        [2880, 720, 180, 45, 5]
    # per layout with nothing to unpad: s (base) + (th*side) x (tw*side) + th*side newlines
    for hw, (th, tw) in (((336, 672), (1, 2)), ((672, 336), (2, 1)), ((336, 1008), (1, 3)), ((1008, 336), (3, 1))):
        lay = fam.layout(hw)
        assert (lay.tiles_high, lay.tiles_wide) == (th, tw)
        for s in SCALES:
            side = int(s ** 0.5)
            assert fam.n_visual_tokens(s, image_hw=hw) == s + th * side * tw * side + th * side
    assert fam.tokens_per_scale((672, 672)) == dict(zip(SCALES, [2928, 744, 192, 51, 7], strict=True))


def test_counts_equal_the_embeddings_the_lm_receives(hf):
    model, _, fam, tok = hf
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        for hw in ((80, 100), (40, 90)):
            img = scene(*hw)
            enc = nf.encode_images(model, fam, [img])[0]
            for s in SCALES:
                visual = nf.visual_sequence(model, fam, enc, s)
                ids = fam.prompt_ids(QUESTIONS[0], visual.shape[0], tok)
                seen.clear()
                nf.greedy_batch(model, [ids], [visual], model.config.image_token_id, eos_ids=[2], max_new_tokens=1)
                parts = fam.prompt_parts(QUESTIONS[0], tok)
                n_text = len(parts.before) + len(parts.after)
                assert visual.shape[0] == fam.n_visual_tokens(s, image_hw=hw) == ids.count(model.config.image_token_id)
                assert seen[0] == n_text + visual.shape[0]      # the prefill: text + every visual embedding
    finally:
        hook.remove()


def test_max_visual_tokens_picks_the_largest_scale_that_fits():
    fam = v16_family()
    assert fam.scale_within(2928, (672, 672)) == 576
    assert fam.scale_within(2927, (672, 672)) == 144
    assert fam.scale_within("200", (672, 672)) == 36
    assert fam.scale_within(7, (672, 672)) == 1
    # a wide 1x2 image needs fewer tokens at the same scale than a 2x2 one
    assert fam.scale_within(1800, (336, 672)) == 576 and fam.scale_within(1800, (672, 672)) == 144
    with pytest.raises(BudgetError, match="7"):
        fam.scale_within(6, (672, 672))


# --------------------------------------------------------------------------- collage


def test_collage_goes_through_the_next_family_as_one_image(hf):
    model, processor, fam, tok = hf
    colours = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230)]
    frames = [Image.new("RGB", (40, 24), c) for c in colours]            # 6 uniformly sampled keyframes
    sheet = collage(frames)
    assert sheet.size == (80, 72)                                        # 2 per row, 3 rows, row-major
    arr = np.asarray(sheet)
    assert [tuple(arr[12 + 24 * (i // 2), 20 + 40 * (i % 2)]) for i in range(6)] == colours
    question = collage_question(QUESTIONS[0])
    assert question.startswith(COLLAGE_PREFIX + ". Question: ")
    hw = A.image_hw(sheet)
    lay = fam.layout(hw)
    crops = fam.crops(sheet)
    assert len(crops) == lay.crops == (lay.tiles_high * lay.tiles_wide + 1) and lay.crops > 1
    enc = nf.encode_images(model, fam, [sheet])[0]
    assert enc.crops == lay.crops and enc.image_hw == (72, 80)
    got, n, ids = m3_answer(model, fam, tok, sheet, question, 576, enc=enc)
    assert n == fam.n_visual_tokens(576, image_hw=hw)
    assert ids.count(model.config.image_token_id) == n                  # one image: one run of placeholders
    inputs = processor(images=sheet, text=processor.apply_chat_template(ref15.hf_conversation(question),
                                                                        add_generation_prompt=True),
                       return_tensors="pt")
    assert ids == inputs["input_ids"][0].tolist() and got == stock_ids(model, inputs)
    assert COLLAGE_PREFIX in processor.tokenizer.decode(ids)


# --------------------------------------------------------------------------- recipes and errors


def test_fallback_recipes_from_config():
    assert fallback_recipe({"text_config": {"model_type": "mistral"}}) == "mistral_instruct"
    assert fallback_recipe({"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral"}) == \
        "mistral_instruct"
    assert fallback_recipe({"text_config": {"_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B",
                                            "model_type": "llama"}}) == "chatml_direct"
    assert fallback_recipe({"text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "model_type": "llama"}}) == \
        "vicuna_v1"


def test_family_refuses_bad_inputs(hf):
    fam = hf[2]
    pooled = [torch.zeros(9, 4) for _ in range(3)]
    newline = torch.ones(4)
    with pytest.raises(ValueError, match="height, width"):
        fam.visual_tokens(pooled, newline=newline)
    with pytest.raises(ValueError, match="image_newline"):
        fam.visual_tokens(pooled, image_hw=(40, 90))
    with pytest.raises(ValueError, match="3 crops"):
        fam.visual_tokens(pooled[:2], image_hw=(40, 90), newline=newline)
    with pytest.raises(ValueError, match="same scale"):
        fam.visual_tokens([torch.zeros(9, 4), torch.zeros(36, 4), torch.zeros(9, 4)], image_hw=(40, 90),
                          newline=newline)
    out = fam.visual_tokens([torch.zeros(3, 3, 4)] * 3, image_hw=(40, 90), newline=newline)  # (side, side, D) ok
    assert out.shape[0] == fam.n_visual_tokens(9, image_hw=(40, 90))
    assert np.asarray(fam.visual_tokens([np.zeros((9, 4), np.float32)] * 3, image_hw=(40, 90),
                                        newline=np.ones(4, np.float32))).shape == (30, 4)   # NumPy (llama.cpp)
    with pytest.raises(ValueError, match="image size"):
        fam.n_visual_tokens(9)
    from dataclasses import replace

    with pytest.raises(Exception, match="anyres"):
        LlavaNextFamily(replace(fam.spec, preprocess="pad"))
    with pytest.raises(Exception, match="multiple"):
        LlavaNextFamily(replace(fam.spec, grid_pinpoints=((48, 100),)))


def test_feature_path_refuses_what_it_cannot_pool(hf):
    model, _, fam, _ = hf
    pixels = nf.crop_pixels(fam.crops(scene(40, 90)), fam.spec.image)
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="default"):
            nf.encode_pixels(model, pixels)
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert tuple(nf.encode_pixels(model, pixels, batch_size=2).shape) == (3, 576, 64)   # chunked tower passes
    enc = nf.encode_images(model, fam, [scene(40, 90)])[0]
    visual = nf.visual_sequence(model, fam, enc, 9)
    with pytest.raises(ValueError, match="placeholders"):
        nf.embed_prompt(model, [1, 2, model.config.image_token_id], visual, model.config.image_token_id)


def test_tiny_latency_per_scale_is_reported(hf, capsys):
    """Not a benchmark: one timed answer per scale on the tiny model, printed for the docs' figure."""
    model, _, fam, tok = hf
    img = scene(80, 100)
    enc = nf.encode_images(model, fam, [img])[0]
    rows = []
    for s in SCALES:
        visual = nf.visual_sequence(model, fam, enc, s)
        ids = fam.prompt_ids(QUESTIONS[0], visual.shape[0], tok)
        start = time.perf_counter()
        [g] = nf.greedy_batch(model, [ids], [visual], model.config.image_token_id, eos_ids=[2], max_new_tokens=4)
        rows.append((s, visual.shape[0], round(g.prefill_ms, 2), round((time.perf_counter() - start) * 1000, 2)))
    assert [r[1] for r in rows] == [fam.n_visual_tokens(s, image_hw=(80, 100)) for s in SCALES]
    print(f"scale visual_tokens prefill_ms total_ms encode_ms={enc.encode_ms:.2f}", *rows, sep="\n")
