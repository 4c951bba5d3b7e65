"""Hugging Face LLaVA -> GGUF: a ``llama`` language model file and a ``clip`` mmproj file.

The checkpoint is read by ``hf_llava``; the mmproj is written in the layout of ``m3cli.gguf.layout``
(all L vision blocks with ``feature_layer = [L-1]``, no post-layernorm, positions ``[1..N, 0]``, plus
the ``*.rot180.gguf`` companion that recovers patch 0), so llama.cpp's stock LLaVA encoder returns
features equal to Hugging Face's ``hidden_states[-2]`` with CLS dropped. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from m3cli.convert.hf_llava import HFLlava, load_hf_llava
from m3cli.errors import ConvertError
from m3cli.gguf.layout import (
    FILE_TYPES,
    LAYOUT_CLS_LAST,
    VARIANT_MAIN,
    VARIANT_ROT180,
    apply_layout,
    mmproj_kv,
    mmproj_tensor_list,
    rot180_path,
)
from m3cli.gguf.writer import KeyValues, gguf_lib, write_gguf

OUTTYPES = ("f32", "f16", "q8_0")


# ---------------------------------------------------------------------------------------------
# mmproj
# ---------------------------------------------------------------------------------------------
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


def _tokenizer_kv(kv: KeyValues, m: HFLlava, n_vocab_rows: int) -> None:
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
    gguf = gguf_lib()
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


def _lm_kv(m: HFLlava, name: str, outtype: str) -> list:
    cfg = m.text
    kv = KeyValues()
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
    gguf_lib()  # fail on the missing extra before reading gigabytes
    m = load_hf_llava(hf_dir)
    out = Path(out_dir).expanduser()
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", m.path.resolve().name) or "model"

    # language model
    hidden_text = m.tensors["lm.embed_tokens.weight"].shape[1]
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
