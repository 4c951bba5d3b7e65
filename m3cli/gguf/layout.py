"""The mmproj layout that makes llama.cpp's stock LLaVA encoder return Hugging Face-equal features.

llama.cpp's LLaVA encoder appends CLS after the patches and runs one layer fewer than the file's block
count. Our mmproj therefore stores all L vision blocks with ``feature_layer = [L-1]``, no post-layernorm,
and the position rows permuted ``[1, 2, ..., N, 0]`` so every token reads its own position; the encoder
then returns HF's patches 1..N-1 followed by the projected CLS (patch 0 is lost). A companion
``*.rot180.gguf`` (kernel rotated 180 degrees, positions reversed), fed the image rotated 180 degrees,
recovers patch 0 exactly. The layout is recorded under ``LAYOUT_KEY`` so our files are told from legacy ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3cli.errors import ConvertError
from m3cli.gguf.writer import KeyValues

LAYOUT_KEY = "m3cli.mmproj.layout"
VARIANT_KEY = "m3cli.mmproj.variant"
LAYOUT_CLS_LAST = "cls_last"   # positions [1..N, 0]: for builds that append CLS after the patches
LAYOUT_NATURAL = "natural"     # positions [0..N]: legacy files and (future) fixed builds
VARIANT_MAIN = "main"
VARIANT_ROT180 = "rot180"
ROT_SUFFIX = ".rot180.gguf"
# general.file_type values for the weight types we write
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def position_order(n_patches: int, layout: str) -> np.ndarray:
    """Row order of the stored position table for a layout (index into HF's natural table)."""
    if layout == LAYOUT_NATURAL:
        return np.arange(n_patches + 1)
    if layout == LAYOUT_CLS_LAST:
        return np.concatenate([np.arange(1, n_patches + 1), [0]])
    if layout == VARIANT_ROT180:   # reversed: slot k reads HF row N-k (patch N-1-k); CLS slot reads 0
        return np.arange(n_patches, -1, -1)
    raise ValueError(layout)


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
    """The key/values of a LLaVA mmproj (CLIP tower + MLP projector) in our layout."""
    kv = KeyValues()
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
