"""Check mmproj files before llama.cpp sees them, and rewrite legacy ones into our layout.

``validate_mmproj`` reads only the GGUF header (memory-mapped) and raises a one-line
``MmprojError`` for anything that would make llama.cpp return NULL or, worse, abort the process
(a position table shorter than n_patches+1 is a GGML_ASSERT at encode time).

``fix_mmproj`` rewrites an mmproj made by llama.cpp's legacy LLaVA converter (L-1 blocks, no
feature_layer, natural position order) into the layout ``m3cli.gguf.layout`` describes: explicit
``feature_layer``, no post-layernorm, positions ``[1..N, 0]``, plus the rot180 companion. A LLaVA-1.6
mmproj's anyres keys move under ``m3cli.anyres.*`` (:data:`m3cli.gguf.keys.ANYRES_MMPROJ_KEYS`), so that mtmd
encodes each crop m3 hands it as one tower-size image; its ``model.image_newline`` tensor is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3cli.errors import ConvertError
from m3cli.fileio import input_problem
from m3cli.gguf.keys import ANYRES_MMPROJ_KEYS, IMAGE_NEWLINE_TENSORS
from m3cli.gguf.layout import (
    LAYOUT_CLS_LAST,
    LAYOUT_KEY,
    LAYOUT_NATURAL,
    VARIANT_KEY,
    VARIANT_MAIN,
    VARIANT_ROT180,
    apply_layout,
    mmproj_tensor_list,
    position_order,
    rot180_path,
)
from m3cli.gguf.reader import has_gguf_magic, open_reader
from m3cli.gguf.writer import write_gguf


class MmprojError(ConvertError):
    """An mmproj file llama.cpp would reject or crash on; the message is one line."""


U32_KEYS = ("clip.vision.image_size", "clip.vision.patch_size", "clip.vision.embedding_length",
            "clip.vision.feed_forward_length", "clip.vision.block_count", "clip.vision.projection_dim",
            "clip.vision.attention.head_count")


@dataclass
class MmprojInfo:
    """What the backend needs to know about a validated mmproj."""

    path: Path
    image_size: int
    patch_size: int
    n_patches: int
    hidden: int
    n_blocks: int
    feature_layers: list[int]
    n_embd_out: int
    layout: str            # LAYOUT_CLS_LAST (ours) or LAYOUT_NATURAL (legacy / third-party)
    variant: str           # VARIANT_MAIN or VARIANT_ROT180
    file_type: str         # dominant weight type, e.g. F32 / F16
    image_mean: list[float]
    image_std: list[float]

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size


def _reader(path: str | Path):
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise MmprojError("the 'gguf' package is not installed (pip install gguf)") from exc
    p = Path(path).expanduser()
    problem = input_problem(p, empty_ok=False)  # by type first: /dev/null is no missing file, a FIFO would block
    if problem == "file not found":
        raise MmprojError(f"mmproj file not found: {path}")
    if problem is not None:
        raise MmprojError(f"mmproj {path}: {problem}")
    try:
        if not has_gguf_magic(p):
            raise MmprojError(f"{path}: not a GGUF file")
        return open_reader(p)
    except MmprojError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise MmprojError(f"{path}: unreadable GGUF ({type(exc).__name__}: {detail})") from exc


def _fields(reader) -> dict[str, Any]:
    return {name: f for name, f in reader.fields.items()}


def _value(field):
    return field.contents()


def _check_type(path, fields, key, want: str, sub: str | None = None, required: bool = True) -> Any:
    from gguf import GGUFValueType as T

    f = fields.get(key)
    if f is None:
        if required:
            raise MmprojError(f"{path}: missing key {key}")
        return None
    if f.types[0] != getattr(T, want) or (sub and f.types[-1] != getattr(T, sub)):
        got = "/".join(t.name for t in f.types)
        raise MmprojError(f"{path}: key {key} has type {got}, llama.cpp needs {want}{'/' + sub if sub else ''}")
    return _value(f)


def validate_mmproj(path: str | Path, n_embd_text: int | None = None) -> MmprojInfo:
    """Raise ``MmprojError`` (one line) unless llama.cpp can load and run this LLaVA mmproj.

    Checks the metadata types, every tensor the LLaVA graph reads against the metadata, the
    position table length (>= n_patches + 1), ``feature_layer <= block_count`` and, when
    ``n_embd_text`` is given, that the projector outputs the language model's width.
    """
    reader = _reader(path)
    fields = _fields(reader)
    arch = _check_type(path, fields, "general.architecture", "STRING")
    if arch != "clip":
        raise MmprojError(f"{path}: architecture {arch!r} is not an mmproj ('clip')")
    if not _check_type(path, fields, "clip.has_vision_encoder", "BOOL", required=False):
        raise MmprojError(f"{path}: mmproj has no vision encoder")
    proj = _check_type(path, fields, "clip.projector_type", "STRING", required=False)
    if proj is None:
        proj = _check_type(path, fields, "clip.vision.projector_type", "STRING", required=False)
    if proj != "mlp":
        raise MmprojError(f"{path}: projector type {proj!r} is not LLaVA's 'mlp'")
    u = {key: _check_type(path, fields, key, "UINT32") for key in U32_KEYS}
    eps = _check_type(path, fields, "clip.vision.attention.layer_norm_epsilon", "FLOAT32")
    mean = _check_type(path, fields, "clip.vision.image_mean", "ARRAY", "FLOAT32")
    std = _check_type(path, fields, "clip.vision.image_std", "ARRAY", "FLOAT32")
    feature = _check_type(path, fields, "clip.vision.feature_layer", "ARRAY", "INT32", required=False) or []
    for key in ("clip.use_gelu", "clip.use_silu", "clip.has_llava_projector"):
        _check_type(path, fields, key, "BOOL", required=False)
    layout = _check_type(path, fields, LAYOUT_KEY, "STRING", required=False) or LAYOUT_NATURAL
    variant = _check_type(path, fields, VARIANT_KEY, "STRING", required=False) or VARIANT_MAIN
    if len(mean) < 3 or len(std) < 3:
        raise MmprojError(f"{path}: image_mean/image_std need 3 values")
    if not eps or eps <= 0:
        raise MmprojError(f"{path}: layer_norm_epsilon must be > 0")
    image, patch = u["clip.vision.image_size"], u["clip.vision.patch_size"]
    hidden, ff = u["clip.vision.embedding_length"], u["clip.vision.feed_forward_length"]
    n_blocks, heads = u["clip.vision.block_count"], u["clip.vision.attention.head_count"]
    if patch == 0 or image % patch:
        raise MmprojError(f"{path}: image_size {image} is not a multiple of patch_size {patch}")
    if heads == 0 or hidden % heads:
        raise MmprojError(f"{path}: embedding_length {hidden} is not divisible by head_count {heads}")
    side = image // patch
    n_patches = side * side
    for f in feature:
        if f > n_blocks:
            raise MmprojError(f"{path}: feature_layer {f} > block_count {n_blocks}")

    tensors = {t.name: t for t in reader.tensors}

    def shape(name: str, required: bool = True):
        t = tensors.get(name)
        if t is None:
            if required:
                raise MmprojError(f"{path}: missing tensor {name}")
            return None
        return tuple(int(d) for d in reversed([int(x) for x in t.shape]))   # NumPy order

    def expect(name: str, want: tuple, required: bool = True):
        got = shape(name, required)
        if got is None:
            return
        extra = len(got) - len(want)
        if extra > 0 and all(g == 1 for g in got[:extra]):
            got = got[extra:]
        if tuple(got) != tuple(want):
            raise MmprojError(f"{path}: tensor {name} has shape {list(got)}, metadata implies {list(want)}")

    expect("v.patch_embd.weight", (hidden, 3, patch, patch))
    expect("v.class_embd", (hidden,))
    pos = shape("v.position_embd.weight")
    if len(pos) != 2 or pos[1] != hidden:
        raise MmprojError(f"{path}: position table shape {list(pos)} does not match embedding_length {hidden}")
    if pos[0] < n_patches + 1:
        raise MmprojError(f"{path}: position table has {pos[0]} rows, a {side}x{side} grid needs "
                          f"{n_patches + 1} (llama.cpp would abort)")
    for name in ("v.pre_ln.weight", "v.pre_ln.bias"):
        expect(name, (hidden,), required=False)
    for i in range(n_blocks):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            expect(f"v.blk.{i}.{part}.weight", (hidden, hidden))
            expect(f"v.blk.{i}.{part}.bias", (hidden,), required=False)
        for part in ("ln1", "ln2"):
            expect(f"v.blk.{i}.{part}.weight", (hidden,))
            expect(f"v.blk.{i}.{part}.bias", (hidden,))
        up, down = shape(f"v.blk.{i}.ffn_up.weight"), shape(f"v.blk.{i}.ffn_down.weight")
        if sorted([tuple(up), tuple(down)]) != sorted([(ff, hidden), (hidden, ff)]):
            raise MmprojError(f"{path}: block {i} FFN shapes {list(up)}/{list(down)} do not match "
                              f"feed_forward_length {ff} x embedding_length {hidden}")
    mm0, mm2 = shape("mm.0.weight"), shape("mm.2.weight")
    if len(mm0) != 2 or mm0[1] != hidden:
        raise MmprojError(f"{path}: mm.0.weight shape {list(mm0)} does not take the {hidden}-wide vision features")
    if len(mm2) != 2 or mm2[1] != mm0[0]:
        raise MmprojError(f"{path}: mm.2.weight shape {list(mm2)} does not follow mm.0.weight {list(mm0)}")
    expect("mm.0.bias", (mm0[0],))
    expect("mm.2.bias", (mm2[0],))
    if n_embd_text is not None and mm2[0] != n_embd_text:
        raise MmprojError(f"{path}: projector outputs {mm2[0]} dims but the language model is "
                          f"{n_embd_text} wide (mismatched mmproj)")
    if layout not in (LAYOUT_CLS_LAST, LAYOUT_NATURAL):
        raise MmprojError(f"{path}: unknown {LAYOUT_KEY} {layout!r}")
    types = sorted({tensors[n].tensor_type.name for n in tensors if n.endswith(".weight") and ".blk." in n})
    return MmprojInfo(path=Path(path), image_size=image, patch_size=patch, n_patches=n_patches, hidden=hidden,
                      n_blocks=n_blocks, feature_layers=list(feature), n_embd_out=mm2[0], layout=layout,
                      variant=variant, file_type="/".join(types) or "?", image_mean=list(mean)[:3],
                      image_std=list(std)[:3])


# ---------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------
def _read_all(path: str | Path):
    """(kv items, tensors as float32 NumPy arrays in NumPy order) of an F32/F16 mmproj."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as T
    from gguf.quants import dequantize

    reader = _reader(path)
    kv = []
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == T.ARRAY else None
        kv.append((name, f.contents(), vtype, sub))
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        if t.tensor_type in (Q.F32, Q.F16):
            arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            arr = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)
        tensors[t.name] = arr
    return kv, tensors


def _natural_from(kv: dict, tensors: dict[str, np.ndarray], n_patches: int) -> dict[str, np.ndarray]:
    """Undo a stored layout: back to HF's natural position order (and unrotated kernel)."""
    layout = kv.get(LAYOUT_KEY, (LAYOUT_NATURAL,))[0]
    variant = kv.get(VARIANT_KEY, (VARIANT_MAIN,))[0]
    out = dict(tensors)
    pos = tensors["v.position_embd.weight"]
    if variant == VARIANT_ROT180:
        order = position_order(n_patches, VARIANT_ROT180)
        out["v.patch_embd.weight"] = np.ascontiguousarray(tensors["v.patch_embd.weight"][:, :, ::-1, ::-1])
    else:
        order = position_order(n_patches, layout)
    natural = np.empty_like(pos[: n_patches + 1])
    natural[order] = pos[: n_patches + 1]
    out["v.position_embd.weight"] = natural
    return out


def rewrite_mmproj(in_path: str | Path, out_path: str | Path, layout: str, variant: str = VARIANT_MAIN,
                   dtype: str | None = None) -> Path:
    """Write ``in_path`` (any layout we know) as ``layout``/``variant``; keeps every other key.

    Depth is made explicit: a file without ``feature_layer`` is a legacy file whose stored blocks
    are exactly the layers LLaVA uses, so it gets ``feature_layer = [block_count]``. Post-layernorm
    tensors are dropped (LLaVA's features are taken before it). LLaVA-1.6's anyres keys are renamed
    (``ANYRES_MMPROJ_KEYS``): the copy is a one-crop encoder for m3, which cuts and packs the crops itself.
    """
    from gguf import GGUFValueType as T

    info = validate_mmproj(in_path)
    kv_items, tensors = _read_all(in_path)
    kv = {k: (v, t, s) for k, v, t, s in kv_items}
    natural = _natural_from(kv, tensors, info.n_patches)
    for name in [n for n in natural if n.startswith("v.post_ln.")]:
        del natural[name]
    if not info.feature_layers:
        kv["clip.vision.feature_layer"] = ([info.n_blocks], T.ARRAY, T.INT32)
    for clip_key, m3_key in ANYRES_MMPROJ_KEYS.items():
        if clip_key in kv:
            kv[m3_key] = kv.pop(clip_key)
    kv[LAYOUT_KEY] = (layout, T.STRING, None)
    kv[VARIANT_KEY] = (variant, T.STRING, None)
    stored = apply_layout(natural, info.n_patches, VARIANT_ROT180 if variant == VARIANT_ROT180 else layout)
    if dtype is None:
        dtype = "f16" if "F16" in info.file_type else "f32"
    kv["general.file_type"] = ({"f32": 0, "f16": 1}[dtype], T.UINT32, None)
    items = [(k, v, t, s) for k, (v, t, s) in kv.items()]
    out = Path(out_path)
    try:
        write_gguf(out, "clip", items, mmproj_tensor_list(stored, dtype))
    except OSError as exc:
        raise MmprojError(f"cannot write {out}: {exc}") from exc
    validate_mmproj(out)
    return out


def fix_mmproj(in_path: str | Path, out_dir: str | Path, rot180: bool = True) -> Path:
    """Rewrite a legacy LLaVA mmproj into the corrected layout (+ rot180 companion); returns its path.

    The output is named after the input with ``-fixed`` (``mmproj-model-f16.gguf`` ->
    ``mmproj-model-f16-fixed.gguf``) and keeps the input's F32/F16 type.
    """
    src = Path(in_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    stem = src.name[: -len(".gguf")] if src.name.endswith(".gguf") else src.name
    out = out_dir / f"{stem}-fixed.gguf"
    if out.resolve() == src.resolve():
        raise MmprojError(f"{in_path}: output would overwrite the input")
    rewrite_mmproj(src, out, LAYOUT_CLS_LAST, VARIANT_MAIN)
    if rot180:
        rewrite_mmproj(src, rot180_path(out), LAYOUT_CLS_LAST, VARIANT_ROT180)
    return out


def read_image_newline(path: str | Path) -> np.ndarray | None:
    """A LLaVA-1.6 mmproj's learned ``image_newline`` as float32 ``(D,)``, or None when the file has none."""
    from gguf import GGMLQuantizationType as Q

    reader = _reader(path)
    for t in reader.tensors:
        if t.name in IMAGE_NEWLINE_TENSORS:
            if t.tensor_type not in (Q.F32, Q.F16):
                raise MmprojError(f"{path}: {t.name} is {t.tensor_type.name}; F32 or F16 expected")
            return np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
    return None
