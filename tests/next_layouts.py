"""Tiny random-weight LLaVA-NeXT models laid out exactly like the real checkpoints users have.

Built on ``real_layouts`` (same seed-driven weights, tokenizers, CLIP tower with a 24x24 grid: 48 px images,
patch 2), with LLaVA-1.6's pinpoints scaled from 336 px to 48 px tiles. Nothing here imports ``m3cli``.

- ``build_llava_next_hf``: ``llava-hf/llava-v1.6-vicuna-7b-hf`` (``LlavaNextForConditionalGeneration``, keys
  ``language_model.*`` / ``vision_tower.*`` / ``multi_modal_projector.*`` / top-level ``image_newline`` as the
  4.39-era conversion wrote them, ``LlavaNextImageProcessor`` with ``image_grid_pinpoints`` as [height, width],
  ``LlavaNextProcessor`` with ``num_additional_image_tokens: 1``, the repository's chat template). With
  ``tokenizer="bpe"`` a byte-level BPE vocabulary and a ChatML template (as the 34B / Qwen-based ones).
- ``build_original_next``: ``mucai/llava-next-vicuna-7b-m3`` / ``liuhaotian/llava-v1.6-vicuna-7b``
  (``LlavaLlamaForCausalLM``, ``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``,
  ``image_grid_pinpoints`` read by that code as [width, height], ``model.image_newline`` in the shards, the
  tuned tower inside the checkpoint, ``tokenizer.model`` only) and the CLIP tower directory it names.

``build_llava_next_hf(seed=s)`` holds the same tower, projector, LM and newline as ``build_original_next(seed=s)``
(up to the fp16 / bf16 rounding of the files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import real_layouts as rl

# LLaVA-1.6's pinpoints (336x672, 672x336, 672x672, 1008x336, 336x1008) scaled to 48 px tiles. Symmetric, so
# the same list is valid read as [h, w] (transformers) or [w, h] (the original code); only ties differ.
TINY_PINPOINTS = [[48, 96], [96, 48], [96, 96], [144, 48], [48, 144]]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# llava-hf/llava-v1.6-mistral-7b-hf's chat template (its chat_template.json); the Vicuna one is llava-1.5's.
MISTRAL_NEXT_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text']"
    " + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
VICUNA_NEXT_HF_CHAT_TEMPLATE = rl.LLAVA15_HF_CHAT_TEMPLATE

TINY = rl.TinySpec()  # 48 px crops, patch 2: a 24x24 grid per crop, as CLIP-L/14 at 336


@dataclass(frozen=True)
class OriginalNext:
    """An original-layout NeXT checkpoint and the CLIP tower directory its ``mm_vision_tower`` names."""

    model_dir: Path
    tower_dir: Path


def newline_vector(spec: rl.TinySpec, seed: int):
    """The learned ``image_newline`` ``(text_hidden,)`` of seed ``seed``.

    Drawn with std 4/sqrt(D), four times LLaVA-NeXT's initialisation, so that the newline rows visibly steer the
    tiny model's answers (a wrong count or place of newlines changes them).
    """
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(spec.text_hidden, generator=gen) * spec.text_hidden ** -0.5 * 4


def _read_shards(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(set(rl.index_weight_map(model_dir).values())):
        tensors.update(load_file(str(model_dir / shard)))
        (model_dir / shard).unlink()
    (model_dir / "model.safetensors.index.json").unlink()
    return tensors


def _rewrite_with(model_dir: Path, extra: dict, dtype: str, after: str | None = None) -> None:
    """Rewrite ``model_dir``'s two safetensors shards with ``extra`` tensors added (after key ``after``)."""
    tensors = _read_shards(model_dir)
    out = {}
    for key, value in tensors.items():
        out[key] = value
        if key == after:
            out.update(extra)
    out.update({k: v for k, v in extra.items() if k not in out})
    rl._write_shards(out, model_dir, "safetensors", 2, rl._torch_dtype(dtype))


def _next_processor_files(out: Path, spec: rl.TinySpec, pinpoints: list, template: str | None) -> None:
    rl._write_json(out / "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres",
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_grid_pinpoints": pinpoints, "image_mean": rl.CLIP_MEAN,
        "image_processor_type": "LlavaNextImageProcessor", "image_std": rl.CLIP_STD,
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": spec.image_size},
    })
    rl._write_json(out / "processor_config.json", {
        "image_token": rl.IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": spec.patch_size,
        "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default",
    })
    for stale in ("chat_template.json", "chat_template.jinja"):
        (out / stale).unlink(missing_ok=True)
    if template is not None:
        rl._write_json(out / "chat_template.json", {"chat_template": template})
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["processor_class"] = "LlavaNextProcessor"
    rl._write_json(tok_cfg_path, tok_cfg)


def build_llava_next_hf(out_dir: str | Path, spec: rl.TinySpec = TINY, seed: int = 0, *,
                        dtype: str = "float16", pinpoints: list | None = None, tokenizer: str = "spm",
                        template: str | None = "default", tokenizer_json: str = "v4") -> Path:
    """A llava-hf LLaVA-NeXT directory (as ``llava-hf/llava-v1.6-vicuna-7b-hf``), random weights; returns it.

    ``pinpoints`` are [height, width] (default :data:`TINY_PINPOINTS`). ``tokenizer``: ``"spm"`` (the Vicuna /
    Mistral SentencePiece style, with the Vicuna template) or ``"bpe"`` (byte-level BPE, ChatML template).
    ``template``: ``"default"`` for the tokenizer's template, a template string, or None for none.
    ``tokenizer_json`` (SPM only): ``"v4"``, the 4.36-4.39-era pipeline the llava-hf repositories hold (a
    ``Prepend("▁")`` normaliser, which transformers 5 keeps, so a ``▁`` follows every special token such as
    ``<image>``), or ``"v5"`` (transformers 5's Metaspace pipeline: no ``▁`` after a special token).
    """
    out = Path(out_dir)
    pins = [list(p) for p in (pinpoints or TINY_PINPOINTS)]
    if tokenizer == "spm":
        rl.build_llava_hf(out, spec, seed, dtype=dtype, template_file="none", tokenizer_json=tokenizer_json)
        default_template = VICUNA_NEXT_HF_CHAT_TEMPLATE
    elif tokenizer == "bpe":
        rl.build_llava_hf_bpe(out, spec, seed, dtype=dtype)
        default_template = rl.CHATML_IMAGE_TEMPLATE
    else:
        raise ValueError("tokenizer must be 'spm' or 'bpe'")
    _rewrite_with(out, {"image_newline": newline_vector(spec, seed)}, dtype)
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg.update({
        "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": pins,
        "model_type": "llava_next",
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
    })
    rl._write_json(out / "config.json", cfg)
    _next_processor_files(out, spec, pins, default_template if template == "default" else template)
    return out


def original_next_config(spec: rl.TinySpec, n_vocab: int, mm_vision_tower: str, pinpoints: list) -> dict:
    """config.json of an original LLaVA-NeXT / M3-NeXT checkpoint (keys as mucai/llava-next-vicuna-7b-m3's)."""
    cfg = rl.original_config(spec, n_vocab, mm_vision_tower)
    cfg.update({
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": pinpoints,
        "image_split_resolution": 224,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_resampler_type": None,
        "mm_vision_tower_lr": 2e-06,
        "tokenizer_model_max_length": 4096,
        "unfreeze_mm_vision_tower": True,
    })
    return cfg


def build_original_next(out_dir: str | Path, spec: rl.TinySpec = TINY, seed: int = 0, *,
                        pinpoints: list | None = None, dtype: str = "bfloat16",
                        stray_buffers: bool = True) -> OriginalNext:
    """An original-layout LLaVA-NeXT checkpoint (``LlavaLlamaForCausalLM``, anyres) plus its CLIP tower dir.

    ``pinpoints`` are as the original config stores them, read by that code as [width, height] (default
    :data:`TINY_PINPOINTS`). ``out_dir/model`` holds config.json, generation_config.json, two shards + index with
    ``model.image_newline`` after the projector and the tower inside, tokenizer.model + tokenizer_config.json.
    """
    pins = [list(p) for p in (pinpoints or TINY_PINPOINTS)]
    lay = rl.build_original_llava(out_dir, spec, seed, dtype=dtype, stray_buffers=stray_buffers)
    _rewrite_with(lay.model_dir, {"model.image_newline": newline_vector(spec, seed)}, dtype,
                  after="model.mm_projector.2.weight")
    cfg = json.loads((lay.model_dir / "config.json").read_text(encoding="utf-8"))
    new = original_next_config(spec, cfg["vocab_size"], cfg["mm_vision_tower"], pins)
    rl._write_json(lay.model_dir / "config.json", new)
    return OriginalNext(model_dir=lay.model_dir, tower_dir=lay.tower_dir)


def hf_twin_of_original(model_dir: str | Path, tower_dir: str | Path, *, pinpoints_hw: list, image_token_id: int):
    """The original NeXT checkpoint loaded, by hand, into a stock float32 ``LlavaNextForConditionalGeneration``.

    ``pinpoints_hw``: the original pinpoints converted to [height, width] (each pair swapped, order kept), so that
    transformers' resolution choice and tie-breaking are the original code's. One embedding row is added for the
    image placeholder at ``image_token_id`` (= the original vocabulary size), its ``lm_head`` row the mean of the
    others (whose logit never wins the argmax), as llava-hf's converter does.
    """
    import reference_llava15 as ref
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in ref.read_checkpoint(model_dir).items()}
    tower_cfg = json.loads((Path(tower_dir) / "config.json").read_text(encoding="utf-8"))
    vision = CLIPVisionConfig(**tower_cfg.get("vision_config", tower_cfg))
    n = int(cfg["vocab_size"])
    if image_token_id != n:
        raise ValueError("the placeholder row is appended: image_token_id must be the vocabulary size")
    llama_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act")
    text = LlamaConfig(**{k: cfg[k] for k in llama_keys}, vocab_size=n + 1, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_grid_pinpoints=[list(p) for p in pinpoints_hw], image_token_id=image_token_id,
                             vision_feature_layer=int(cfg["mm_vision_select_layer"]),
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             tie_word_embeddings=False)
    twin = LlavaNextForConditionalGeneration(config).eval()
    emb, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    state = {
        "lm_head.weight": torch.cat([head, head.mean(0, keepdim=True)]),
        "model.language_model.embed_tokens.weight": torch.cat([emb, emb.mean(0, keepdim=True)]),
        "model.image_newline": tensors["model.image_newline"],
    }
    inside = "model.vision_tower.vision_tower."
    for key, value in tensors.items():
        if key.startswith(inside) and not key.endswith("position_ids"):
            # transformers 5's tower has no ``vision_model.`` level of its own
            state["model.vision_tower." + key.removeprefix(inside).removeprefix("vision_model.")] = value
        elif key.startswith("model.mm_projector."):
            i, rest = key.removeprefix("model.mm_projector.").split(".", 1)
            state[f"model.multi_modal_projector.linear_{1 if i == '0' else 2}.{rest}"] = value
        elif key.startswith(("model.layers.", "model.norm.")) and "rotary_emb" not in key:
            state["model.language_model." + key.removeprefix("model.")] = value
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if unexpected or any("position_ids" not in k and "rotary" not in k for k in missing):
        raise RuntimeError(f"twin load: missing {missing}, unexpected {unexpected}")
    twin.generation_config.eos_token_id = int(cfg.get("eos_token_id", 2))
    twin.generation_config.pad_token_id = 0
    return twin.to(torch.float32)


def build_llamacpp_next_pair(out_dir: str | Path, llamacpp: Path, original: OriginalNext,
                             spec: rl.TinySpec = TINY) -> rl.GgufPair:
    """The GGUF pair llama.cpp's own LLaVA-1.6 instructions make from an original-layout NeXT checkpoint.

    ``docs/multimodal/llava.md``, "LLaVA 1.6 gguf conversion": ``llava_surgery_v2.py -C`` on a copy of the
    checkpoint (``llava.clip``: the tuned tower from inside it; ``llava.projector``: the projector and
    ``model.image_newline``), a tower directory with those weights whose config carries the 1.6 keys of
    llama.cpp's ``config_vit.json`` (pinpoints as the checkpoint stores them, ``spatial_unpad``, ``anyres``),
    ``convert_image_encoder_to_gguf.py`` (legacy mmproj: F16, L-1 blocks, the pinpoints flattened) and
    ``examples/convert_legacy_llama.py --skip-unknown`` for the language model (F32). The tower directory is a
    two-tower CLIP one (see :func:`real_layouts.llamacpp_convert_legacy_mmproj`: the vision-only path of the
    script does not run under transformers 5), its ``vision_config`` holding what ``config_vit.json`` holds.
    """
    import shutil

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "llava-v1.6-tiny"
    shutil.copytree(original.model_dir, model)
    rl._run_tool([llamacpp / "tools" / "mtmd" / "legacy-models" / "llava_surgery_v2.py", "-C", "-m", model])
    clip = torch.load(model / "llava.clip", weights_only=True)
    tower = {"tower." + k.removeprefix("vision_model."): v for k, v in clip.items() if k.startswith("vision_model.")}
    vit = rl.write_clip_tower(out / "vit", spec, tower, full_clip=True)
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    vit_cfg = json.loads((vit / "config.json").read_text(encoding="utf-8"))
    vit_cfg["vision_config"].update({
        "image_grid_pinpoints": cfg["image_grid_pinpoints"], "mm_patch_merge_type": cfg["mm_patch_merge_type"],
        "image_aspect_ratio": cfg["image_aspect_ratio"], "image_crop_resolution": cfg["image_crop_resolution"],
        "image_split_resolution": cfg["image_split_resolution"], "mm_projector_type": cfg["mm_projector_type"],
    })
    rl._write_json(vit / "config.json", vit_cfg)
    mmproj = rl.llamacpp_convert_legacy_mmproj(llamacpp, vit, model / "llava.projector", out)
    for name in ("llava.clip", "llava.projector"):
        (model / name).unlink()
    lm = out / "ggml-model-f32.gguf"
    rl._run_tool([llamacpp / "examples" / "convert_legacy_llama.py", model, "--skip-unknown", "--outtype", "f32",
                  "--outfile", lm],
                 env_extra={"PYTHONPATH": str(llamacpp / "gguf-py")})
    return rl.GgufPair(lm=lm, mmproj=mmproj)
