"""Hugging Face LLaVA -> GGUF: a ``llama`` language model file and a ``clip`` mmproj file.

The mmproj is written in the layout that makes llama.cpp's stock LLaVA encoder (which appends
CLS after the patches and runs one layer fewer than the file's block count) return features
equal to Hugging Face's ``hidden_states[-2]`` with CLS dropped:

* all L vision blocks, ``block_count = L`` and ``feature_layer = [L-1]`` (L-1 layers run);
* no post-layernorm (the graph would apply it);
* position rows permuted ``[1, 2, ..., N, 0]`` so every token reads its own position; the
  encoder then returns HF's patches 1..N-1 followed by the projected CLS (patch 0 is lost);
* optionally a companion ``*.rot180.gguf`` (kernel rotated 180 degrees, positions reversed)
  that, fed the image rotated 180 degrees, recovers patch 0 exactly.

The layout is recorded in the key ``m3cli.mmproj.layout`` so the backend can tell our files from
legacy ones. Nothing here imports torch; tensors are read with ``safetensors`` as NumPy arrays.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3cli.convert.errors import ConvertError  # noqa: F401  (re-exported)

LAYOUT_KEY = "m3cli.mmproj.layout"
VARIANT_KEY = "m3cli.mmproj.variant"
LAYOUT_CLS_LAST = "cls_last"   # positions [1..N, 0]: for builds that append CLS after the patches
LAYOUT_NATURAL = "natural"     # positions [0..N]: legacy files and (future) fixed builds
VARIANT_MAIN = "main"
VARIANT_ROT180 = "rot180"
ROT_SUFFIX = ".rot180.gguf"
OUTTYPES = ("f32", "f16", "q8_0")




# ---------------------------------------------------------------------------------------------
# reading the Hugging Face directory
# ---------------------------------------------------------------------------------------------
@dataclass
class HFLlava:
    """What the converter needs from a saved ``LlavaForConditionalGeneration``."""

    path: Path
    config: dict
    vision: dict
    text: dict
    tensors: dict[str, np.ndarray]          # canonical names: vision.*, proj.*, lm.*, lm_head
    tokenizer: dict
    chat_template: str
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


def _chat_template(path: Path, tok_cfg: dict) -> str:
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
    raise ConvertError(f"{path}: no chat template (chat_template.jinja or tokenizer_config.json)")


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
    if not (path / "tokenizer.json").is_file():
        raise ConvertError(f"{hf_dir}: no tokenizer.json (a fast byte-level BPE tokenizer is required)")
    tokenizer = _read_json(path / "tokenizer.json")
    model = tokenizer.get("model") or {}
    pre = tokenizer.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not _is_byte_level(pre):
        raise ConvertError(f"{hf_dir}: tokenizer is not byte-level BPE (llama.cpp 'gpt2' model)")
    tok_cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
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


def _is_byte_level(pre: dict) -> bool:
    if pre.get("type") == "ByteLevel":
        return True
    if pre.get("type") == "Sequence":
        return any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))
    return False


# ---------------------------------------------------------------------------------------------
# GGUF writing helpers (shared with mmproj_fix)
# ---------------------------------------------------------------------------------------------
def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ConvertError("the 'gguf' package is not installed (pip install gguf)") from exc
    return gguf


def write_gguf(path: Path, arch: str, kv: list[tuple[str, Any, Any, Any]],
               tensors: list[tuple[str, np.ndarray, Any]]) -> Path:
    """Write ``kv`` = [(key, value, GGUFValueType, sub_type)] and ``tensors`` = [(name, array, raw_dtype)].

    Arrays are in NumPy (torch) dimension order; the gguf writer reverses them into ggml's ne.
    ``raw_dtype`` is None for F32/F16 arrays, or the GGML type of a pre-quantised uint8 array.
    """
    gguf = _gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, value, vtype, sub in kv:
            if key == "general.architecture":
                continue
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, array, raw in tensors:
            writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)
    return path


class _KV:
    """Typed key/value collector."""

    def __init__(self):
        self.gguf = _gguf()
        self.items: list[tuple[str, Any, Any, Any]] = []

    def add(self, key: str, value: Any, vtype: str, sub: str | None = None) -> None:
        T = self.gguf.GGUFValueType
        self.items.append((key, value, getattr(T, vtype), getattr(T, sub) if sub else None))


# ---------------------------------------------------------------------------------------------
# mmproj
# ---------------------------------------------------------------------------------------------
def position_order(n_patches: int, layout: str) -> np.ndarray:
    """Row order of the stored position table for a layout (index into HF's natural table)."""
    if layout == LAYOUT_NATURAL:
        return np.arange(n_patches + 1)
    if layout == LAYOUT_CLS_LAST:
        return np.concatenate([np.arange(1, n_patches + 1), [0]])
    if layout == VARIANT_ROT180:   # reversed: slot k reads HF row N-k (patch N-1-k); CLS slot reads 0
        return np.arange(n_patches, -1, -1)
    raise ValueError(layout)


def mmproj_tensors_from_hf(m: HFLlava) -> dict[str, np.ndarray]:
    """The mmproj tensors in natural (HF) order, float32, with all L blocks."""
    t = m.tensors
    out = {
        "v.patch_embd.weight": t["vision.embeddings.patch_embedding.weight"],
        "v.class_embd": t["vision.embeddings.class_embedding"],
        "v.position_embd.weight": t["vision.embeddings.position_embedding.weight"],
    }
    if "vision.pre_layrnorm.weight" in t:
        out["v.pre_ln.weight"] = t["vision.pre_layrnorm.weight"]
        out["v.pre_ln.bias"] = t["vision.pre_layrnorm.bias"]
    n_layers = int(m.vision["num_hidden_layers"])
    hidden = int(m.vision["hidden_size"])
    ff = int(m.vision["intermediate_size"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    if ff == hidden:
        # llama.cpp swaps ffn_up/ffn_down of llava mmprojs whose ffn_down has ne[0] == n_embd;
        # with square FFNs that is always true, so store them pre-swapped.
        names["mlp.fc1"], names["mlp.fc2"] = "ffn_down", "ffn_up"
    for i in range(n_layers):
        for hf, gg in names.items():
            for part in ("weight", "bias"):
                key = f"vision.encoder.layers.{i}.{hf}.{part}"
                if key not in t:
                    raise ConvertError(f"{m.path}: checkpoint lacks {key}")
                out[f"v.blk.{i}.{gg}.{part}"] = t[key]
    out["mm.0.weight"] = t["proj.linear_1.weight"]
    out["mm.0.bias"] = t.get("proj.linear_1.bias", np.zeros(t["proj.linear_1.weight"].shape[0], np.float32))
    out["mm.2.weight"] = t["proj.linear_2.weight"]
    out["mm.2.bias"] = t.get("proj.linear_2.bias", np.zeros(t["proj.linear_2.weight"].shape[0], np.float32))
    return out


def apply_layout(tensors: dict[str, np.ndarray], n_patches: int, layout: str) -> dict[str, np.ndarray]:
    """Reorder positions (and rotate the patch kernel for the rot180 variant) from natural order."""
    out = dict(tensors)
    pos = tensors["v.position_embd.weight"]
    if pos.shape[0] < n_patches + 1:
        raise ConvertError(f"position table has {pos.shape[0]} rows, needs {n_patches + 1}")
    pos = pos[: n_patches + 1]
    out["v.position_embd.weight"] = np.ascontiguousarray(pos[position_order(n_patches, layout)])
    if layout == VARIANT_ROT180:
        out["v.patch_embd.weight"] = np.ascontiguousarray(tensors["v.patch_embd.weight"][:, :, ::-1, ::-1])
    return out


def mmproj_kv(*, name: str, image_size: int, patch_size: int, hidden: int, ff: int, n_blocks: int,
              n_heads: int, eps: float, proj_dim: int, mean: list[float], std: list[float],
              use_gelu: bool, file_type: int, layout: str, variant: str) -> list:
    kv = _KV()
    kv.add("general.name", name, "STRING")
    kv.add("general.file_type", file_type, "UINT32")
    kv.add("general.description", "LLaVA CLIP tower + MLP projector (m3cli layout)", "STRING")
    kv.add("clip.has_vision_encoder", True, "BOOL")
    kv.add("clip.has_text_encoder", False, "BOOL")
    kv.add("clip.has_llava_projector", True, "BOOL")
    kv.add("clip.projector_type", "mlp", "STRING")
    kv.add("clip.use_gelu", bool(use_gelu), "BOOL")
    kv.add("clip.vision.image_size", image_size, "UINT32")
    kv.add("clip.vision.patch_size", patch_size, "UINT32")
    kv.add("clip.vision.embedding_length", hidden, "UINT32")
    kv.add("clip.vision.feed_forward_length", ff, "UINT32")
    kv.add("clip.vision.block_count", n_blocks, "UINT32")
    kv.add("clip.vision.projection_dim", proj_dim, "UINT32")
    kv.add("clip.vision.attention.head_count", n_heads, "UINT32")
    kv.add("clip.vision.attention.layer_norm_epsilon", float(eps), "FLOAT32")
    kv.add("clip.vision.image_mean", [float(v) for v in mean], "ARRAY", "FLOAT32")
    kv.add("clip.vision.image_std", [float(v) for v in std], "ARRAY", "FLOAT32")
    # LLaVA reads hidden_states[-2]: run n_blocks-1 layers, explicitly.
    kv.add("clip.vision.feature_layer", [n_blocks - 1], "ARRAY", "INT32")
    kv.add(LAYOUT_KEY, layout, "STRING")
    kv.add(VARIANT_KEY, variant, "STRING")
    return kv.items


def mmproj_tensor_list(tensors: dict[str, np.ndarray], dtype: str) -> list:
    """Order tensors and cast: F32 everywhere, or F16 for matrices (positions/class stay F32)."""
    out = []
    for name, arr in tensors.items():
        arr = np.asarray(arr, dtype=np.float32)
        if dtype == "f16" and arr.ndim >= 2 and name != "v.position_embd.weight":
            arr = arr.astype(np.float16)
        out.append((name, arr, None))
    return out


def rot180_path(mmproj_path: str | Path) -> Path:
    """The companion file that recovers patch 0: ``x-mmproj-f32.gguf`` -> ``x-mmproj-f32.rot180.gguf``."""
    p = Path(mmproj_path)
    return p.with_name(p.name[: -len(".gguf")] + ROT_SUFFIX if p.name.endswith(".gguf") else p.name + ROT_SUFFIX)


# ---------------------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------------------
def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary pairs dims (i, i + d/2) of each head; llama.cpp's llama rope pairs (2i, 2i+1).

    Reorder each head's output rows so row 2i is old row i and row 2i+1 is old row i + d/2.
    """
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _tokenizer_kv(kv: _KV, m: HFLlava, n_vocab_rows: int) -> None:
    tok = m.tokenizer
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special_ids = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        if added.get("special", False):
            special_ids.add(int(added["id"]))
    size = max(max(vocab.values()) + 1, n_vocab_rows)
    if size != n_vocab_rows:
        raise ConvertError(f"{m.path}: tokenizer has {size} tokens but the embedding has {n_vocab_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size   # UNUSED
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = 3 if idx in special_ids else 1   # CONTROL or NORMAL
    merges = []
    for merge in tok["model"].get("merges", []):
        merges.append(merge if isinstance(merge, str) else " ".join(merge))
    kv.add("tokenizer.ggml.model", "gpt2", "STRING")
    kv.add("tokenizer.ggml.pre", "gpt-2", "STRING")
    kv.add("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING")
    kv.add("tokenizer.ggml.token_type", types, "ARRAY", "INT32")
    kv.add("tokenizer.ggml.merges", merges, "ARRAY", "STRING")

    def token_id(value) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return vocab.get(value)
        return None

    cfg = m.extra.get("tokenizer_config", {})
    text_cfg = m.text
    bos = token_id(cfg.get("bos_token")) if cfg.get("bos_token") else text_cfg.get("bos_token_id")
    eos = token_id(cfg.get("eos_token")) if cfg.get("eos_token") else text_cfg.get("eos_token_id")
    pad = token_id(cfg.get("pad_token")) if cfg.get("pad_token") else text_cfg.get("pad_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if bos is not None:
        kv.add("tokenizer.ggml.bos_token_id", int(bos), "UINT32")
    if eos is None:
        raise ConvertError(f"{m.path}: no EOS token")
    kv.add("tokenizer.ggml.eos_token_id", int(eos), "UINT32")
    if pad is not None:
        kv.add("tokenizer.ggml.padding_token_id", int(pad), "UINT32")
    kv.add("tokenizer.ggml.add_bos_token", _adds_bos(tok, bos), "BOOL")
    kv.add("tokenizer.ggml.add_eos_token", False, "BOOL")
    kv.add("tokenizer.chat_template", m.chat_template, "STRING")
    image_token = m.config.get("image_token_id", m.config.get("image_token_index"))
    if image_token is not None:
        kv.add("m3cli.image_token_id", int(image_token), "UINT32")


def _adds_bos(tok: dict, bos: int | None) -> bool:
    post = tok.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            special = first.get("SpecialToken")
            return special is not None and bos is not None
    return False


def _lm_arrays(m: HFLlava) -> list[tuple[str, np.ndarray]]:
    t, cfg = m.tensors, m.text
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    out = [("token_embd.weight", t["lm.embed_tokens.weight"])]
    layers = int(cfg["num_hidden_layers"])
    for i in range(layers):
        p = f"lm.layers.{i}."
        try:
            out += [
                (f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"]),
                (f"blk.{i}.attn_q.weight", _permute_qk(t[p + "self_attn.q_proj.weight"], n_head)),
                (f"blk.{i}.attn_k.weight", _permute_qk(t[p + "self_attn.k_proj.weight"], n_kv)),
                (f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"]),
                (f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"]),
                (f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"]),
                (f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"]),
                (f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"]),
                (f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"]),
            ]
        except KeyError as exc:
            raise ConvertError(f"{m.path}: checkpoint lacks language_model layer tensor {exc.args[0]}") from exc
    out.append(("output_norm.weight", t["lm.norm.weight"]))
    tied = m.config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    if not tied:
        if "lm_head" not in t:
            raise ConvertError(f"{m.path}: untied model without lm_head.weight")
        out.append(("output.weight", t["lm_head"]))
    return out


def _lm_tensor_list(arrays: list[tuple[str, np.ndarray]], outtype: str) -> list:
    gguf = _gguf()
    out = []
    for name, arr in arrays:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim < 2 or outtype == "f32":
            out.append((name, arr, None))
        elif outtype == "f16":
            out.append((name, arr.astype(np.float16), None))
        elif arr.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            out.append((name, q, gguf.GGMLQuantizationType.Q8_0))
        else:   # rows not a multiple of the Q8_0 block: keep F16
            out.append((name, arr.astype(np.float16), None))
    return out


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def _lm_kv(m: HFLlava, name: str, outtype: str) -> list:
    cfg = m.text
    kv = _KV()
    hidden = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    kv.add("general.name", name, "STRING")
    kv.add("general.file_type", FILE_TYPES[outtype], "UINT32")
    kv.add("llama.context_length", int(cfg.get("max_position_embeddings", 2048)), "UINT32")
    kv.add("llama.embedding_length", hidden, "UINT32")
    kv.add("llama.block_count", int(cfg["num_hidden_layers"]), "UINT32")
    kv.add("llama.feed_forward_length", int(cfg["intermediate_size"]), "UINT32")
    kv.add("llama.attention.head_count", n_head, "UINT32")
    kv.add("llama.attention.head_count_kv", int(cfg.get("num_key_value_heads") or n_head), "UINT32")
    kv.add("llama.attention.key_length", head_dim, "UINT32")
    kv.add("llama.attention.value_length", head_dim, "UINT32")
    kv.add("llama.rope.dimension_count", head_dim, "UINT32")
    kv.add("llama.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), "FLOAT32")
    rope = m.extra.get("rope") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kv.add("llama.rope.freq_base", float(theta), "FLOAT32")
    if rope.get("rope_type", rope.get("type")) == "linear":
        kv.add("llama.rope.scaling.type", "linear", "STRING")
        kv.add("llama.rope.scaling.factor", float(rope["factor"]), "FLOAT32")
    kv.add("llama.vocab_size", int(m.tensors["lm.embed_tokens.weight"].shape[0]), "UINT32")
    _tokenizer_kv(kv, m, int(m.tensors["lm.embed_tokens.weight"].shape[0]))
    return kv.items


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def convert_to_gguf(hf_dir: str | Path, out_dir: str | Path, outtype: str = "f32", *,
                    name: str | None = None, mmproj_type: str | None = None,
                    rot180: bool = True) -> tuple[Path, Path]:
    """Convert a HF LLaVA directory to ``<name>-<outtype>.gguf`` + ``<name>-mmproj-<f32|f16>.gguf``.

    ``outtype`` applies to the language model (f32, f16 or q8_0); the mmproj is F32 (F16 when
    ``outtype`` is f16) unless ``mmproj_type`` says otherwise. ``rot180`` also writes the companion
    mmproj that recovers patch 0 exactly (see the module docstring). Returns (lm_path, mmproj_path).
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r} (use one of {', '.join(OUTTYPES)})")
    mmproj_type = mmproj_type or ("f16" if outtype == "f16" else "f32")
    if mmproj_type not in ("f32", "f16"):
        raise ConvertError(f"mmproj type must be f32 or f16, not {mmproj_type!r}")
    _gguf()
    m = load_hf_llava(hf_dir)
    out = Path(out_dir).expanduser()
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", m.path.resolve().name) or "model"

    # language model
    vocab_rows, hidden_text = m.tensors["lm.embed_tokens.weight"].shape
    lm_path = out / f"{name}-{outtype}.gguf"
    try:
        write_gguf(lm_path, "llama", _lm_kv(m, name, outtype), _lm_tensor_list(_lm_arrays(m), outtype))
    except OSError as exc:
        raise ConvertError(f"cannot write {lm_path}: {exc}") from exc

    # mmproj (+ rot180 companion)
    v = m.vision
    image_size, patch = int(v["image_size"]), int(v["patch_size"])
    n_patches = (image_size // patch) ** 2
    natural = mmproj_tensors_from_hf(m)
    proj_out = natural["mm.2.weight"].shape[0]
    if proj_out != hidden_text:
        raise ConvertError(f"{hf_dir}: projector outputs {proj_out} dims but the LM is {hidden_text} wide")
    common = dict(name=f"{name}-mmproj", image_size=image_size, patch_size=patch, hidden=int(v["hidden_size"]),
                  ff=int(v["intermediate_size"]), n_blocks=int(v["num_hidden_layers"]),
                  n_heads=int(v["num_attention_heads"]), eps=float(v.get("layer_norm_eps", 1e-5)),
                  proj_dim=int(proj_out), mean=m.image_mean, std=m.image_std,
                  use_gelu=v.get("hidden_act", "quick_gelu") == "gelu", file_type=FILE_TYPES[mmproj_type])
    mm_path = out / f"{name}-mmproj-{mmproj_type}.gguf"
    variants = [(mm_path, LAYOUT_CLS_LAST, VARIANT_MAIN)]
    if rot180:
        variants.append((rot180_path(mm_path), LAYOUT_CLS_LAST, VARIANT_ROT180))
    for path, layout, variant in variants:
        tensors = apply_layout(natural, n_patches, layout if variant == VARIANT_MAIN else VARIANT_ROT180)
        kv = mmproj_kv(layout=layout, variant=variant, **common)
        try:
            write_gguf(path, "clip", kv, mmproj_tensor_list(tensors, mmproj_type))
        except OSError as exc:
            raise ConvertError(f"cannot write {path}: {exc}") from exc
    return lm_path, mm_path
