"""Reading a saved Hugging Face LLaVA (CLIP tower, Llama LM, SentencePiece or byte-level BPE tokenizer) as NumPy.

Nothing here imports torch unless a checkpoint holds bf16 tensors, which NumPy cannot read. The tokenizer files
are classified by :func:`m3cli.convert.gguf_vocab.tokenizer_kind`; the chat template is optional (a GGUF
without one gets the family's recipe at load time, with a notice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3cli.convert.gguf_vocab import TokenizerFiles, tokenizer_kind
from m3cli.errors import ConvertError


@dataclass
class HFLlava:
    """What the converter needs from a saved ``LlavaForConditionalGeneration``."""

    path: Path
    config: dict
    vision: dict
    text: dict
    tensors: dict[str, np.ndarray]          # canonical names: vision.*, proj.*, lm.*, lm_head
    tokenizer: TokenizerFiles
    chat_template: str | None
    image_mean: list[float]
    image_std: list[float]
    extra: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: unreadable JSON ({exc})") from exc


def _canonical(name: str) -> str | None:
    """Map the key layouts transformers has used for LLaVA to one naming; None = ignore."""
    if name.endswith("lm_head.weight"):
        return "lm_head"
    for marker, prefix in (("vision_tower.", "vision."), ("multi_modal_projector.", "proj.")):
        if marker in name:
            rest = name.split(marker, 1)[1]
            if rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            return prefix + rest
    if "language_model." in name:
        rest = name.split("language_model.", 1)[1]
        if rest.startswith("model."):
            rest = rest[len("model."):]
        return "lm." + rest
    return None


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConvertError(f"{path}: no model.safetensors (only safetensors checkpoints are supported)")
    out: dict[str, np.ndarray] = {}
    for fname in files:
        try:
            with safe_open(str(path / fname), framework="np") as handle:
                for key in handle.keys():
                    canon = _canonical(key)
                    if canon is not None:
                        out[canon] = np.asarray(handle.get_tensor(key), dtype=np.float32)
        except (OSError, ValueError, TypeError) as exc:
            # bf16 tensors cannot be read as NumPy: fall back to torch for those files
            out.update(_load_with_torch(path / fname, exc))
    return out


def _load_with_torch(file: Path, first_error: Exception) -> dict[str, np.ndarray]:
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - torch is a project dependency
        raise ConvertError(f"{file}: cannot read ({first_error})") from exc
    try:
        state = load_file(str(file))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConvertError(f"{file}: cannot read safetensors ({exc})") from exc
    out = {}
    for key, value in state.items():
        canon = _canonical(key)
        if canon is not None:
            out[canon] = value.to(torch.float32).numpy()
    return out


def _chat_template(path: Path, tok_cfg: dict) -> str | None:
    for candidate in (path / "chat_template.jinja",):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    if isinstance(tok_cfg.get("chat_template"), str):
        return tok_cfg["chat_template"]
    for name in ("processor_config.json", "chat_template.json"):
        cfg = path / name
        if cfg.is_file():
            value = _read_json(cfg).get("chat_template")
            if isinstance(value, str):
                return value
    return None


def _image_norm(path: Path) -> tuple[list[float], list[float]]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        cfg_path = path / name
        if not cfg_path.is_file():
            continue
        cfg = _read_json(cfg_path)
        cfg = cfg.get("image_processor", cfg)
        if "image_mean" in cfg and "image_std" in cfg:
            return [float(v) for v in cfg["image_mean"]], [float(v) for v in cfg["image_std"]]
    raise ConvertError(f"{path}: no image processor config with image_mean/image_std")


def load_hf_llava(hf_dir: str | Path) -> HFLlava:
    """Read and validate a saved HF LLaVA (CLIP tower, 'default' strategy, Llama LM)."""
    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise ConvertError(f"model directory not found: {hf_dir}")
    if not (path / "config.json").is_file():
        raise ConvertError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    config = _read_json(path / "config.json")
    if config.get("model_type") != "llava":
        raise ConvertError(f"{hf_dir}: model_type {config.get('model_type')!r} is not 'llava' "
                           "(original-layout LLaVA checkpoints must be converted to transformers first)")
    vision = config.get("vision_config") or {}
    text = config.get("text_config") or {}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConvertError(f"{hf_dir}: vision tower {vision.get('model_type')!r} is not CLIP")
    if text.get("model_type", "llama") != "llama":
        raise ConvertError(f"{hf_dir}: language model {text.get('model_type')!r} is not Llama")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise ConvertError(f"{hf_dir}: only the 'default' feature strategy (CLS dropped) is supported")
    layer = config.get("vision_feature_layer", -2)
    n_vis = int(vision.get("num_hidden_layers", 0))
    if not isinstance(layer, int) or not (layer == -2 or layer == n_vis - 1):
        raise ConvertError(f"{hf_dir}: vision_feature_layer {layer!r} unsupported (only -2, as in LLaVA-1.5)")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{hf_dir}: projector activation {config.get('projector_hidden_act')!r} is not gelu")
    if vision.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise ConvertError(f"{hf_dir}: vision activation {vision.get('hidden_act')!r} unsupported")
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise ConvertError(f"{hf_dir}: Llama attention/MLP biases are not supported")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear"):
        raise ConvertError(f"{hf_dir}: rope type {rope_type!r} unsupported (default or linear only)")
    tokenizer = tokenizer_kind(path)
    tok_cfg = tokenizer.config
    template = _chat_template(path, tok_cfg)
    mean, std = _image_norm(path)
    tensors = _load_tensors(path)
    needed = ["vision.embeddings.patch_embedding.weight", "vision.embeddings.class_embedding",
              "vision.embeddings.position_embedding.weight", "proj.linear_1.weight", "proj.linear_2.weight",
              "lm.embed_tokens.weight", "lm.norm.weight"]
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ConvertError(f"{hf_dir}: checkpoint lacks {missing[0]} (not a CLIP + Llama LLaVA?)")
    return HFLlava(path, config, vision, text, tensors, tokenizer, template, mean, std,
                   extra={"tokenizer_config": tok_cfg, "rope": rope if isinstance(rope, dict) else {}})

