"""Tiny random-weight models laid out exactly like the real checkpoints users have.

Each builder writes files the way the real repositories hold them (names, keys, dtypes,
shards, tokenizer files, chat templates), only with tiny sizes: a CLIP tower with a 24x24
patch grid (48x48 images, patch 2) and a 2-layer Llama. Nothing here imports ``m3cli``:
these fixtures, and ``reference_llava15``, are independent of the code under test.

- ``build_llava_hf``: ``llava-hf/llava-1.5-7b-hf`` (SentencePiece tokenizer + ``<image>``/``<pad>``,
  vocabulary padded to a multiple of 64, the official chat template with ``{% generation %}``).
- ``build_original_llava``: ``liuhaotian/llava-v1.5-7b`` / ``mucai/llava-v1.5-7b-m3``
  (``LlavaLlamaForCausalLM``, bf16 shards + index, ``tokenizer.model`` only) and its CLIP tower dir.
- ``build_llava_hf_bpe``: a llava-hf directory with a byte-level BPE vocabulary (Qwen/ChatML-like).
- ``build_llamacpp_pair``: the GGUF pair llama.cpp users have (LM from llama.cpp's own
  ``convert_hf_to_gguf.py``, mmproj from its legacy LLaVA image-encoder converter), run as
  external tools from llama.cpp's sources (see ``find_llamacpp``).

All builders share one seed-driven set of weights, so ``build_llava_hf(seed=s)`` is the llava-hf
conversion of ``build_original_llava(seed=s)`` (same tower, projector and LM; the rows added
for ``<image>``/``<pad>``/padding are drawn close to the mean embedding, as llava-hf's converter does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data")
SPM_MODEL = DATA / "tiny_llama_spm.model"

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The chat template of llava-hf/llava-1.5-7b-hf (its chat_template.json), character for character.
# The same text is quoted as that file's in openvinotoolkit/openvino.genai and in transformers'
# own LLaVA processor tests. ``{% generation %}`` only marks the assistant span for training masks.
LLAVA15_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A ChatML template in the style of the Qwen-based llava-hf models, with a generation span.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny models: 48x48 images, patch 2 -> a 24x24 grid, as LLaVA-1.5's 336/14."""

    image_size: int = 48
    patch_size: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 2
    max_positions: int = 4096
    # Large enough that random answers depend on the image, the question and the scale.
    init_std: float = 0.3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class OriginalLayout:
    """An original-layout checkpoint and the CLIP tower directory its ``mm_vision_tower`` names."""

    model_dir: Path
    tower_dir: Path


@dataclass(frozen=True)
class GgufPair:
    """A language-model GGUF and its mmproj, as llama.cpp's converters wrote them."""

    lm: Path
    mmproj: Path


# --------------------------------------------------------------------------- tokenizers


def spm_model_path(cache_dir: str | Path | None = None) -> Path:
    """The tiny LLaMA-style ``tokenizer.model`` (committed; retrained into ``cache_dir`` if missing)."""
    if SPM_MODEL.is_file():
        return SPM_MODEL
    if cache_dir is None:
        raise FileNotFoundError(f"{SPM_MODEL} is missing; run tests/data/make_tiny_spm.py")
    return train_spm(Path(cache_dir) / SPM_MODEL.name)


def _spm_script():
    sys.path.insert(0, str(DATA))
    try:
        import make_tiny_spm
    finally:
        sys.path.remove(str(DATA))
    return make_tiny_spm


def train_spm(out: str | Path) -> Path:
    """Train the tiny SPM model with tests/data/make_tiny_spm.py into ``out`` (deterministic)."""
    return _spm_script().train(Path(out))


def spm_vocab_size() -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spm_model_path())).vocab_size()


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def _legacy_added_token(content: str) -> dict:
    # transformers 4.31-era serialisation, as in the original LLaVA/Vicuna repos (warns "__type" on load).
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_original_tokenizer(out_dir: Path) -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` as in
    liuhaotian/llava-v1.5-7b: no ``tokenizer.json``, AddedToken dicts with ``__type``, pad = unk."""
    shutil.copyfile(spm_model_path(), out_dir / "tokenizer.model")
    _write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _legacy_added_token(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": _legacy_added_token(EOS),
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _legacy_added_token(UNK),
    })
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(out_dir / "special_tokens_map.json", {
        "bos_token": {"content": BOS, **plain},
        "eos_token": {"content": EOS, **plain},
        "pad_token": UNK,
        "unk_token": {"content": UNK, **plain},
    })


def _v4_tokenizer_json(path: Path) -> None:
    """Rewrite a saved Llama ``tokenizer.json`` with the pipeline transformers 4.36 wrote (when the
    llava-hf repos were made): a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normaliser, no pre-tokenizer.
    transformers 5 rebuilds its own pipeline and ignores this; the raw ``tokenizers`` library does not."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]}
    data["pre_tokenizer"] = None
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_llava_hf_tokenizer(out_dir: Path, *, tokenizer_json: str = "v4") -> dict:
    """The llava-hf LLaVA-1.5 tokenizer files: the SPM model converted to a fast tokenizer, ``<image>``
    then ``<pad>`` added after the SPM vocabulary (as transformers' convert_llava_weights_to_hf.py does),
    ``tokenizer.model`` kept. Returns ``{"image": id, "pad": id, "n_tokens": len}``."""
    from transformers import AddedToken, AutoTokenizer

    src = out_dir / "_spm_src"
    src.mkdir()
    write_original_tokenizer(src)
    tok = AutoTokenizer.from_pretrained(src)
    shutil.rmtree(src)
    tok.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.save_pretrained(out_dir)
    ids = {"image": tok.convert_tokens_to_ids(IMAGE_TOKEN), "pad": tok.convert_tokens_to_ids(PAD_TOKEN),
           "n_tokens": len(tok)}
    shutil.copyfile(spm_model_path(), out_dir / "tokenizer.model")
    if tokenizer_json == "v4":
        _v4_tokenizer_json(out_dir / "tokenizer.json")
    decoder = {str(i): _added_token(t) for i, t in ((0, UNK), (1, BOS), (2, EOS))}
    decoder[str(ids["image"])] = _added_token(IMAGE_TOKEN)
    decoder[str(ids["pad"])] = _added_token(PAD_TOKEN)
    _write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": UNK,
        "use_default_system_prompt": False,
    })
    _write_json(out_dir / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD_TOKEN, "unk_token": UNK,
    })
    _write_json(out_dir / "added_tokens.json", {IMAGE_TOKEN: ids["image"], PAD_TOKEN: ids["pad"]})
    return ids


# --------------------------------------------------------------------------- weights


def _vision_config_dict(spec: TinySpec) -> dict:
    return {
        "hidden_size": spec.vision_hidden, "image_size": spec.image_size,
        "intermediate_size": spec.vision_intermediate, "model_type": "clip_vision_model",
        "num_attention_heads": spec.vision_heads, "num_hidden_layers": spec.vision_layers,
        "patch_size": spec.patch_size, "projection_dim": spec.vision_hidden, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    }


def _llama_fields(spec: TinySpec) -> dict:
    return {
        "hidden_act": "silu", "hidden_size": spec.text_hidden, "intermediate_size": spec.text_intermediate,
        "max_position_embeddings": spec.max_positions, "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers, "num_key_value_heads": spec.text_kv_heads,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    }


def random_llava_state(spec: TinySpec, n_base_vocab: int, n_total_vocab: int, seed: int = 0) -> dict:
    """Random weights of a LLaVA-1.5 in neutral names (``tower.*``, ``proj.{1,2}.*``, ``lm.*``), float32.

    ``lm.embed_tokens.weight`` and ``lm.lm_head.weight`` have ``n_total_vocab`` rows; rows from
    ``n_base_vocab`` on are near the mean of the others (so they almost never win the argmax)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(**_vision_config_dict(spec), initializer_range=spec.init_std))
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=n_total_vocab, tie_word_embeddings=False,
                                      initializer_range=spec.init_std, **_llama_fields(spec)))
    state = {}
    for k, v in vision.state_dict().items():
        if not k.endswith("position_ids"):
            state["tower." + k.removeprefix("vision_model.")] = v.detach().clone()
    for i, (n_in, n_out) in enumerate(((spec.vision_hidden, spec.text_hidden),
                                       (spec.text_hidden, spec.text_hidden)), start=1):
        state[f"proj.{i}.weight"] = torch.randn(n_out, n_in, generator=gen) * (n_in ** -0.5)
        state[f"proj.{i}.bias"] = torch.randn(n_out, generator=gen) * 0.1
    for k, v in lm.state_dict().items():
        if "rotary_emb" not in k:
            state["lm." + k.removeprefix("model.")] = v.detach().clone()
    for key in ("lm.embed_tokens.weight", "lm.lm_head.weight"):
        w = state[key]
        mean, spread = w[:n_base_vocab].mean(0), w[:n_base_vocab].std(0)
        extra = n_total_vocab - n_base_vocab
        w[n_base_vocab:] = mean + 1e-3 * spread * torch.randn(extra, w.shape[1], generator=gen)
    return state


def _rope_inv_freq(spec: TinySpec):
    import torch

    head_dim = spec.text_hidden // spec.text_heads
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _write_shards(tensors: dict, out_dir: Path, fmt: str, n_shards: int, dtype) -> list[Path]:
    """Write ``tensors`` (in their order) as ``n_shards`` shards plus the HF index file."""
    import torch

    keys = list(tensors)
    per = -(-len(keys) // n_shards)
    weight_map, paths, total = {}, [], 0
    for s in range(n_shards):
        part = {}
        for k in keys[s * per:(s + 1) * per]:
            t = tensors[k]
            part[k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
            total += part[k].numel() * part[k].element_size()
        if fmt == "safetensors":
            from safetensors.torch import save_file

            name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(part, str(out_dir / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(part, out_dir / name)
        weight_map.update(dict.fromkeys(part, name))
        paths.append(out_dir / name)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    _write_json(out_dir / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


_DTYPES = {"float16", "bfloat16", "float32"}


def _torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    return getattr(torch, name)


# --------------------------------------------------------------------------- CLIP tower


def _clip_tokenizer_files(out_dir: Path) -> None:
    """A minimal CLIP BPE vocabulary (bytes, bytes + ``</w>``, the two specials), enough for
    ``CLIPProcessor.from_pretrained`` as on openai/clip-vit-large-patch14-336."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    _write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", {
        "bos_token": "<|startoftext|>", "do_lower_case": True, "eos_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
    })
    _write_json(out_dir / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    })


def write_clip_tower(out_dir: str | Path, spec: TinySpec, state: dict, *, full_clip: bool = True) -> Path:
    """A CLIP tower directory like openai/clip-vit-large-patch14-336, scaled down.

    ``full_clip``: a two-tower ``CLIPModel`` (config, weights with ``text_model.*``, tokenizer files),
    as the real repository; otherwise a ``CLIPVisionModel``-only directory. Either way the vision keys
    are ``vision_model.*`` and ``preprocessor_config.json`` is in the old feature-extractor format."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision_cfg = _vision_config_dict(spec)
    tensors = {"vision_model." + k.removeprefix("tower."): v.float().contiguous()
               for k, v in state.items() if k.startswith("tower.")}
    tensors["vision_model.embeddings.position_ids"] = torch.arange(spec.grid ** 2 + 1)[None]
    if full_clip:
        from transformers import CLIPConfig, CLIPModel

        text_cfg = {"vocab_size": 514, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": spec.vision_hidden,
                    "hidden_act": "quick_gelu", "model_type": "clip_text_model",
                    "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 1}
        torch.manual_seed(1234)
        clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=spec.vision_hidden))
        for k, v in clip.state_dict().items():
            if not k.startswith("vision_model."):
                tensors[k] = v.detach().clone().contiguous()
        config = {"_name_or_path": "openai/clip-vit-large-patch14-336", "architectures": ["CLIPModel"],
                  "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
                  "projection_dim": spec.vision_hidden, "text_config": text_cfg, "torch_dtype": "float32",
                  "transformers_version": "4.21.3", "vision_config": vision_cfg}
        _clip_tokenizer_files(out)
    else:
        config = {"architectures": ["CLIPVisionModel"], **vision_cfg, "torch_dtype": "float32"}
    _write_json(out / "config.json", config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "preprocessor_config.json", {
        "crop_size": spec.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": spec.image_size,
    })
    return out


# --------------------------------------------------------------------------- llava-hf layout


def _hf_legacy_names(state: dict) -> dict:
    """Neutral names -> the key names in llava-hf's safetensors (made with transformers 4.36)."""
    out = {}
    for k, v in state.items():
        if k.startswith("tower."):
            out["vision_tower.vision_model." + k.removeprefix("tower.")] = v
        elif k.startswith("proj."):
            i, rest = k.removeprefix("proj.").split(".", 1)
            out[f"multi_modal_projector.linear_{i}.{rest}"] = v
        elif k == "lm.lm_head.weight":
            out["language_model.lm_head.weight"] = v
        else:
            out["language_model.model." + k.removeprefix("lm.")] = v
    return out


def _llava_hf_processor_files(out: Path, spec: TinySpec, template: str, template_file: str) -> None:
    _write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": CLIP_MEAN, "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD, "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": spec.image_size},
    })
    _write_json(out / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": spec.patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    })
    for stale in ("chat_template.json", "chat_template.jinja"):
        (out / stale).unlink(missing_ok=True)
    if template_file == "json":
        _write_json(out / "chat_template.json", {"chat_template": template})
    elif template_file == "jinja":
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template_file != "none":
        raise ValueError("template_file must be 'json', 'jinja' or 'none'")


def _llava_hf_config(spec: TinySpec, image_id: int, pad_id: int, vocab: int, dtype: str,
                     text_extra: dict | None = None) -> dict:
    text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
            "model_type": "llama", "torch_dtype": dtype, "vocab_size": vocab, **_llama_fields(spec)}
    text.update(text_extra or {})
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": image_id,
        "model_type": "llava",
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.36.0.dev0",
        "vision_config": {**_vision_config_dict(spec), "vocab_size": 32000},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }


def build_llava_hf(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, *, dtype: str = "float16",
                   template_file: str = "json", tokenizer_json: str = "v4") -> Path:
    """A llava-hf LLaVA-1.5 directory (as ``llava-hf/llava-1.5-7b-hf``), random weights; returns it.

    Files: config.json (4.36-era keys: ``image_token_index``, top-level ``vocab_size``), generation_config,
    2 safetensors shards + index with llava-hf's key names (``language_model.model.*``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}``), tokenizer.json +
    tokenizer.model + tokenizer_config/special_tokens_map/added_tokens, preprocessor_config
    (``CLIPImageProcessor``: resize the short side, centre crop), processor_config, and the official
    template in chat_template.json (``template_file="jinja"``: chat_template.jinja; ``"none"``: no template).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_llava_hf_tokenizer(out, tokenizer_json=tokenizer_json)
    n_base = spm_vocab_size()
    vocab = _padded(ids["n_tokens"])
    state = random_llava_state(spec, n_base, vocab, seed)
    _write_shards(_hf_legacy_names(state), out, "safetensors", 2, _torch_dtype(dtype))
    _write_json(out / "config.json", _llava_hf_config(spec, ids["image"], ids["pad"], vocab, dtype))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": ids["pad"],
        "transformers_version": "4.36.0.dev0",
    })
    _llava_hf_processor_files(out, spec, LLAVA15_HF_CHAT_TEMPLATE, template_file)
    return out


# --------------------------------------------------------------------------- original layout


def _original_names(state: dict, n_vocab: int, spec: TinySpec, *, tower_inside: bool,
                    stray_buffers: bool) -> dict:
    """Neutral names -> LlavaLlamaForCausalLM's keys, in the order the real shards hold them."""
    out = {}
    for k, v in state.items():
        if k.startswith("lm.") and k != "lm.lm_head.weight":
            name = "model." + k.removeprefix("lm.")
            out[name] = v[:n_vocab] if name == "model.embed_tokens.weight" else v
            if stray_buffers and name.endswith("self_attn.o_proj.weight"):
                out[name.replace("o_proj.weight", "rotary_emb.inv_freq")] = _rope_inv_freq(spec)
    for k, v in state.items():
        if k.startswith("proj."):
            i, rest = k.removeprefix("proj.").split(".", 1)
            out[f"model.mm_projector.{0 if i == '1' else 2}.{rest}"] = v
    if tower_inside:
        import torch

        for k, v in state.items():
            if k.startswith("tower."):
                out["model.vision_tower.vision_tower.vision_model." + k.removeprefix("tower.")] = v
        if stray_buffers:
            out["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = \
                torch.arange(spec.grid ** 2 + 1)[None]
    out["lm_head.weight"] = state["lm.lm_head.weight"][:n_vocab]
    return out


def original_config(spec: TinySpec, n_vocab: int, mm_vision_tower: str, *, model_type: str = "llava_llama",
                    dtype: str = "bfloat16") -> dict:
    """config.json of an original LLaVA-1.5 / M3 checkpoint (keys as liuhaotian/llava-v1.5-7b's)."""
    return {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "mm_hidden_size": spec.vision_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower,
        "model_type": model_type,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": n_vocab,
        **_llama_fields(spec),
    }


def build_original_llava(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, *,
                         weights: str = "safetensors", tower_inside: bool = True, stray_buffers: bool = True,
                         model_type: str = "llava_llama", mm_vision_tower: str | None = None,
                         full_clip_tower: bool = True, dtype: str = "bfloat16") -> OriginalLayout:
    """An original-layout LLaVA-1.5 checkpoint (``LlavaLlamaForCausalLM``), plus its CLIP tower dir.

    ``out_dir/model``: config.json, generation_config.json (Vicuna's: ``do_sample`` true), 2 shards +
    index (``weights="safetensors"`` or ``"bin"`` for ``pytorch_model-0000N-of-00002.bin``; the
    projector sits in the last shard, where llava_surgery.py looks), tokenizer.model +
    tokenizer_config.json + special_tokens_map.json only. ``tower_inside`` adds
    ``model.vision_tower.vision_tower.vision_model.*`` (as the M3 release); ``stray_buffers`` adds
    ``rotary_emb.inv_freq`` / ``position_ids``. ``out_dir/clip-vit-tiny-patch2-48``: the tower that
    ``mm_vision_tower`` names (its absolute path unless ``mm_vision_tower`` is given, e.g. a hub id).
    ``model_type="llava"`` gives liuhaotian/llava-v1.5-7b's value instead of the M3 release's."""
    if weights not in ("safetensors", "bin"):
        raise ValueError("weights must be 'safetensors' or 'bin'")
    root = Path(out_dir)
    model_dir, tower_dir = root / "model", root / "clip-vit-tiny-patch2-48"
    model_dir.mkdir(parents=True, exist_ok=True)
    n_vocab = spm_vocab_size()
    state = random_llava_state(spec, n_vocab, _padded(n_vocab + 2), seed)
    write_clip_tower(tower_dir, spec, state, full_clip=full_clip_tower)
    tensors = _original_names(state, n_vocab, spec, tower_inside=tower_inside, stray_buffers=stray_buffers)
    _write_shards(tensors, model_dir, weights, 2, _torch_dtype(dtype))
    ref = mm_vision_tower if mm_vision_tower is not None else str(tower_dir.resolve())
    _write_json(model_dir / "config.json", original_config(spec, n_vocab, ref, model_type=model_type, dtype=dtype))
    _write_json(model_dir / "generation_config.json", {
        "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
        "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.37.2",
    })
    write_original_tokenizer(model_dir)
    return OriginalLayout(model_dir=model_dir, tower_dir=tower_dir)


# --------------------------------------------------------------------------- byte-level BPE llava-hf


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The GPT-4 / Qwen2 pre-tokenizer split pattern.
_BPE_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_corpus() -> list[str]:
    return _spm_script().CORPUS.splitlines()


def build_llava_hf_bpe(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, *,
                       dtype: str = "float16") -> Path:
    """A llava-hf LLaVA-1.5-style directory whose tokenizer is byte-level BPE (Qwen2-like: GPT-4 split
    regex + byte-level, no BOS, ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads), ``<image>`` added
    after the vocabulary, vocabulary padded to a multiple of 64, a ChatML chat template with
    ``{% generation %}`` in chat_template.json. Same weights as ``build_llava_hf`` where sizes agree."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_BPE_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_bpe_corpus(), trainer=trainer)
    n_base = tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    fast.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    fast.save_pretrained(out)
    image_id, pad_id, eos_id = (fast.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, "<|endoftext|>", "<|im_end|>"))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update({"processor_class": "LlavaProcessor", "padding_side": "left", "bos_token": None,
                "add_bos_token": False, "model_max_length": 32768})
    _write_json(cfg_path, cfg)
    vocab = _padded(len(fast))
    state = random_llava_state(spec, n_base, vocab, seed)
    _write_shards(_hf_legacy_names(state), out, "safetensors", 2, _torch_dtype(dtype))
    config = _llava_hf_config(spec, image_id, pad_id, vocab, dtype,
                              {"_name_or_path": "Qwen-like/bpe-tiny", "bos_token_id": None, "eos_token_id": eos_id})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "transformers_version": "4.40.0",
    })
    _llava_hf_processor_files(out, spec, CHATML_IMAGE_TEMPLATE, "json")
    return out


# --------------------------------------------------------------------------- llama.cpp's converters

LLAMACPP_SRC_ENV = "M3_LLAMACPP_SRC"
# Where the README's test command (and .ci/run) puts the llama-cpp-python sdist with ``pip download``.
REPO_SDIST_DIR = Path(__file__).resolve().parents[1] / ".cache" / "llama-cpp-src"
LLAMACPP_SDIST = "llama-cpp-python==0.3.36"
LLAMACPP_HOWTO = (f"pip download --no-deps --no-binary :all: {LLAMACPP_SDIST} -d {REPO_SDIST_DIR} "
                  f"(or set {LLAMACPP_SRC_ENV} to a llama.cpp tree or that sdist)")


def _llamacpp_root(path: Path) -> Path | None:
    for cand in (path, path / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").is_file():
            return cand
    return None


def find_llamacpp(cache_dir: str | Path, *, allow_download: bool = False) -> Path | None:
    """A llama.cpp source tree holding ``convert_hf_to_gguf.py`` and the legacy LLaVA converter.

    Looked for in this order: ``$M3_LLAMACPP_SRC`` (a llama.cpp checkout, an unpacked
    llama-cpp-python sdist, or its ``.tar.gz``); a tree already unpacked under ``cache_dir``; a
    ``llama_cpp_python-*.tar.gz`` in ``<repo>/.cache/llama-cpp-src/`` (where the README's test command
    downloads it; unpacked once next to it and reused); with ``allow_download``, the llama-cpp-python
    sdist of the installed version fetched with ``pip download`` (its ``vendor/llama.cpp`` is the
    llama.cpp the wheel was built from). Returns None when none is found (:data:`LLAMACPP_HOWTO` says
    how to get it). Only the converter scripts are unpacked."""
    cache = Path(cache_dir)
    env = os.environ.get(LLAMACPP_SRC_ENV)
    if env:
        src = Path(env)
        if src.is_dir():
            return _llamacpp_root(src)
        if src.is_file() and src.name.endswith(".tar.gz"):
            return _unpack_converters(src, cache)
        return None
    for tree in sorted(cache.glob("llama_cpp_python-*")):
        if (root := _llamacpp_root(tree)) and _complete(root):
            return root
    tarballs = sorted(REPO_SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if tarballs:
        return _unpack_converters(tarballs[-1], REPO_SDIST_DIR)
    if not allow_download:
        return None
    try:
        from importlib.metadata import version

        wanted = f"llama-cpp-python=={version('llama_cpp_python')}"
    except Exception:
        wanted = "llama-cpp-python"
    dl = cache / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           wanted, "-d", str(dl)], capture_output=True, text=True)
    tarballs = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not tarballs:
        return None
    return _unpack_converters(tarballs[-1], cache)


_CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "tools/mtmd/legacy-models/",
                    "models/templates/", "examples/convert_legacy_llama.py")


def _complete(root: Path) -> bool:
    return all((root / f).exists() for f in _CONVERTER_FILES)


def _unpack_converters(tarball: Path, cache: Path) -> Path | None:
    """The converter scripts of ``tarball`` under ``cache/<sdist name>`` (unpacked once, atomically: a
    second process, or a later run, finds the complete tree and reuses it)."""
    import tempfile

    name = tarball.name.removesuffix(".tar.gz")
    if (root := _llamacpp_root(cache / name)) and _complete(root):
        return root
    if root:  # unpacked by an older version of this list: unpack again
        shutil.rmtree(cache / name, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    try:
        with tarfile.open(tarball) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 3)
                rel = parts[3] if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] else None
                if rel and (rel in _CONVERTER_FILES or rel.startswith(_CONVERTER_FILES)) and (m.isfile() or m.isdir()):
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        try:
            os.replace(tmp / name, cache / name)
        except OSError:  # another process got there first: use its tree
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _llamacpp_root(cache / name)


def _run_tool(args: list, cwd: Path | None = None, env_extra: dict | None = None) -> None:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{Path(str(args[0])).name} failed (exit {proc.returncode}):\n{tail}")


def llamacpp_convert_lm(llamacpp: Path, model_dir: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's own ``convert_hf_to_gguf.py`` on an HF directory (the LM of a llava-hf model)."""
    out_path = Path(out_path)
    _run_tool([llamacpp / "convert_hf_to_gguf.py", model_dir, "--outfile", out_path, "--outtype", outtype])
    return out_path


def write_llava_projector(model_dir: str | Path, out_path: str | Path) -> Path:
    """``llava.projector`` as llava_surgery.py writes it: the projector tensors as float32 under
    ``model.mm_projector.{0,2}.*``, taken from a llava-hf or an original-layout directory."""
    import torch
    from safetensors import safe_open

    model_dir = Path(model_dir)
    projector = {}
    for key, shard in index_weight_map(model_dir).items():
        name = key.replace("multi_modal_projector.linear_1", "model.mm_projector.0")
        name = name.replace("multi_modal_projector.linear_2", "model.mm_projector.2")
        if name.startswith("model.mm_projector."):
            with safe_open(str(model_dir / shard), "pt") as f:
                projector[name] = f.get_tensor(key).float()
    torch.save(projector, Path(out_path))
    return Path(out_path)


def llamacpp_convert_legacy_mmproj(llamacpp: Path, tower_dir: str | Path, projector: str | Path,
                                   out_dir: str | Path, *, use_f32: bool = False) -> Path:
    """Run llama.cpp's legacy ``convert_image_encoder_to_gguf.py`` (CLIP tower + ``llava.projector``),
    as its LLaVA-1.5 instructions say. Writes ``mmproj-model-f16.gguf`` (``-f32`` with ``use_f32``).
    Under transformers 5 only a two-tower CLIP directory works (``full_clip=True``, the default): the
    script's ``--clip-model-is-vision`` path reads ``CLIPVisionModel.vision_model``, gone in 5.x."""
    out_dir = Path(out_dir)
    script = llamacpp / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    args = [script, "-m", tower_dir, "--llava-projector", projector, "--output-dir", out_dir]
    if use_f32:
        args.append("--use-f32")
    if not (Path(tower_dir) / "vocab.json").is_file():
        args.append("--clip-model-is-vision")
    # The script does ``from gguf import *``: use the gguf-py that ships with the same llama.cpp.
    _run_tool(args, env_extra={"PYTHONPATH": os.pathsep.join([str(llamacpp / "gguf-py"),
                                                              os.environ.get("PYTHONPATH", "")])})
    return out_dir / f"mmproj-model-{'f32' if use_f32 else 'f16'}.gguf"


def extract_clip_tower(hf_dir: str | Path, out_dir: str | Path, *, full_clip: bool = True) -> Path:
    """The CLIP tower of a llava-hf directory written as its own tower directory (``write_clip_tower``)."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    vc = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["vision_config"]
    spec = TinySpec(image_size=vc["image_size"], patch_size=vc["patch_size"], vision_hidden=vc["hidden_size"],
                    vision_intermediate=vc["intermediate_size"], vision_layers=vc["num_hidden_layers"],
                    vision_heads=vc["num_attention_heads"])
    state = {}
    for key, shard in index_weight_map(hf_dir).items():
        if key.startswith("vision_tower.vision_model."):
            with safe_open(str(hf_dir / shard), "pt") as f:
                state["tower." + key.removeprefix("vision_tower.vision_model.")] = f.get_tensor(key).float()
    return write_clip_tower(out_dir, spec, state, full_clip=full_clip)


def index_weight_map(model_dir: str | Path) -> dict:
    """``weight_map`` of a directory's ``model.safetensors.index.json``."""
    index = Path(model_dir) / "model.safetensors.index.json"
    return json.loads(index.read_text(encoding="utf-8"))["weight_map"]


def build_llamacpp_pair(out_dir: str | Path, llamacpp: Path, hf_dir: str | Path, tower_dir: str | Path | None = None,
                        *, lm_outtype: str = "f32", mmproj_f32: bool = False) -> GgufPair:
    """The GGUF pair llama.cpp users have for a LLaVA-1.5: ``hf_dir`` (a llava-hf directory) through
    llama.cpp's ``convert_hf_to_gguf.py``, and a legacy mmproj (L-1 blocks, natural position order,
    no ``feature_layer``, no post-layernorm, F16 weights by default) from the CLIP tower and ``hf_dir``'s
    projector. ``tower_dir``: a CLIP tower directory (e.g. ``build_original_llava(seed=s).tower_dir``
    next to ``build_llava_hf(seed=s)``); default: the tower extracted from ``hf_dir``.
    The LM GGUF carries ``hf_dir``'s chat template verbatim; build ``hf_dir`` with
    ``template_file="none"`` for a GGUF without one (as the older liuhaotian-style GGUFs are)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tower_dir is None:
        tower_dir = extract_clip_tower(hf_dir, out / "clip-tower")
    lm = llamacpp_convert_lm(llamacpp, hf_dir, out / "ggml-model-f32.gguf" if lm_outtype == "f32"
                             else out / f"ggml-model-{lm_outtype}.gguf", lm_outtype)
    projector = write_llava_projector(hf_dir, out / "llava.projector")
    mmproj = llamacpp_convert_legacy_mmproj(llamacpp, tower_dir, projector, out, use_f32=mmproj_f32)
    projector.unlink()
    return GgufPair(lm=lm, mmproj=mmproj)
