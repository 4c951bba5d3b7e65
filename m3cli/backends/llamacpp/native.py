"""The calls into llama-cpp-python's low-level API (llama + mtmd): libraries, logging, vocabulary,
batches and the mtmd image encode. Everything that touches ctypes lives here."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from m3cli.backends.base import ModelLoadError

# process-wide: llama_backend_init runs once, and the log callback must outlive every call into the library
_STATE: dict = {"backend_init": False, "log_cb": None}


def libs():
    """``(llama_cpp, llama_cpp.mtmd_cpp)``, or a one-line ModelLoadError naming the missing extra."""
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


def set_logging(llama_cpp, mtmd, verbose: bool) -> None:
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


def logging_set() -> bool:
    """Whether :func:`set_logging` has run in this process."""
    return _STATE["log_cb"] is not None


def backend_init(llama_cpp) -> None:
    """``llama_backend_init`` once per process."""
    if not _STATE["backend_init"]:
        llama_cpp.llama_backend_init()
        _STATE["backend_init"] = True


def mtmd_params(mtmd, use_gpu: bool, threads: int):
    """mtmd context parameters: no warm-up, no timing prints."""
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = bool(use_gpu)
    params.n_threads = int(threads)
    params.print_timings = False
    params.warmup = False
    return params


def encode_rgb(mtmd, mctx, rgb: np.ndarray, n_embd: int) -> np.ndarray:
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


# -- vocabulary ------------------------------------------------------------------------------
def meta_str(llama, model_ptr, key: str) -> str | None:
    """A model metadata value as text (None when the key is absent)."""
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_model_meta_val_str(model_ptr, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


def token_piece(llama, vocab, token: int, special: bool) -> str:
    """The text of one token (``special``: render control tokens too)."""
    buf = ctypes.create_string_buffer(256)
    n = llama.llama_token_to_piece(vocab, int(token), buf, 256, 0, special)
    return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


def tokenize(llama, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """Token ids of ``text`` (``add_special``: BOS as the model adds it; ``parse_special``: control tokens)."""
    raw = text.encode("utf-8")
    cap = len(raw) + 8
    arr = (llama.llama_token * cap)()
    n = llama.llama_tokenize(vocab, raw, len(raw), arr, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        arr = (llama.llama_token * cap)()
        n = llama.llama_tokenize(vocab, raw, len(raw), arr, cap, add_special, parse_special)
    return list(arr[:n])


def detokenize(llama, vocab, ids: list[int]) -> str:
    """The text of ``ids`` with special tokens removed."""
    if not ids:
        return ""
    arr = (llama.llama_token * len(ids))(*ids)
    cap = 16 * len(ids) + 16
    buf = ctypes.create_string_buffer(cap)
    n = llama.llama_detokenize(vocab, arr, len(ids), buf, cap, True, False)
    if n < 0:
        cap = -n + 1
        buf = ctypes.create_string_buffer(cap)
        n = llama.llama_detokenize(vocab, arr, len(ids), buf, cap, True, False)
    return buf.raw[:n].decode("utf-8", errors="replace")


# -- decoding --------------------------------------------------------------------------------
def decode_tokens(llama, lctx, batch, n_batch: int, ids: list[int], pos0: int, want_logits: bool) -> None:
    """Feed ``ids`` to sequence 0 from position ``pos0`` in chunks of ``n_batch`` (logits for the last one)."""
    for off in range(0, len(ids), n_batch):
        chunk = ids[off: off + n_batch]
        for i, tok in enumerate(chunk):
            batch.token[i] = tok
            batch.pos[i] = pos0 + off + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        last = off + len(chunk) == len(ids)
        batch.logits[len(chunk) - 1] = 1 if (want_logits and last) else 0
        batch.n_tokens = len(chunk)
        rc = llama.llama_decode(lctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")


def decode_embd(llama, lctx, batch, emb: np.ndarray, pos0: int) -> None:
    """Feed the rows of ``emb`` (n, n_embd) to sequence 0 as input embeddings from position ``pos0``."""
    n = emb.shape[0]
    data = np.ascontiguousarray(emb, dtype=np.float32)
    ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
    for i in range(n):
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 0
    batch.n_tokens = n
    rc = llama.llama_decode(lctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode (image embeddings) failed ({rc})")


def last_logprobs(llama, lctx, n_vocab: int) -> np.ndarray:
    """Log-softmax of the last decoded position's logits (float64)."""
    ptr = llama.llama_get_logits_ith(lctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    m = logits.max()
    return logits - (m + np.log(np.exp(logits - m).sum()))
