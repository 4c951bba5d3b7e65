"""Hugging Face LLaVA -> GGUF: a ``llama`` language model file and a ``clip`` mmproj file.

The checkpoint is read by ``hf_llava``; the mmproj is written in the layout of ``m3cli.gguf.layout``
(all L vision blocks with ``feature_layer = [L-1]``, no post-layernorm, positions ``[1..N, 0]``, plus
the ``*.rot180.gguf`` companion that recovers patch 0), so llama.cpp's stock LLaVA encoder returns
features equal to Hugging Face's ``hidden_states[-2]`` with CLS dropped. The language model carries the
vocabulary (``gguf_vocab``: SentencePiece as llama.cpp's ``llama`` model, byte-level BPE as ``gpt2``), the
chat template and the family's recipe keys (``m3cli.prompt_recipe``, ``m3cli.image_aspect_ratio``), so the
llama.cpp backend prompts and preprocesses exactly as the torch backend does on the source directory.
Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from m3cli.convert.gguf_vocab import add_vocab_kv, build_vocab, prefix_after_special, special_ids
from m3cli.convert.hf_llava import HFLlava, load_hf_llava
from m3cli.errors import ConvertError, describe
from m3cli.families.gguf_spec import GGUF_ASPECT_KEY
from m3cli.families.prompts import GGUF_RECIPE_KEY
from m3cli.gguf.keys import IMAGE_TOKEN_ID_KEY, PREFIX_AFTER_SPECIAL_KEY
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
from m3cli.output import OutputWriteError

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
    """The vocabulary (``llama`` for SentencePiece, ``gpt2`` for byte-level BPE), chat template and recipe keys."""
    vocab = build_vocab(m.tokenizer, n_vocab_rows)
    ids = special_ids(m.tokenizer, vocab, m.config, m.text)
    if ids.eos is None:
        raise ConvertError(f"{m.path}: no EOS token")
    add_vocab_kv(kv, vocab, ids)
    recipe = _recipe_keys(m)
    template = recipe.pop("template", None) or m.chat_template
    if template:
        kv.add("tokenizer.chat_template", template, "STRING")
    for key, value in recipe.items():
        kv.add(key, value, "BOOL" if isinstance(value, bool) else "STRING")
    image_token = m.config.get("image_token_id", m.config.get("image_token_index"))
    if image_token is not None:
        kv.add(IMAGE_TOKEN_ID_KEY, int(image_token), "UINT32")


def _recipe_keys(m: HFLlava) -> dict:
    """What the family layer detects in the directory, for the llama.cpp backend to find again.

    ``m3cli.prompt_recipe`` (``hf_template`` for llava-hf directories, ``vicuna_v1`` for conversions of
    original checkpoints), ``m3cli.image_aspect_ratio`` (``crop`` / ``pad``) and ``m3cli.prefix_after_special``
    (whether the transformers tokenizer puts a ``▁`` after special tokens). A directory without a chat
    template records no recipe: the backend then falls back to the family's recipe with a notice.
    """
    from m3cli.families import detect_family
    from m3cli.families.spec import TemplateError

    keys: dict = {}
    try:
        spec = detect_family(m.path)
        keys[GGUF_RECIPE_KEY] = spec.prompt_recipe
        if spec.chat_template:
            keys["template"] = spec.chat_template
    except TemplateError:
        spec = detect_family(m.path, fallback_recipe="vicuna_v1")
    keys[GGUF_ASPECT_KEY] = spec.preprocess
    prefix = prefix_after_special(m.tokenizer)
    keys[PREFIX_AFTER_SPECIAL_KEY] = bool(spec.prefix_after_special if prefix is None else prefix)
    return keys


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
    except OSError as exc:  # part-way: the files written so far stay whole (each is written atomically)
        raise OutputWriteError(f"{lm_path}: cannot write ({describe(exc)})") from None

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
            raise OutputWriteError(f"{path}: cannot write ({describe(exc)})") from None
    return lm_path, mm_path
