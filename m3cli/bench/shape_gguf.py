"""A paper-scale shape as a GGUF pair (the same random weights as the torch shape), for ``m3 bench gguf --shape``.

``m3 convert`` reads a whole checkpoint as float32 before writing (56 GB for a 7B model), so the pair is
made in two steps. First the shape cut to ONE LM layer (full vocabulary, full vision tower) is saved as a
float32 HF directory and converted by the project's own converter (:func:`convert_to_gguf`): that gives
the mmproj (+ rot180 companion) exactly as ``m3 convert`` writes it, and the language model's key/values.
Then the full language model is streamed to an F16 file one tensor at a time with those key/values (the
block count restored) and the converter's q/k row order; a test checks every tensor the two files share.
Lower precisions come from llama.cpp's own quantizer (``llama_model_quantize``), so a q4_0 file is what
``llama-quantize`` would make. Files are reused when already present.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import numpy as np

from m3cli.bench.shape_model import ShapeWeights
from m3cli.bench.shapes import Shape
from m3cli.errors import ConvertError, UsageError

QUANTS = ("f16", "q8_0", "q4_0")
# llama.cpp's LLAMA_FTYPE_MOSTLY_* values
_FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2}
# bytes per weight of a quantised matrix (ggml blocks: 34 bytes per 32 weights for q8_0, 18 per 32 for q4_0)
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# HF Llama layer tensor -> (GGUF name, heads to reorder q/k rows by: "q", "kv" or None), as m3 convert writes
_LAYER_TENSORS = (
    ("input_layernorm.weight", "attn_norm.weight", None),
    ("self_attn.q_proj.weight", "attn_q.weight", "q"),
    ("self_attn.k_proj.weight", "attn_k.weight", "kv"),
    ("self_attn.v_proj.weight", "attn_v.weight", None),
    ("self_attn.o_proj.weight", "attn_output.weight", None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", None),
    ("mlp.gate_proj.weight", "ffn_gate.weight", None),
    ("mlp.up_proj.weight", "ffn_up.weight", None),
    ("mlp.down_proj.weight", "ffn_down.weight", None),
)
_LM = "model.language_model."


def quantize_available() -> bool:
    """Whether the installed llama-cpp-python exposes llama.cpp's quantizer."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return hasattr(llama_cpp, "llama_model_quantize") and hasattr(llama_cpp, "llama_model_quantize_default_params")


def lm_tensor_plan(shape: Shape) -> list[tuple[str, str, str | None]]:
    """(GGUF name, HF parameter name, q/k reordering) of every LM tensor."""
    plan = [("token_embd.weight", _LM + "embed_tokens.weight", None)]
    for i in range(shape.text_layers):
        plan += [(f"blk.{i}.{gg}", f"{_LM}layers.{i}.{hf}", perm) for hf, gg, perm in _LAYER_TENSORS]
    plan += [("output_norm.weight", _LM + "norm.weight", None), ("output.weight", "lm_head.weight", None)]
    return plan


def rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary pairs dims (i, i + d/2) of each head, llama.cpp's (2i, 2i+1): row 2i of a head becomes its
    old row i and row 2i+1 its old row i + d/2 (the reordering ``m3 convert`` applies to q and k)."""
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def lm_params(shape: Shape) -> int:
    """Parameters of the language model (what the LM GGUF holds)."""
    shapes = ShapeWeights(shape).shapes
    return sum(int(np.prod(shapes[hf])) for _, hf, _ in lm_tensor_plan(shape))


# ---------------------------------------------------------------------------------------------
# step 1: the one-layer cut through the project's converter
# ---------------------------------------------------------------------------------------------
def convert_cut(shape: Shape, out: Path) -> tuple[Path, Path]:
    """Save ``shape`` cut to one LM layer as a float32 HF directory and convert it with ``m3 convert``'s
    :func:`convert_to_gguf` (F16 LM, F16 mmproj + rot180). Returns (one-layer LM, mmproj)."""
    import torch

    from m3cli.bench.shape_model import build_shape
    from m3cli.convert.gguf_writer import convert_to_gguf
    from m3cli.gguf.layout import rot180_path
    from m3cli.models.build import save_bundle

    cut = shape.with_layers(1) if shape.text_layers > 1 else shape
    work = out / "cut"
    hf_dir = work / "hf"
    built = build_shape(cut, "cpu", torch.float32)
    save_bundle(built.model, built.processor, hf_dir)
    del built
    gc.collect()
    lm, mmproj = convert_to_gguf(hf_dir, work, "f16", name=out.name, mmproj_type="f16")
    shutil.rmtree(hf_dir, ignore_errors=True)
    # the mmproj pair is the bench's; the one-layer LM stays in cut/ (its key/values are read from there)
    rot180_path(mmproj).replace(rot180_path(out / mmproj.name))
    mmproj = mmproj.replace(out / mmproj.name)
    return lm, mmproj


def _copied_kv(cut_lm: Path, layers: int, name: str) -> list[tuple[str, object, object, object]]:
    """The key/values of the converted one-layer LM, block count set to ``layers`` (GGUF reader order)."""
    from gguf import GGUFValueType

    from m3cli.gguf.reader import open_reader

    reader = open_reader(cut_lm)
    out = []
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = fld.contents()
        if key.endswith(".block_count"):
            value = layers
        elif key == "general.name":
            value = name
        vtype = GGUFValueType(fld.types[0])
        sub = GGUFValueType(fld.types[-1]) if vtype == GGUFValueType.ARRAY else None
        out.append((key, value, vtype, sub))
    return out


# ---------------------------------------------------------------------------------------------
# step 2: the full LM, streamed
# ---------------------------------------------------------------------------------------------
def write_lm_f16(shape: Shape, cut_lm: Path, path: Path, weights: ShapeWeights | None = None) -> Path:
    """Stream the shape's language model to ``path`` as an F16 llama GGUF (1-D tensors F32) with the key/values
    of the converted one-layer cut: one tensor generated, converted and written at a time."""
    from m3cli.fileio import atomic_open
    from m3cli.gguf.writer import gguf_lib

    gguf = gguf_lib()
    weights = weights or ShapeWeights(shape)
    plan = lm_tensor_plan(shape)
    heads = {"q": shape.text_heads, "kv": shape.text_kv_heads}
    writer = gguf.GGUFWriter(None, "llama")
    for key, value, vtype, sub in _copied_kv(cut_lm, shape.text_layers, path.stem):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for gg, hf, _ in plan:
        dims = weights.shapes[hf]
        dtype = np.dtype(np.float32 if len(dims) < 2 else np.float16)
        writer.add_tensor_info(gg, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
    try:
        with atomic_open(path, "wb") as stream:
            writer.fout = [stream]
            writer.state = gguf.gguf_writer.WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, hf, perm in plan:
                arr = weights.tensor(hf).float().numpy()
                if perm is not None:
                    arr = rope_rows(arr, heads[perm])
                writer.write_tensor_data(np.ascontiguousarray(arr if arr.ndim < 2 else arr.astype(np.float16)))
    except OSError as exc:
        raise ConvertError(f"cannot write {path}: {exc}") from exc
    return path


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) from an F16 GGUF to ``quant``."""
    if not quantize_available():
        raise UsageError(f"--quant {quant} needs llama_model_quantize, which this llama-cpp-python lacks "
                         "(use --quant f16)")
    import llama_cpp

    from m3cli.backends.llamacpp import native

    native.backend_init(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.nthread = int(threads or os.cpu_count() or 1)
    tmp = dst.with_name(dst.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"llama_model_quantize {src.name} -> {quant} failed (code {rc})")
    tmp.replace(dst)
    return dst


def gguf_disk_needed(n_lm_params: int, quant: str, have_f16: bool, n_cut_params: int = 0) -> int:
    """Bytes still to write: the F16 LM (unless present), the quantised copy, and for the one-layer cut its
    float32 HF directory (removed after conversion) and its F16 GGUF files."""
    f16 = 0 if have_f16 else int(n_lm_params * 2)
    quantised = int(n_lm_params * BYTES_PER_WEIGHT[quant]) if quant != "f16" else 0
    return f16 + quantised + 6 * n_cut_params


def pair_dir(shape: Shape, workdir: str | Path) -> Path:
    """Where a shape's GGUF files live under ``workdir`` (one folder per shape and layer cut)."""
    return Path(workdir).expanduser() / shape.model_id.replace(":", "-").replace("@", "-")


def shape_gguf_pair(shape: Shape, workdir: str | Path, quant: str = "q4_0",
                    threads: int | None = None) -> tuple[Path, Path, list[str]]:
    """The shape's GGUF pair (LM at ``quant``, mmproj F16), written or reused; plus what was done."""
    if quant not in QUANTS:
        raise UsageError(f"unknown --quant {quant!r} (one of {', '.join(QUANTS)})")
    out = pair_dir(shape, workdir)
    out.mkdir(parents=True, exist_ok=True)
    name = out.name
    f16, target = out / f"{name}-f16.gguf", out / f"{name}-{quant}.gguf"
    mmproj, cut_lm = out / f"{name}-mmproj-f16.gguf", out / "cut" / f"{name}-f16.gguf"
    notes = []
    have_cut = mmproj.is_file() and cut_lm.is_file()
    if not target.is_file():
        from m3cli.bench.shapes import param_count

        cut_params = 0 if have_cut else param_count(shape.with_layers(1) if shape.text_layers > 1 else shape)
        need = gguf_disk_needed(lm_params(shape), quant, f16.is_file(), cut_params)
        free = shutil.disk_usage(out).free
        if need > free:
            raise UsageError(f"the {shape.name} GGUF files need ~{need / 2**30:.1f} GiB in {out}, only "
                             f"{free / 2**30:.1f} GiB free (use --workdir elsewhere)")
    if not have_cut:
        cut_lm, mmproj = convert_cut(shape, out)
        notes.append(f"converted the one-layer cut with m3 convert ({mmproj.name} + rot180 companion)")
    if not f16.is_file() and not target.is_file():
        write_lm_f16(shape, cut_lm, f16)
        notes.append(f"streamed {f16.name}")
    if not target.is_file():
        quantize(f16, target, quant, threads)
        notes.append(f"quantised to {target.name} with llama_model_quantize")
    if not notes:
        notes.append(f"reused {target.name} and {mmproj.name}")
    return target, mmproj, notes
