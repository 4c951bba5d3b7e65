"""Original-LLaVA layout -> HF LlavaForConditionalGeneration, checked through the real loader.

The tiny HF model from conftest is written back out the way haotian-liu/LLaVA stores a
checkpoint (``llava_llama`` config, ``model.mm_projector.{0,2}``, ``model.layers.*``, the CLIP
tower inside or in its own directory, a tokenizer without ``<image>``/``<pad>``), converted, and
compared with the model it came from.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from m3cli.backends.base import AnswerRequest
from m3cli.backends.torch import TorchBackend
from m3cli.convert.original_llava import convert_original_to_hf
from m3cli.errors import ConvertError

Q = "what colour is the background?"
N_ORIG = 372  # tiny vocabulary size; the converter appends <image> and <pad>


def _images():
    return [Image.new("RGB", (48, 48), (200, 30, 30)), Image.effect_noise((48, 48), 80).convert("RGB")]


def _split(sd):
    """Reference state dict -> (LM + projector in original names, CLIP tower in CLIP names)."""
    lm, tower = {}, {}
    for key, value in sd.items():
        value = value.detach().clone().contiguous()
        if key.startswith("model.language_model."):
            lm["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key.split("linear_")[1][0]]
            lm[f"model.mm_projector.{index}." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.vision_tower."):
            tower["vision_model." + key.removeprefix("model.vision_tower.")] = value
        elif key == "lm_head.weight":
            lm[key] = value
        else:
            raise AssertionError(key)
    lm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old checkpoints carry these
    return lm, tower


def _write_shards(folder, tensors, fmt):
    """Two shards + index, as LLaVA's checkpoints are stored."""
    keys = sorted(tensors)
    first = {k for k in keys if k.startswith(("model.embed_tokens", "model.layers.0."))}
    shards = [{k: tensors[k] for k in keys if k in first}, {k: tensors[k] for k in keys if k not in first}]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        if fmt == "safetensors":
            name = f"model-{i:05d}-of-00002.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _write_tokenizer(folder, tiny_dir):
    """The tiny tokenizer with <image> and <pad> renamed away (ids kept), like a plain Llama one."""
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    rename = {"<image>": "<extra_0>", "<pad>": "<unk>"}
    for tok in data["added_tokens"]:
        tok["content"] = rename.get(tok["content"], tok["content"])
    vocab = data["model"]["vocab"]
    for old, new in rename.items():
        vocab[new] = vocab.pop(old)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "padding_side": "right", "model_max_length": 2048,
    }))


def _write_tower_config(folder, ref, as_clip_model):
    vision = ref.model.config.vision_config.to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    if as_clip_model:  # openai/clip-* repos hold a full CLIPConfig
        config = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": vision,
                  "text_config": {"hidden_size": 8}}
    else:
        config = {**vision, "architectures": ["CLIPVisionModel"]}
    (folder / "config.json").write_text(json.dumps(config))
    ref.processor.image_processor.save_pretrained(folder)


def _write_original(folder, ref, tiny_dir, *, tower, fmt, drop=(), **overrides):
    """Write ``ref`` in the original LLaVA layout; ``tower`` is 'inside' or a CLIP dir to name."""
    folder.mkdir(parents=True)
    lm, clip = _split(ref.model.state_dict())
    if tower == "inside":
        lm.update({"model.vision_tower.vision_tower." + k: v for k, v in clip.items()})
        # transformers 4.3x CLIP kept this buffer in saved checkpoints
        lm["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    for key in drop:
        lm.pop(key)
    _write_shards(folder, lm, fmt)
    text = ref.model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"], "rope_scaling": None, "pretraining_tp": 1,
        "initializer_range": 0.02, "vocab_size": N_ORIG, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "tokenizer_model_max_length": 2048, "use_mm_proj": True,
        **overrides,
    }
    (folder / "config.json").write_text(json.dumps(config))
    _write_tokenizer(folder, tiny_dir)
    return clip


@pytest.fixture(scope="module")
def full_ref(tiny_backend, tiny_model_dir):
    """The saved model as transformers loads it (all tower layers), with the backend's processor.

    The backend's own copy runs without the vision layer LLaVA never reads, which a real original
    checkpoint still carries, so checkpoints are written from this one.
    """
    from types import SimpleNamespace

    from transformers import LlavaForConditionalGeneration

    full = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    return SimpleNamespace(model=full, processor=tiny_backend.processor)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, full_ref, tiny_model_dir):
    """(src with the tower inside, src without it, the separate CLIP dir)."""
    tiny_backend = full_ref
    root = tmp_path_factory.mktemp("original-llava")
    tower_cfg = root / "clip-config-only"
    _write_tower_config(tower_cfg, tiny_backend, as_clip_model=False)
    inside = root / "inside"
    _write_original(inside, tiny_backend, tiny_model_dir, tower="inside", fmt="safetensors",
                    mm_vision_tower=str(tower_cfg))
    outside = root / "outside"
    clip = _write_original(outside, tiny_backend, tiny_model_dir, tower="clip", fmt="bin")
    tower = root / "clip-vit-tiny"
    _write_tower_config(tower, tiny_backend, as_clip_model=True)
    clip["vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    clip["logit_scale"] = torch.tensor(2.0)
    save_file(clip, str(tower / "model.safetensors"))
    return inside, outside, tower


@pytest.fixture(scope="module")
def vicuna_ref(tiny_model_dir):
    """The source model with the prompt recipe a converted original checkpoint keeps (vicuna_v1)."""
    return TorchBackend(str(tiny_model_dir), device="cpu", chat_template="vicuna_v1")


def _check_converted(out, ref):
    backend = TorchBackend(str(out), device="cpu")
    assert backend.spec.preprocess == "pad" and backend.prompt.recipe_name == "vicuna_v1"
    tok = backend.tokenizer
    # tokens added, embeddings resized with mean rows
    assert tok.convert_tokens_to_ids("<image>") == N_ORIG == backend.image_token_id
    assert tok.convert_tokens_to_ids("<pad>") == N_ORIG + 1 == backend.pad_id
    assert len(tok) == N_ORIG + 2 == backend.model.config.text_config.vocab_size
    got, want = backend.model.state_dict(), ref.model.state_dict()
    assert set(got) == set(want)
    for key in want:
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert got[key].shape == (N_ORIG + 2, want[key].shape[1])
            assert torch.equal(got[key][:N_ORIG], want[key][:N_ORIG])
            mean = want[key][:N_ORIG].mean(0)
            assert torch.allclose(got[key][N_ORIG:], mean.expand(2, -1), atol=1e-6)
        else:
            assert torch.equal(got[key], want[key]), key
    # prompts: the vicuna_v1 recipe's text ids, <image> at its new id
    ref_ids = ref.prompt_ids(Q, 4)
    assert backend.prompt_ids(Q, 4) == [N_ORIG if i == ref.image_token_id else i for i in ref_ids]
    # encoded grids and greedy answers at the full grid (and one pooled scale)
    images = _images()
    enc, ref_enc = backend.encode(images), ref.encode(images)
    for a, b in zip(enc, ref_enc, strict=True):
        assert a.grid.shape == (576, 64)
        assert torch.allclose(a.grid, b.grid, atol=1e-6)
    for scale in (576, 36):
        ours = backend.answer([AnswerRequest(e, scale, Q, 6) for e in enc])
        theirs = ref.answer([AnswerRequest(e, scale, Q, 6) for e in ref_enc])
        assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
        assert [g.text for g in ours] == [g.text for g in theirs]
        assert all(g.token_ids for g in ours)
    readme = (out / "README.md").read_text()
    assert "image_aspect_ratio: pad" in readme
    return backend


def test_convert_with_tower_inside_checkpoint(originals, vicuna_ref, tmp_path):
    inside, _, _ = originals
    out = convert_original_to_hf(inside, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not list(tmp_path.glob(".hf.converting-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default" and config["image_seq_length"] == 576
    assert config["m3cli"]["prompt_recipe"] == "vicuna_v1" and config["m3cli"]["image_aspect_ratio"] == "pad"
    _check_converted(out, vicuna_ref)


def test_convert_with_separate_tower_dir(originals, vicuna_ref, tmp_path):
    _, outside, tower = originals
    out = convert_original_to_hf(outside, tmp_path / "hf", vision_tower=tower)
    _check_converted(out, vicuna_ref)


def test_dtype_cast(originals, tmp_path):
    inside, _, _ = originals
    out = convert_original_to_hf(inside, tmp_path / "bf16", dtype="bfloat16")
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _one_line_error(call, match):
    with pytest.raises(ConvertError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_errors_are_one_line(originals, tiny_backend, tiny_model_dir, tmp_path):
    inside, outside, tower = originals
    out = tmp_path / "out"
    _one_line_error(lambda: convert_original_to_hf(tmp_path / "nope", out), "not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: convert_original_to_hf(tmp_path / "empty", out), "no config.json")
    _one_line_error(lambda: convert_original_to_hf(tiny_model_dir, out), "already a Hugging Face LLaVA")

    plain = tmp_path / "plain-llama"
    shutil.copytree(inside, plain)
    cfg = json.loads((plain / "config.json").read_text())
    llama = {**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (plain / "config.json").write_text(json.dumps(llama))
    _one_line_error(lambda: convert_original_to_hf(plain, out), "not an original LLaVA-Llama")

    no_proj = tmp_path / "no-projector"
    _write_original(no_proj, tiny_backend, tiny_model_dir, tower="inside", fmt="safetensors",
                    drop=("model.mm_projector.2.weight", "model.mm_projector.2.bias"),
                    mm_vision_tower=str(tower))
    _one_line_error(lambda: convert_original_to_hf(no_proj, out), "projector weights missing")

    _one_line_error(lambda: convert_original_to_hf(outside, out), "no vision-tower weights")
    _one_line_error(lambda: convert_original_to_hf(outside, out, vision_tower=tmp_path / "x"), "not found")
    _one_line_error(lambda: convert_original_to_hf(inside, out, dtype="int8"), "unknown dtype")

    preset = tmp_path / "preset"  # tower inside, named by its hub id: the CLIP-L preset does not fit
    shutil.copytree(inside, preset)
    cfg = json.loads((preset / "config.json").read_text())
    (preset / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    _one_line_error(lambda: convert_original_to_hf(preset, out), "do not match")

    out.mkdir()
    (out / "x").write_text("x")
    _one_line_error(lambda: convert_original_to_hf(inside, out), "not empty")
    assert not list(tmp_path.glob(".out.converting-*"))


def test_tied_embeddings_without_lm_head(full_ref, tiny_model_dir, originals, tmp_path):
    _, _, tower = originals
    src = tmp_path / "tied"
    _write_original(src, full_ref, tiny_model_dir, tower="inside", fmt="safetensors",
                    drop=("lm_head.weight",), mm_vision_tower=str(tower), tie_word_embeddings=True)
    out = convert_original_to_hf(src, tmp_path / "hf")
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert model.lm_head.weight.shape[0] == N_ORIG + 2
