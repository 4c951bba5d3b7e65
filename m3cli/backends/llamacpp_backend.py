"""llama.cpp backend (GGUF): mtmd/clip encodes the image, M3 pools it in NumPy, llama decodes.

The projected 24x24 grid is read back from mtmd, pooled with ``scales.pool_np`` and fed to the
language model as embeddings in a ``llama_batch`` between the prompt's text tokens; decoding is
greedy with per-token log-probabilities, like the torch backend.

llama.cpp's stock LLaVA encoder appends CLS after the patches and keeps output rows 1..N, so
with our corrected mmproj (positions ``[1..N, 0]``) it returns HF's patches 1..N-1 and then
CLS. A startup probe (a throwaway 2x2-patch mmproj whose rows report which patch, which
position and how many layers they saw) tells that build from a fixed one; the row repair and
the patch-0 recovery are applied only for the buggy signature. Patch 0 comes either from a
second pass (companion ``*.rot180.gguf``: image and kernel rotated 180 degrees) or from a fill
with its neighbours; see ``patch0`` and docs/gguf.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3cli.backends.base import AnswerRequest, Encoded, Generation, ModelLoadError
from m3cli.scales import nested_scales, pool_np

log = logging.getLogger(__name__)

PATCH0_MODES = ("auto", "exact", "fill")
# Scales at which the patch-0 fill measurably changes answers (docs/gguf.md: greedy agreement
# with torch drops from ~98-100% to 57-93% at 576/144/36 and does not move at 9 and 1); "auto"
# runs the exact second pass lazily, only when a request at one of these scales arrives.
AUTO_EXACT_MIN_SCALE = 36

SIG_BUGGY = "cls-last"      # rows [(p1,1), (p2,2), (p3,3), (CLS,4)] with natural positions
SIG_FIXED = "fixed"         # rows [(p0,1), (p1,2), (p2,3), (p3,4)]

_STATE: dict = {"backend_init": False, "probe": None, "log_cb": None}


# ---------------------------------------------------------------------------------------------
# llama.cpp plumbing
# ---------------------------------------------------------------------------------------------
def _libs():
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
    except (ImportError, OSError) as exc:
        raise ModelLoadError("the llama.cpp backend needs llama-cpp-python>=0.3.36 and gguf "
                             f"(pip install 'm3cli[gguf]'): {exc}") from exc
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("the llama.cpp backend needs the 'gguf' package (pip install gguf)") from exc
    return llama_cpp, mtmd


def _set_logging(llama_cpp, mtmd, verbose: bool) -> None:
    """Route llama.cpp/ggml/mtmd logs to stderr when verbose, else drop them (callback kept alive)."""

    def _cb(level, text, user_data):  # noqa: ARG001
        if verbose and text:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    cb = llama_cpp.llama_log_callback(_cb)
    _STATE["log_cb"] = cb       # a ctypes callback must outlive every call into the library
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    for name in ("mtmd_log_set", "mtmd_helper_log_set"):
        fn = getattr(mtmd, name, None)
        if fn is not None:
            try:
                fn(cb, ctypes.c_void_p(0))
            except (ctypes.ArgumentError, AttributeError):  # pragma: no cover - binding drift
                pass


def _backend_init(llama_cpp) -> None:
    if not _STATE["backend_init"]:
        llama_cpp.llama_backend_init()
        _STATE["backend_init"] = True


def _check_gguf_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{what} not found: {path}")
    if not p.is_file():
        raise ModelLoadError(f"{what} is not a file: {path}")
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"{what} {path} is not a GGUF file")
    return p


def _gguf_arch(path: Path) -> str | None:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path), "r").fields.get("general.architecture")
        return field.contents() if field is not None else None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelLoadError(f"{path}: unreadable GGUF ({type(exc).__name__})") from exc


def find_mmproj(model: str | Path) -> Path:
    """The mmproj next to an LM .gguf: ``*mmproj*.gguf`` (rot180 companions excluded).

    With several candidates, one with the LM's type tag (f32/f16) wins, then F32, then the only
    one that shares the LM's name prefix; anything still ambiguous is an error.
    """
    lm = Path(model).expanduser()
    cands = sorted(p for p in lm.parent.glob("*mmproj*.gguf")
                   if not p.name.endswith(".rot180.gguf") and p.resolve() != lm.resolve())
    if not cands:
        raise ModelLoadError(f"no mmproj found next to {model} (expected a *mmproj*.gguf file; pass --mmproj)")
    if len(cands) == 1:
        return cands[0]
    stem = lm.name[: -len(".gguf")]
    base = stem.rsplit("-", 1)[0]
    same_base = [p for p in cands if p.name.startswith(base)] or cands
    for tag in (stem.rsplit("-", 1)[-1], "f32"):
        tagged = [p for p in same_base if p.name.endswith(f"-{tag}.gguf")]
        if len(tagged) == 1:
            return tagged[0]
    if len(same_base) == 1:
        return same_base[0]
    raise ModelLoadError(f"several mmproj files next to {model}: {', '.join(p.name for p in cands)} (pass --mmproj)")


@dataclass
class ProbeResult:
    signature: str            # SIG_BUGGY, SIG_FIXED or "unknown"
    rows: list                # [(token, position)] per output row; token 'p<j>' or 'cls'
    layers: int               # encoder layers that ran (file: 3 blocks, feature_layer [2])
    ms: float

    def describe(self) -> str:
        return f"rows={self.rows} layers={self.layers}"


def _probe_file(dirpath: Path) -> Path:
    """A 2x2-patch mmproj whose output rows report (patch, position, layers run)."""
    from m3cli.convert.gguf_writer import LAYOUT_NATURAL, VARIANT_MAIN, mmproj_kv, mmproj_tensor_list, write_gguf

    h, ff, blocks = 8, 16, 3
    t: dict[str, np.ndarray] = {}
    patch = np.zeros((h, 3, 1, 1), np.float32)
    patch[0, 0, 0, 0] = 5.0                       # dim 0 = 5 * red = patch id + 1
    t["v.patch_embd.weight"] = patch
    cls = np.zeros(h, np.float32)
    cls[1] = 1.0                                  # dim 1 marks CLS
    t["v.class_embd"] = cls
    pos = np.zeros((5, h), np.float32)
    pos[:, 2] = np.arange(1, 6)                   # dim 2 = position row + 1
    t["v.position_embd.weight"] = pos
    for i in range(blocks):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[f"v.blk.{i}.{name}.weight"] = np.zeros((h, h), np.float32)
            t[f"v.blk.{i}.{name}.bias"] = np.zeros(h, np.float32)
        t[f"v.blk.{i}.attn_out.bias"][3] = 1.0    # dim 3 counts layers
        for name in ("ln1", "ln2"):
            t[f"v.blk.{i}.{name}.weight"] = np.ones(h, np.float32)
            t[f"v.blk.{i}.{name}.bias"] = np.zeros(h, np.float32)
        t[f"v.blk.{i}.ffn_up.weight"] = np.zeros((ff, h), np.float32)
        t[f"v.blk.{i}.ffn_up.bias"] = np.zeros(ff, np.float32)
        t[f"v.blk.{i}.ffn_down.weight"] = np.zeros((h, ff), np.float32)
        t[f"v.blk.{i}.ffn_down.bias"] = np.zeros(h, np.float32)
    t["mm.0.weight"] = np.eye(h, dtype=np.float32)
    t["mm.0.bias"] = np.full(h, 100.0, np.float32)    # GELU(x + 100) == x + 100 exactly
    t["mm.2.weight"] = np.eye(h, dtype=np.float32)
    t["mm.2.bias"] = np.full(h, -100.0, np.float32)
    kv = mmproj_kv(name="m3cli-probe", image_size=2, patch_size=1, hidden=h, ff=ff, n_blocks=blocks, n_heads=1,
                   eps=1e-5, proj_dim=h, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], use_gelu=False, file_type=0,
                   layout=LAYOUT_NATURAL, variant=VARIANT_MAIN)
    return write_gguf(dirpath / "probe-mmproj.gguf", "clip", kv, mmproj_tensor_list(t, "f32"))


def _mtmd_params(mtmd, use_gpu: bool, threads: int):
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = bool(use_gpu)
    params.n_threads = int(threads)
    params.print_timings = False
    params.warmup = False
    return params


def _encode_rgb(mtmd, mctx, rgb: np.ndarray, n_embd: int) -> np.ndarray:
    """Run mtmd on one HxWx3 uint8 image; returns a copy of the (n_tokens, n_embd) output."""
    h, w = rgb.shape[:2]
    buf = np.ascontiguousarray(rgb, dtype=np.uint8)
    data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd.mtmd_bitmap_init(w, h, data)
    if not bitmap:
        raise RuntimeError("mtmd_bitmap_init failed")
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
        parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
        rc = mtmd.mtmd_tokenize_from_parts(mctx, chunks, parts, 1, False)
        if rc != 0:
            raise RuntimeError(f"mtmd tokenize failed ({rc})")
        image_chunk = None
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_chunk = chunk
                break
        if image_chunk is None:
            raise RuntimeError("mtmd produced no image chunk")
        n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(image_chunk))
        rc = mtmd.mtmd_encode_chunk(mctx, image_chunk)
        if rc != 0:
            raise RuntimeError(f"mtmd_encode_chunk failed ({rc})")
        ptr = mtmd.mtmd_get_output_embd(mctx)
        if not ptr:
            raise RuntimeError("mtmd returned no embeddings")
        # mtmd owns this buffer and reuses it on the next encode: copy now
        return np.ctypeslib.as_array(ptr, shape=(n_tokens * n_embd,)).copy().reshape(n_tokens, n_embd)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def probe_llamacpp(force: bool = False) -> ProbeResult:
    """Find how the linked llama.cpp builds LLaVA encoder rows (cached per process, ~100 ms)."""
    if _STATE["probe"] is not None and not force:
        return _STATE["probe"]
    llama_cpp, mtmd = _libs()
    _backend_init(llama_cpp)
    if _STATE["log_cb"] is None:
        _set_logging(llama_cpp, mtmd, verbose=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m3-probe-") as tmp:
        path = _probe_file(Path(tmp))
        mctx = mtmd.mtmd_init_from_file(str(path).encode(), None, _mtmd_params(mtmd, False, 1))
        if not mctx:
            raise ModelLoadError("llama.cpp rejected the LLaVA probe mmproj (unsupported llama.cpp build)")
        try:
            rgb = np.zeros((2, 2, 3), np.uint8)
            rgb[..., 0] = (np.arange(4).reshape(2, 2) + 1) * 51   # patch j -> red 0.2 (j + 1)
            out = _encode_rgb(mtmd, mctx, rgb, 8)
        finally:
            mtmd.mtmd_free(mctx)
    rows = []
    for r in out:
        token = "cls" if r[1] > 0.5 else f"p{int(round(r[0])) - 1}"
        rows.append((token, int(round(r[2])) - 1))
    layers = int(round(float(np.median(out[:, 3]))))
    if rows == [("p1", 1), ("p2", 2), ("p3", 3), ("cls", 4)]:
        sig = SIG_BUGGY
    elif rows == [("p0", 1), ("p1", 2), ("p2", 3), ("p3", 4)]:
        sig = SIG_FIXED
    else:
        sig = "unknown"
    if layers != 2:
        sig = "unknown"
    result = ProbeResult(sig, rows, layers, (time.perf_counter() - start) * 1000)
    _STATE["probe"] = result
    return result


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
@dataclass
class LlamaEncoded(Encoded):
    """An encoded grid plus what the lazy exact patch-0 pass needs."""

    pixels: np.ndarray | None = None    # preprocessed HxWx3 uint8 image (kept only while patch 0 is filled)
    patch0_exact: bool = True


class LlamaCppBackend:
    """GGUF LLaVA through llama-cpp-python's low-level API (llama + mtmd)."""

    name = "llamacpp"

    def __init__(self, model: str, mmproj: str | None = None, n_gpu_layers: int | None = None,
                 mmproj_offload: bool = True, threads: int | None = None, ctx: int = 2048,
                 verbose: bool = False, patch0: str = "auto"):
        if patch0 not in PATCH0_MODES:
            raise ModelLoadError(f"unknown patch0 mode {patch0!r} (one of {', '.join(PATCH0_MODES)})")
        self._closed = False
        self.model_ptr = self.lctx = self.mctx = self.mctx_rot = None
        self._tok_batch = self._emb_batch = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        llama_cpp, mtmd = _libs()
        self._llama, self._mtmd = llama_cpp, mtmd
        _backend_init(llama_cpp)
        _set_logging(llama_cpp, mtmd, verbose)
        self.model_id = str(model)
        self.patch0 = patch0
        self.threads = int(threads or os.cpu_count() or 1)
        lm_path = _check_gguf_file(model, "model file")
        arch = _gguf_arch(lm_path)
        if arch == "clip":
            raise ModelLoadError(f"{model} is an mmproj, not a language model (pass it as --mmproj)")
        mm_path = _check_gguf_file(mmproj, "mmproj file") if mmproj else find_mmproj(lm_path)

        # language model
        mparams = llama_cpp.llama_model_default_params()
        if n_gpu_layers is None:
            n_gpu_layers = 999 if llama_cpp.llama_supports_gpu_offload() else 0
        mparams.n_gpu_layers = int(n_gpu_layers)
        self.n_gpu_layers = int(n_gpu_layers)
        self.model_ptr = llama_cpp.llama_model_load_from_file(str(lm_path).encode(), mparams)
        if not self.model_ptr:
            raise ModelLoadError(f"llama.cpp could not load {model} (unsupported or corrupt GGUF)")
        try:
            self._setup(lm_path, mm_path, mmproj_offload, ctx)
        except BaseException:
            self.close()
            raise

    def _setup(self, lm_path: Path, mm_path: Path, mmproj_offload: bool, n_ctx: int) -> None:
        from m3cli.convert.gguf_writer import LAYOUT_CLS_LAST, LAYOUT_NATURAL, VARIANT_MAIN, rot180_path
        from m3cli.convert.mmproj_cache import cached_fixed_mmproj
        from m3cli.convert.mmproj_fix import MmprojError, rewrite_mmproj, validate_mmproj

        L, M = self._llama, self._mtmd
        self.vocab = L.llama_model_get_vocab(self.model_ptr)
        self.n_embd = int(L.llama_model_n_embd_inp(self.model_ptr)) if hasattr(L, "llama_model_n_embd_inp") \
            else int(L.llama_model_n_embd(self.model_ptr))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        try:
            info = validate_mmproj(mm_path, n_embd_text=self.n_embd)
            if info.variant != VARIANT_MAIN:
                raise ModelLoadError(f"{mm_path} is a rot180 companion; pass the main mmproj")
            self.mmproj_path = mm_path  # the user's file, as given (never written)
            if info.layout != LAYOUT_CLS_LAST or not info.feature_layers:
                # a third-party (legacy-converter) mmproj: load a corrected copy, made once into the cache
                mm_path, _ = cached_fixed_mmproj(mm_path)
                info = validate_mmproj(mm_path, n_embd_text=self.n_embd)
        except MmprojError as exc:
            raise ModelLoadError(str(exc)) from exc
        self.loaded_mmproj_path = mm_path
        self.info = info
        self.grid_side = info.grid_side
        self.scales = nested_scales(self.grid_side)
        self.image_size = info.image_size

        probe = probe_llamacpp()
        self.probe = probe
        if probe.signature == "unknown":
            raise ModelLoadError(f"this llama.cpp build encodes LLaVA in an unrecognised way ({probe.describe()}); "
                                 "use a llama-cpp-python version this m3cli release knows (0.3.36)")
        main_path = mm_path
        self.row_fix = probe.signature == SIG_BUGGY
        if not self.row_fix:
            # a fixed llama.cpp reads positions in natural order: undo our permutation in a temp copy
            self._tmpdir = tempfile.TemporaryDirectory(prefix="m3-mmproj-")
            main_path = rewrite_mmproj(mm_path, Path(self._tmpdir.name) / "mmproj-natural.gguf", LAYOUT_NATURAL)
            self.patch0 = "none"
        self._rot_path = rot180_path(mm_path)
        self._mm_offload = mmproj_offload

        self.mctx = M.mtmd_init_from_file(str(main_path).encode(), self.model_ptr,
                                          _mtmd_params(M, mmproj_offload, self.threads))
        if not self.mctx:
            raise ModelLoadError(f"llama.cpp could not load mmproj {mm_path} (incompatible with {lm_path.name})")
        if self.row_fix and self.patch0 == "exact":
            self._ensure_rot()

        cparams = L.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = int(max(n_ctx, 512))
        cparams.n_ubatch = int(min(max(info.n_patches, 512), cparams.n_batch))
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        if hasattr(cparams, "no_perf"):
            cparams.no_perf = True
        self.lctx = L.llama_init_from_model(self.model_ptr, cparams)
        if not self.lctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {lm_path.name} (n_ctx={n_ctx})")
        self.n_ctx = int(n_ctx)
        self.n_batch = int(cparams.n_batch)
        self.mem = L.llama_get_memory(self.lctx)
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(info.n_patches, self.n_embd, 1)

        self.chat_template = self._meta("tokenizer.chat_template")
        if not self.chat_template:
            raise ModelLoadError(f"{lm_path.name} has no tokenizer.chat_template")
        image_id = self._meta("m3cli.image_token_id")
        self.image_token_id = int(image_id) if image_id else self._token_id("<image>")
        if self.image_token_id is None:
            raise ModelLoadError(f"{lm_path.name}: no <image> token in the vocabulary")
        self.bos_text = self._piece(L.llama_vocab_bos(self.vocab), special=True)
        self.eos_text = self._piece(L.llama_vocab_eos(self.vocab), special=True)
        self._prompt_cache: dict[str, tuple[list[int], list[int]]] = {}
        self._kv_prefix: list[int] = []    # text tokens currently at the start of seq 0

    # -- small helpers -----------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        L = self._llama
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.model_ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _piece(self, token: int, special: bool) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self.vocab, int(token), buf, 256, 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def _token_id(self, text: str) -> int | None:
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        arr = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (self._llama.llama_token * cap)()
            n = self._llama.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, parse_special)
        return list(arr[:n])

    def detokenize(self, ids: list[int]) -> str:
        if not ids:
            return ""
        arr = (self._llama.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(cap)
        n = self._llama.llama_detokenize(self.vocab, arr, len(ids), buf, cap, True, False)
        if n < 0:
            cap = -n + 1
            buf = ctypes.create_string_buffer(cap)
            n = self._llama.llama_detokenize(self.vocab, arr, len(ids), buf, cap, True, False)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def _ensure_rot(self) -> None:
        """Load the rot180 companion (deriving it into a temp dir if it is not next to the mmproj)."""
        if self.mctx_rot:
            return
        from m3cli.convert.gguf_writer import LAYOUT_CLS_LAST, VARIANT_ROT180
        from m3cli.convert.mmproj_fix import MmprojError, rewrite_mmproj, validate_mmproj

        path = self._rot_path
        ok = False
        if path.is_file():
            try:
                info = validate_mmproj(path, n_embd_text=self.n_embd)
                ok = info.variant == VARIANT_ROT180 and info.n_patches == self.info.n_patches
            except MmprojError:
                ok = False
        if not ok:
            if self._tmpdir is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="m3-mmproj-")
            path = rewrite_mmproj(self.loaded_mmproj_path, Path(self._tmpdir.name) / "mmproj.rot180.gguf",
                                  LAYOUT_CLS_LAST, VARIANT_ROT180)
        self.mctx_rot = self._mtmd.mtmd_init_from_file(str(path).encode(), self.model_ptr,
                                                       _mtmd_params(self._mtmd, self._mm_offload, self.threads))
        if not self.mctx_rot:
            raise ModelLoadError(f"llama.cpp could not load the patch-0 companion {path}")

    # -- prompts ---------------------------------------------------------------------------
    def render_prompt(self, question: str) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = getattr(self, "_jinja", None)
        if env is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            self._jinja = env
            self._template = env.from_string(self.chat_template)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_text, eos_token=self.eos_text)

    def prompt_parts(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single image placeholder of the chat prompt."""
        parts = self._prompt_cache.get(question)
        if parts is None:
            ids = self.tokenize(self.render_prompt(question), add_special=True, parse_special=True)
            if ids.count(self.image_token_id) != 1:
                raise ModelLoadError(f"{self.model_id}: chat template must place exactly one image token")
            at = ids.index(self.image_token_id)
            parts = (ids[:at], ids[at + 1:])
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[question] = parts
        return parts

    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        pre, post = self.prompt_parts(question)
        return pre + [self.image_token_id] * n_image_tokens + post

    # -- encoding --------------------------------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        """Resize the shortest edge to the model's image size (bicubic) and centre-crop, like CLIP's processor."""
        from PIL import Image

        img = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
        size = self.image_size
        w, h = img.size
        if (w, h) != (size, size):
            if w <= h:
                nw, nh = size, max(size, int(round(h * size / w)))
            else:
                nw, nh = max(size, int(round(w * size / h))), size
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)

    def _raw(self, mctx, rgb: np.ndarray) -> np.ndarray:
        try:
            out = _encode_rgb(self._mtmd, mctx, rgb, self.n_embd)
        except RuntimeError as exc:
            raise ModelLoadError(f"llama.cpp image encode failed: {exc}") from exc
        if out.shape[0] != self.info.n_patches:
            raise ModelLoadError(f"mtmd returned {out.shape[0]} image tokens, expected {self.info.n_patches}")
        return out

    def _patch0_exact(self, rgb: np.ndarray) -> np.ndarray:
        self._ensure_rot()
        rot = np.ascontiguousarray(rgb[::-1, ::-1])
        out = self._raw(self.mctx_rot, rot)
        return out[self.info.n_patches - 2]       # row k is original patch N-2-k; k = N-2 -> patch 0

    def encode(self, images: Sequence) -> list[Encoded]:
        """mtmd once per image (twice for patch0='exact'); returns (G*G, n_embd) float32 grids."""
        results: list[Encoded] = []
        g = self.grid_side
        for image in images:
            start = time.perf_counter()
            rgb = self.preprocess(image)
            raw = self._raw(self.mctx, rgb)
            if not self.row_fix:
                grid, exact, pixels = raw, True, None
            else:
                grid = np.empty_like(raw)
                grid[1:] = raw[:-1]               # rows are HF patches 1..N-1, then CLS
                if self.patch0 == "exact":
                    grid[0] = self._patch0_exact(rgb)
                    exact, pixels = True, None
                else:
                    grid[0] = fill_patch0(grid, g)
                    exact, pixels = False, (rgb if self.patch0 == "auto" else None)
            ms = (time.perf_counter() - start) * 1000
            results.append(LlamaEncoded(grid=grid, side=g, encode_ms=ms, pixels=pixels, patch0_exact=exact))
        return results

    def _grid_for(self, enc: Encoded, scale: int) -> np.ndarray:
        grid = np.asarray(enc.grid, dtype=np.float32)
        if (isinstance(enc, LlamaEncoded) and not enc.patch0_exact and enc.pixels is not None
                and self.patch0 == "auto" and scale >= AUTO_EXACT_MIN_SCALE):
            start = time.perf_counter()
            grid = grid.copy()
            grid[0] = self._patch0_exact(enc.pixels)
            enc.grid, enc.patch0_exact, enc.pixels = grid, True, None
            enc.encode_ms += (time.perf_counter() - start) * 1000
        return grid

    # -- decoding --------------------------------------------------------------------------
    def _decode_tokens(self, ids: list[int], pos0: int, want_logits: bool) -> None:
        L, b = self._llama, self._tok_batch
        for off in range(0, len(ids), self.n_batch):
            chunk = ids[off: off + self.n_batch]
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos0 + off + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            last = off + len(chunk) == len(ids)
            b.logits[len(chunk) - 1] = 1 if (want_logits and last) else 0
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.lctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")

    def _decode_embd(self, emb: np.ndarray, pos0: int) -> None:
        L, b = self._llama, self._emb_batch
        n = emb.shape[0]
        data = np.ascontiguousarray(emb, dtype=np.float32)
        ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)
        for i in range(n):
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.n_tokens = n
        rc = L.llama_decode(self.lctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode (image embeddings) failed ({rc})")

    def _logprobs(self) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(self.lctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))

    def _answer_one(self, req: AnswerRequest) -> Generation:
        L = self._llama
        pooled = pool_np(self._grid_for(req.encoded, req.scale), req.scale)
        pre, post = self.prompt_parts(req.question)
        total = len(pre) + req.scale + len(post) + req.max_new_tokens
        if total > self.n_ctx:
            raise ValueError(f"prompt + answer needs {total} positions, context is {self.n_ctx} (raise ctx)")
        start = time.perf_counter()
        # reuse the KV of the text before the image when it is unchanged (it nearly always is)
        keep = self._kv_prefix == pre and L.llama_memory_seq_rm(self.mem, 0, len(pre), -1)
        if not keep:
            L.llama_memory_clear(self.mem, True)
            self._kv_prefix = []
            self._decode_tokens(pre, 0, want_logits=False)
            self._kv_prefix = list(pre)
        self._decode_embd(pooled, len(pre))
        pos = len(pre) + req.scale
        self._decode_tokens(post, pos, want_logits=True)
        pos += len(post)
        prefill_ms = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        tokens: list[int] = []
        logprobs: list[float] = []
        for _ in range(req.max_new_tokens):
            lp = self._logprobs()
            tok = int(lp.argmax())
            if L.llama_vocab_is_eog(self.vocab, tok):
                break
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            if len(tokens) >= req.max_new_tokens:
                break
            self._decode_tokens([tok], pos, want_logits=True)
            pos += 1
        decode_ms = (time.perf_counter() - start) * 1000
        return Generation(text=self.detokenize(tokens).strip(), token_ids=tokens, logprobs=logprobs,
                          prefill_ms=prefill_ms, decode_ms=decode_ms)

    def answer(self, requests: Sequence[AnswerRequest]) -> list[Generation]:
        """One request at a time (KV of the shared text prefix is kept between requests)."""
        out = []
        for req in requests:
            try:
                out.append(self._answer_one(req))
            except RuntimeError:
                self._kv_prefix = []
                raise
        return out

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        L, M = self._llama, self._mtmd
        for batch_attr in ("_tok_batch", "_emb_batch"):
            batch = getattr(self, batch_attr, None)
            if batch is not None:
                L.llama_batch_free(batch)
                setattr(self, batch_attr, None)
        for attr in ("mctx", "mctx_rot"):
            ctx = getattr(self, attr, None)
            if ctx:
                M.mtmd_free(ctx)
                setattr(self, attr, None)
        if getattr(self, "lctx", None):
            L.llama_free(self.lctx)
            self.lctx = None
        if getattr(self, "model_ptr", None):
            L.llama_model_free(self.model_ptr)
            self.model_ptr = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def load_llamacpp(model: str, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                  mmproj: str | None = None, **options) -> LlamaCppBackend:
    """The CLI's entry point: maps the shared ``--device/--dtype/--threads`` options.

    ``--device cpu`` keeps everything on the CPU (no layer offload, mmproj on CPU); ``auto``
    offloads everything when the linked llama.cpp supports a GPU. ``--dtype`` must stay
    ``auto``: a GGUF file fixes its own weight types (convert with another ``--outtype``).
    """
    if dtype not in (None, "auto"):
        raise ModelLoadError(f"--dtype {dtype} does not apply to GGUF models (their type is fixed at conversion)")
    if device not in (None, "auto", "cpu") and not str(device).startswith(("cuda", "gpu", "metal", "mps")):
        raise ModelLoadError(f"unknown --device {device!r} for the llama.cpp backend (auto or cpu)")
    if device == "cpu":
        options.setdefault("n_gpu_layers", 0)
        options.setdefault("mmproj_offload", False)
    return LlamaCppBackend(model, mmproj=mmproj, threads=threads, **options)


def fill_patch0(grid: np.ndarray, side: int) -> np.ndarray:
    """Cheap stand-in for the lost patch 0: the mean of its right, lower and diagonal neighbours."""
    return (grid[1] + grid[side] + grid[side + 1]) / 3.0
