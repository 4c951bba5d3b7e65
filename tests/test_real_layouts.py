"""The real-layout fixtures (``real_layouts``) and the recipe reference (``reference_llava15``) are
what they claim: checked against the real file formats, stock transformers and llama.cpp's tools."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("sentencepiece")

import real_layouts as rl  # noqa: E402
import reference_llava15 as ref  # noqa: E402

QUESTIONS = ["What colours are there?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(rl.spm_model_path()))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return rl.build_llava_hf(tmp_path_factory.mktemp("llava-hf") / "llava-1.5-tiny-hf")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return rl.build_original_llava(tmp_path_factory.mktemp("original"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return rl.build_llava_hf_bpe(tmp_path_factory.mktemp("bpe") / "llava-bpe-tiny-hf")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def parts(original):
    return ref.load_original_parts(original.model_dir)


def wide_image():
    """1008x336-like (3:1): red left third, grey middle, blue right third."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (144, 48), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 47, 47), fill=(220, 20, 20))
    draw.rectangle((96, 0, 143, 47), fill=(20, 20, 220))
    return img


def square_image(side=96):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (30, 140, 40))
    draw = ImageDraw.Draw(img)
    draw.ellipse((side // 8, side // 8, side // 2, side // 2), fill=(240, 230, 20))
    draw.rectangle((side // 2, side // 2, side - 5, side - 9), fill=(200, 30, 200))
    return img


def index_of(model_dir):
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


# --------------------------------------------------------------------------- tokenizer


def test_spm_model_is_llama_like(sp, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(rl.spm_model_path().read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback and ts.split_digits
    assert ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"] and sp.pad_id() == -1
    assert sp.piece_to_id("\u2581") != sp.unk_id() and sp.id_to_piece(13) == "<0x0A>" and sp.is_byte(13)
    assert sp.encode("\nWhat", out_type=str)[:2] == ["\u2581", "<0x0A>"]        # dummy prefix, then the byte
    assert sp.encode("576", out_type=str) == ["\u2581", "5", "7", "6"]           # digits split
    assert sp.decode(sp.encode("naïve 😀")) == "naïve 😀"                         # byte fallback
    # The committed model is what the script trains.
    import sentencepiece as spm

    other = rl.train_spm(tmp_path / "again.model")

    sp2 = spm.SentencePieceProcessor(model_file=str(other))
    assert [sp2.id_to_piece(i) for i in range(sp2.vocab_size())] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]


# --------------------------------------------------------------------------- llava-hf layout


def test_llava_hf_files_and_config(hf_dir, sp):
    expected = {"added_tokens.json", "chat_template.json", "config.json", "generation_config.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json",
                "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}
    assert {p.name for p in hf_dir.iterdir()} == expected
    cfg = json.loads((hf_dir / "config.json").read_text())
    n = sp.vocab_size()
    assert cfg["image_token_index"] == n and cfg["pad_token_id"] == n + 1
    assert cfg["vocab_size"] == cfg["text_config"]["vocab_size"] == rl._padded(n + 2) and cfg["vocab_size"] % 64 == 0
    assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"]) == (-2, "default")
    assert json.loads((hf_dir / "added_tokens.json").read_text()) == {"<image>": n, "<pad>": n + 1}
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["legacy"] is False and tok_cfg["add_bos_token"] and tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert tok_cfg["added_tokens_decoder"][str(n)]["content"] == "<image>"
    proc = json.loads((hf_dir / "processor_config.json").read_text())
    assert (proc["patch_size"], proc["num_additional_image_tokens"], proc["vision_feature_select_strategy"]) == \
        (2, 1, "default")
    template = json.loads((hf_dir / "chat_template.json").read_text())["chat_template"]
    assert template == rl.LLAVA15_HF_CHAT_TEMPLATE and "{% generation %}" in template
    # Weights: llava-hf's own key names, fp16, two shards.
    keys = index_of(hf_dir)
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "multi_modal_projector.linear_2.bias" in keys and len(set(keys.values())) == 2
    from safetensors import safe_open

    with safe_open(str(hf_dir / keys["language_model.lm_head.weight"]), "pt") as f:
        w = f.get_tensor("language_model.lm_head.weight")
    assert str(w.dtype) == "torch.float16" and w.shape[0] == cfg["vocab_size"]
    # The tokenizer.json carries the 4.36-era pipeline and the SPM vocabulary id for id.
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    assert tj["normalizer"]["normalizers"][0] == {"type": "Prepend", "prepend": "\u2581"}
    assert tj["pre_tokenizer"] is None
    vocab = tj["model"]["vocab"]
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(n))


def test_llava_hf_loads_and_generates_stock(hf_model, sp):
    model, processor = hf_model
    n = sp.vocab_size()
    assert type(processor).__name__ == "LlavaProcessor" and model.config.image_token_id == n
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == n and processor.tokenizer.pad_token_id == n + 1
    text = "What colour is the background?"
    assert processor.tokenizer(text).input_ids == [1, *sp.encode(text)]
    conv = ref.hf_conversation(QUESTIONS[0])
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    answered = conv + [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    assert processor.apply_chat_template(answered) == f"USER: <image>\n{QUESTIONS[0]} ASSISTANT: Red. "
    inputs = ref.hf_inputs(processor, wide_image(), QUESTIONS[0])
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 48, 48)
    assert int((inputs["input_ids"] == n).sum()) == 576


def test_hf_reference_is_stock_generate_at_576(hf_model):
    model, processor = hf_model
    for q in QUESTIONS:
        inputs = ref.hf_inputs(processor, wide_image(), q)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:].tolist()
        out = out[:-1] if out and out[-1] == model.generation_config.eos_token_id else out
        assert ref.reference_hf_answer(model, processor, wide_image(), q, 576, 8) == out
    pooled = [ref.reference_hf_answer(model, processor, wide_image(), QUESTIONS[0], s, 8) for s in ref.SCALES]
    assert all(len(a) > 0 for a in pooled) and len({tuple(a) for a in pooled}) > 1


def test_llava_hf_template_variants_and_tower_extraction(tmp_path, original):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    jinja = rl.build_llava_hf(tmp_path / "jinja", template_file="jinja", tokenizer_json="v5")
    assert (jinja / "chat_template.jinja").read_text() == rl.LLAVA15_HF_CHAT_TEMPLATE
    assert AutoProcessor.from_pretrained(jinja).chat_template == rl.LLAVA15_HF_CHAT_TEMPLATE
    assert json.loads((jinja / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "Metaspace"
    bare = rl.build_llava_hf(tmp_path / "bare", template_file="none")
    assert not any(p.name.startswith("chat_template") for p in bare.iterdir())
    assert AutoProcessor.from_pretrained(bare).chat_template is None
    tower = rl.extract_clip_tower(bare, tmp_path / "tower")
    a, b = load_file(str(tower / "model.safetensors")), load_file(str(original.tower_dir / "model.safetensors"))
    vision = [k for k in b if k.startswith("vision_model.") and not k.endswith("position_ids")]
    assert vision and all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-3) for k in vision)


# --------------------------------------------------------------------------- original layout


def test_original_layout_files(original, sp):
    mdir, tdir = original.model_dir, original.tower_dir
    assert {p.name for p in mdir.iterdir()} == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"}
    cfg = json.loads((mdir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    assert {k: cfg[k] for k in ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
                                "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token",
                                "torch_dtype", "vocab_size", "mm_hidden_size")} == {
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "torch_dtype": "bfloat16", "vocab_size": sp.vocab_size(), "mm_hidden_size": 32}
    assert cfg["mm_vision_tower"] == str(tdir.resolve())
    keys = index_of(mdir)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.mm_projector.0.weight",
            "model.mm_projector.0.bias", "model.mm_projector.2.weight", "model.mm_projector.2.bias",
            "model.layers.1.self_attn.rotary_emb.inv_freq", "model.layers.0.mlp.down_proj.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"} <= set(keys)
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(set(keys.values())):
        tensors.update(load_file(str(mdir / shard)))
    assert set(tensors) == set(keys)
    assert {str(t.dtype) for k, t in tensors.items() if not k.endswith("position_ids")} == {"torch.bfloat16"}
    assert tensors["model.embed_tokens.weight"].shape == (sp.vocab_size(), 64)
    # Tokenizer: tokenizer.model + config with __type AddedTokens; loads (sentencepiece) and agrees.
    tok_cfg = json.loads((mdir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"]["__type"] == "AddedToken" and tok_cfg["pad_token"] is None
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    tok = AutoTokenizer.from_pretrained(mdir)
    text = "A chat between a curious user and an artificial intelligence assistant."
    assert tok(text).input_ids == [1, *sp.encode(text)]
    # The tower directory: a two-tower CLIP like openai's, readable as CLIPVisionModel.
    tower = CLIPVisionModel.from_pretrained(tdir)
    assert tower.config.image_size // tower.config.patch_size == 24
    ip = CLIPImageProcessor.from_pretrained(tdir)
    assert (ip.size["shortest_edge"], ip.crop_size["height"]) == (48, 48)
    assert tuple(int(x * 255) for x in ip.image_mean) == (122, 116, 104)


def test_original_bin_variant_and_options(tmp_path, original):
    import torch
    from safetensors.torch import load_file

    lay = rl.build_original_llava(tmp_path / "bin", weights="bin", tower_inside=False, stray_buffers=False,
                                  model_type="llava", mm_vision_tower="openai/clip-vit-large-patch14-336")
    names = {p.name for p in lay.model_dir.iterdir()}
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json"} <= names and not any(n.endswith(".safetensors") for n in names)
    cfg = json.loads((lay.model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    last = torch.load(lay.model_dir / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert "model.mm_projector.2.weight" in last                     # where llava_surgery.py looks
    bins = {**torch.load(lay.model_dir / "pytorch_model-00001-of-00002.bin", weights_only=True), **last}
    assert not any("vision_tower" in k or "inv_freq" in k for k in bins)
    safes = {}
    for shard in set(index_of(original.model_dir).values()):
        safes.update(load_file(str(original.model_dir / shard)))
    assert all(torch.equal(bins[k], safes[k]) for k in bins)       # same seed, same weights


def test_same_weights_in_both_layouts(original, hf_dir, sp):
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for shard in set(index_of(d).values()):
            out.update(load_file(str(d / shard)))
        return out

    o, h = load(original.model_dir), load(hf_dir)
    n = sp.vocab_size()
    pairs = [("model.mm_projector.0.weight", "multi_modal_projector.linear_1.weight"),
             ("model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.up_proj.weight"),
             ("model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
              "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")]
    for a, b in pairs:
        assert torch.allclose(o[a].float(), h[b].float(), rtol=1e-2, atol=1e-3), a
    emb_o, emb_h = o["model.embed_tokens.weight"].float(), h["language_model.model.embed_tokens.weight"].float()
    assert torch.allclose(emb_o, emb_h[:n], rtol=1e-2, atol=1e-3)
    # The added rows sit at the mean, as llava-hf's converter draws them: they never win the argmax here.
    assert torch.allclose(emb_h[n:], emb_o.mean(0).expand(emb_h.shape[0] - n, -1), atol=1e-2)


# --------------------------------------------------------------------------- reference pieces


@pytest.mark.parametrize("size", [(300, 480), (480, 300), (47, 101), (48, 48), (144, 48), (49, 50), (333, 97)])
def test_reference_pixels_equal_clip_processor(size):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                 image_mean=rl.CLIP_MEAN, image_std=rl.CLIP_STD)
    stock = proc(images=img, return_tensors="np")["pixel_values"][0]
    assert np.allclose(ref.reference_pixels(img, rl.CLIP_MEAN, rl.CLIP_STD, 48, pad=False), stock, atol=1e-5)
    padded = proc(images=ref.expand2square(img, (122, 116, 104)), return_tensors="np")["pixel_values"][0]
    assert np.allclose(ref.reference_pixels(img, rl.CLIP_MEAN, rl.CLIP_STD, 48), padded, atol=1e-5)


def test_expand2square_and_resize_rounding():
    from PIL import Image

    assert ref.mean_background(rl.CLIP_MEAN) == (122, 116, 104)
    wide = Image.new("RGB", (9, 4), (255, 0, 0))
    sq = np.asarray(ref.expand2square(wide, (1, 2, 3)))
    assert sq.shape == (9, 9, 3) and (sq[2:6] == (255, 0, 0)).all()
    assert (sq[:2] == (1, 2, 3)).all() and (sq[6:] == (1, 2, 3)).all()      # offset (9-4)//2 = 2 on top
    tall = np.asarray(ref.expand2square(Image.new("RGB", (3, 8), (0, 255, 0)), (7, 7, 7)))
    assert (tall[:, 2:5] == (0, 255, 0)).all() and (tall[:, :2] == 7).all() and (tall[:, 5:] == 7).all()
    assert ref.clip_resize_size(300, 480, 336) == (336, 537)                 # int(), not round(): 537.6
    assert ref.clip_resize_size(480, 300, 336) == (537, 336)
    # A wide image reaches the tower padded: the outer colours survive (a crop would keep only grey).
    px = ref.reference_pixels(wide_image(), rl.CLIP_MEAN, rl.CLIP_STD, 48)
    grey = (np.array([122, 116, 104]) / 255 - rl.CLIP_MEAN) / rl.CLIP_STD
    assert np.allclose(px[:, 0, 0], grey, atol=1e-5) and px[0, 24, 2] > 1.0 and px[2, 24, 45] > 1.0


def test_reference_prompt_ids(sp):
    ids = ref.reference_prompt_ids(rl.spm_model_path(), QUESTIONS[0], 9, 5000)
    first = ids.index(5000)
    assert ids[0] == 1 and ids.count(1) == 1 and ids[first:first + 9] == [5000] * 9 and ids.count(5000) == 9
    assert ids[first + 9:first + 11] == [sp.piece_to_id("\u2581"), 13]       # the piece's own dummy prefix
    before, after = sp.decode(ids[1:first]), sp.decode(ids[first + 9:])
    assert before == ref.VICUNA_V1_SYSTEM + " USER: " and after == f"\n{QUESTIONS[0]} ASSISTANT:"


def test_pool_grid_blocks_row_major():
    import torch

    grid = torch.arange(576 * 2, dtype=torch.float32).reshape(576, 2)
    assert torch.equal(ref.pool_grid(grid, 576), grid)
    p = ref.pool_grid(grid, 36)                                  # 4x4 blocks on the 24x24 grid
    rows = grid.reshape(24, 24, 2)
    assert torch.allclose(p[0], rows[:4, :4].reshape(-1, 2).mean(0))
    assert torch.allclose(p[1], rows[:4, 4:8].reshape(-1, 2).mean(0))   # next block to the right
    assert torch.allclose(p[6], rows[4:8, :4].reshape(-1, 2).mean(0))   # next block row
    assert torch.allclose(ref.pool_grid(grid, 1)[0], grid.mean(0))
    with pytest.raises(ValueError):
        ref.pool_grid(grid, 100)


# --------------------------------------------------------------------------- reference vs stock transformers


def hf_twin(parts, image_token_id=0):
    """The original checkpoint loaded, by hand, into a stock LlavaForConditionalGeneration."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=parts.tower.config.to_dict(), text_config=parts.lm.config.to_dict(),
                      image_token_id=image_token_id, vision_feature_layer=parts.select_layer,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=False)
    twin = LlavaForConditionalGeneration(cfg).eval()
    state = {"lm_head.weight": parts.lm.lm_head.weight}
    state.update({"model.language_model." + k: v for k, v in parts.lm.model.state_dict().items()})
    state.update({"model.vision_tower." + k: v for k, v in parts.tower.state_dict().items()})
    for i, j in (("linear_1", "0"), ("linear_2", "2")):
        for w in ("weight", "bias"):
            state[f"model.multi_modal_projector.{i}.{w}"] = parts.projector.state_dict()[f"{j}.{w}"]
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k or "rotary" in k for k in missing)
    twin.generation_config.eos_token_id = 2
    twin.generation_config.pad_token_id = 0
    return twin.to(torch.float32)


def test_reference_equals_stock_llava_on_square_image(parts):
    import torch

    twin = hf_twin(parts)
    img = square_image()
    pixels = torch.from_numpy(ref.reference_pixels(img, parts.image_mean, parts.image_std, 48, pad=False))[None]
    feats = ref.reference_features(parts, img)
    with torch.no_grad():
        stock_feats = twin.model.get_image_features(pixel_values=pixels).pooler_output
    stock_feats = stock_feats[0] if isinstance(stock_feats, (list, tuple)) else stock_feats.reshape(-1, 64)
    assert torch.allclose(feats, stock_feats.reshape(576, -1), atol=1e-5)
    for q in QUESTIONS:
        ids = ref.reference_prompt_ids(parts.spm_path, q, 576, 0)
        with torch.no_grad():
            # An explicit mask: the placeholder id (0, <unk>) is also the pad id, which generate would mask.
            mask = torch.ones(1, len(ids), dtype=torch.long)
            out = twin.generate(input_ids=torch.tensor([ids]), attention_mask=mask, pixel_values=pixels,
                                do_sample=False, max_new_tokens=8)[0, len(ids):].tolist()
        out = out[:-1] if out and out[-1] == 2 else out
        assert ref.reference_answer(parts, img, q, 576, 8) == out


def test_reference_answers_depend_on_padding_and_scale(parts):
    wide = [tuple(ref.reference_answer(parts, wide_image(), QUESTIONS[0], s, 6)) for s in ref.SCALES]
    assert len(set(wide)) >= 3
    parts.pad = False
    try:
        cropped = ref.reference_answer(parts, wide_image(), QUESTIONS[0], 576, 6)
    finally:
        parts.pad = True
    assert tuple(cropped) != wide[0]


# --------------------------------------------------------------------------- byte-level BPE layout


def test_bpe_layout(bpe_dir):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tj = json.loads((bpe_dir / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
    assert not (bpe_dir / "tokenizer.model").exists()
    cfg = json.loads((bpe_dir / "config.json").read_text())
    assert cfg["vocab_size"] % 64 == 0
    processor = AutoProcessor.from_pretrained(bpe_dir)
    tok = processor.tokenizer
    assert tok.bos_token is None and tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    assert tok("hello there").input_ids == tok.encode("hello there", add_special_tokens=False)   # no BOS
    conv = ref.hf_conversation(QUESTIONS[1])
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == \
        f"<|im_start|>user\n<image>\n{QUESTIONS[1]}<|im_end|>\n<|im_start|>assistant\n"
    assert "{% generation %}" in processor.chat_template
    model = LlavaForConditionalGeneration.from_pretrained(bpe_dir, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    inputs = ref.hf_inputs(processor, wide_image(), QUESTIONS[1])
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    out = out[:-1] if out and out[-1] == model.generation_config.eos_token_id else out
    assert ref.reference_hf_answer(model, processor, wide_image(), QUESTIONS[1], 576, 6) == out


# --------------------------------------------------------------------------- llama.cpp's own converters


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory):
    root = rl.find_llamacpp(tmp_path_factory.mktemp("llamacpp-src"),
                            allow_download=os.environ.get("M3_TEST_ALLOW_DOWNLOADS") == "1")
    if root is None:
        pytest.skip(f"llama.cpp's converter scripts not found: set {rl.LLAMACPP_SRC_ENV} to a llama.cpp tree or "
                    "the llama-cpp-python sdist (.tar.gz), or M3_TEST_ALLOW_DOWNLOADS=1 to fetch the sdist")
    return root


def test_llamacpp_pair(llamacpp, hf_dir, original, sp, tmp_path):
    gguf = pytest.importorskip("gguf")
    pair = rl.build_llamacpp_pair(tmp_path / "gguf", llamacpp, hf_dir, original.tower_dir)
    lm = gguf.GGUFReader(str(pair.lm))

    def field(reader, key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    n = sp.vocab_size()
    tokens = field(lm, "tokenizer.ggml.tokens")
    assert field(lm, "tokenizer.ggml.model") == "llama" and len(tokens) == rl._padded(n + 2)
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)] and tokens[n:n + 2] == ["<image>", "<pad>"]
    assert field(lm, "tokenizer.ggml.token_type")[n] == 3                    # CONTROL
    assert (field(lm, "tokenizer.ggml.bos_token_id"), field(lm, "tokenizer.ggml.eos_token_id"),
            field(lm, "tokenizer.ggml.padding_token_id"), field(lm, "tokenizer.ggml.add_bos_token")) == \
        (1, 2, n + 1, True)
    assert field(lm, "tokenizer.chat_template") == rl.LLAVA15_HF_CHAT_TEMPLATE      # verbatim, {% generation %}
    mm = gguf.GGUFReader(str(pair.mmproj))
    assert field(mm, "clip.vision.block_count") == 1 and "clip.vision.feature_layer" not in mm.fields
    assert field(mm, "clip.projector_type") == "mlp" and field(mm, "clip.use_gelu") is False
    names = {t.name: t for t in mm.tensors}
    assert "v.post_ln.weight" not in names and "v.blk.1.attn_q.weight" not in names
    from safetensors.torch import load_file

    tower = load_file(str(original.tower_dir / "model.safetensors"))
    pos = np.asarray(names["v.position_embd.weight"].data, np.float32)
    assert np.allclose(pos, tower["vision_model.embeddings.position_embedding.weight"].numpy(), atol=2e-3)
    # llama.cpp reads the converted vocabulary as SentencePiece does.
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=str(pair.lm), vocab_only=True, verbose=False)
    text = "What colour is the background? There are 3 shapes."
    assert vocab.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)]
