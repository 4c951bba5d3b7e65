"""llama.cpp backend (GGUF): mtmd/clip encodes the image, M3 pools it in NumPy, llama decodes.

The projected 24x24 grid is read back from mtmd, pooled with ``scales.pool_np`` and fed to the
language model as embeddings in a ``llama_batch`` between the prompt's text tokens; decoding is
greedy with per-token log-probabilities, like the torch backend.

The prompt and the preprocessing are the model family's (``family``): the recipe from the GGUF's metadata
or ``--chat-template``, tokenised through the family layer with llama.cpp's vocabulary (``tokenizer``), so
the ids equal the torch backend's; the image padded or cropped to the tower's size exactly as the torch
backend does, so mtmd only normalises it.

LLaVA-1.6 (NeXT) pairs: the family cuts the anyres crops (base crop, then the tiles), mtmd encodes each one as a
tower-size image through the same one-crop path (m3's corrected mmproj copy has its anyres keys moved aside, so
mtmd never cuts or packs crops itself), every crop is pooled to the request's scale and the family packs them
with the mmproj's learned ``image_newline``, exactly as the torch backend does.

With the row order of the stock build (see ``probe``) our mmproj returns HF's patches 1..N-1 and
then CLS: the rows are shifted back and patch 0 comes either from a second pass (companion
``*.rot180.gguf``: image and kernel rotated 180 degrees) or from a fill with its neighbours; see
``patch0`` and docs/gguf.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3cli.backends import visual_counts
from m3cli.backends.base import AnswerRequest, Encoded, Generation, ModelLoadError, finish, stop_index, stops_early
from m3cli.backends.llamacpp import native
from m3cli.backends.llamacpp.family import crop_arrays, gguf_family, tower_array
from m3cli.backends.llamacpp.files import check_gguf_file, find_mmproj, gguf_metadata
from m3cli.backends.llamacpp.probe import SIG_BUGGY, probe_llamacpp
from m3cli.backends.llamacpp.tokenizer import LlamaCppAdapter
from m3cli.backends.prompt import FamilyPrompt
from m3cli.gguf.cache import cached_fixed_mmproj
from m3cli.gguf.keys import IMAGE_TOKEN_ID_KEY
from m3cli.gguf.layout import LAYOUT_CLS_LAST, LAYOUT_NATURAL, VARIANT_MAIN, VARIANT_ROT180, rot180_path
from m3cli.gguf.mmproj import MmprojError, read_image_newline, rewrite_mmproj, validate_mmproj
from m3cli.matryoshka.scales import nested_scales, pool_np

PATCH0_MODES = ("auto", "exact", "fill")
# Scales at which the patch-0 fill measurably changes answers (docs/gguf.md: greedy agreement
# with torch drops from ~98-100% to 57-93% at 576/144/36 and does not move at 9 and 1); "auto"
# runs the exact second pass lazily, only when a request at one of these scales arrives.
AUTO_EXACT_MIN_SCALE = 36
DEFAULT_CTX = 2048
NEXT_DEFAULT_CTX = 4096   # LLaVA-1.6 at 576 per crop: up to 2928 visual tokens for a 2x2 layout

log = logging.getLogger(__name__)


@dataclass
class LlamaEncoded(Encoded):
    """An encoded grid plus what the lazy exact patch-0 pass needs."""

    # the preprocessed uint8 crops, HxWx3 (LLaVA-NeXT: CxHxWx3, one per crop), kept only while patch 0 is filled;
    # ``grid`` is (N, D), or (C, N, D) for LLaVA-NeXT
    pixels: np.ndarray | None = None
    patch0_exact: bool = True


class LlamaCppBackend:
    """GGUF LLaVA through llama-cpp-python's low-level API (llama + mtmd).

    ``chat_template`` is ``--chat-template FILE|NAME`` (a jinja / ``chat_template.json`` file or a recipe
    name such as ``vicuna_v1``); without it the GGUF's own recipe or template is used, and a GGUF without
    either gets LLaVA-1.5's ``vicuna_v1`` with a one-line notice (:attr:`notice`, logged as a warning).
    ``prefix_after_special`` states whether the source tokenizer put a "▁" after special tokens, for a pair
    that does not record it (None: the pair's ``m3cli.prefix_after_special`` key, else yes for SentencePiece).
    """

    name = "llamacpp"

    def __init__(self, model: str, mmproj: str | None = None, n_gpu_layers: int | None = None,
                 mmproj_offload: bool = True, threads: int | None = None, ctx: int | None = None,
                 verbose: bool = False, patch0: str = "auto", chat_template: str | None = None,
                 prefix_after_special: bool | None = None):
        if patch0 not in PATCH0_MODES:
            raise ModelLoadError(f"unknown patch0 mode {patch0!r} (one of {', '.join(PATCH0_MODES)})")
        self._closed = False
        self.model_ptr = self.lctx = self.mctx = self.mctx_rot = None
        self._tok_batch = self._emb_batch = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        llama_cpp, mtmd = native.libs()
        self._llama, self._mtmd = llama_cpp, mtmd
        native.backend_init(llama_cpp)
        native.set_logging(llama_cpp, mtmd, verbose)
        self.model_id = str(model)
        self.patch0 = patch0
        self.threads = int(threads or os.cpu_count() or 1)
        lm_path = check_gguf_file(model, "model file")
        lm_meta = gguf_metadata(lm_path)
        if lm_meta.get("general.architecture") == "clip":
            raise ModelLoadError(f"{model} is an mmproj, not a language model (pass it as --mmproj)")
        mm_path = check_gguf_file(mmproj, "mmproj file") if mmproj else find_mmproj(lm_path)
        # the family (recipe, preprocessing) before any weights load: anything m3 cannot run is refused here
        self.family, self.notice = gguf_family(lm_path, lm_meta, gguf_metadata(mm_path), chat_template=chat_template,
                                               prefix_after_special=prefix_after_special)
        self.spec = self.family.spec
        self.recipe = self.family.recipe
        self.next = self.spec.family == "llavanext"
        if ctx is None:
            ctx = NEXT_DEFAULT_CTX if self.next else DEFAULT_CTX
        self._lm_meta = lm_meta

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
        L, M = self._llama, self._mtmd
        self.vocab = L.llama_model_get_vocab(self.model_ptr)
        self.n_embd = int(L.llama_model_n_embd_inp(self.model_ptr)) if hasattr(L, "llama_model_n_embd_inp") \
            else int(L.llama_model_n_embd(self.model_ptr))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.mmproj_path = mm_path  # the user's file, as given (never written)
        mm_path, info = self._checked_mmproj(mm_path)
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
                                          native.mtmd_params(M, mmproj_offload, self.threads))
        if not self.mctx:
            raise ModelLoadError(f"llama.cpp could not load mmproj {mm_path} (incompatible with {lm_path.name})")
        if self.row_fix and self.patch0 == "exact":
            self._ensure_rot()
        if self.image_size != self.spec.image.size:
            raise ModelLoadError(f"{mm_path}: image size {self.image_size} differs from {self.spec.image.size}")
        self.newline = self._newline(mm_path) if self.next else None
        self._create_context(lm_path, n_ctx)
        self._setup_prompt()
        self._kv_prefix: list[int] = []    # text tokens currently at the start of seq 0
        if self.notice:
            log.warning("%s", self.notice)

    def _checked_mmproj(self, mm_path: Path):
        """(path to load, its MmprojInfo): the user's mmproj, or for a legacy one its corrected cached copy."""
        try:
            info = validate_mmproj(mm_path, n_embd_text=self.n_embd)
            if info.variant != VARIANT_MAIN:
                raise ModelLoadError(f"{mm_path} is a rot180 companion; pass the main mmproj")
            if info.layout != LAYOUT_CLS_LAST or not info.feature_layers:
                # a third-party (legacy-converter) mmproj: load a corrected copy, made once into the cache
                mm_path, _ = cached_fixed_mmproj(mm_path)
                info = validate_mmproj(mm_path, n_embd_text=self.n_embd)
        except MmprojError as exc:
            raise ModelLoadError(str(exc)) from exc
        return mm_path, info

    def _newline(self, mm_path: Path) -> np.ndarray:
        """The LLaVA-1.6 mmproj's learned ``image_newline`` (n_embd,), or a one-line refusal."""
        try:
            newline = read_image_newline(mm_path)
        except MmprojError as exc:
            raise ModelLoadError(str(exc)) from exc
        if newline is None:
            raise ModelLoadError(f"{self.mmproj_path}: a LLaVA-1.6 (anyres) mmproj without model.image_newline "
                                 "(the learned newline every tile row ends with)")
        if newline.shape != (self.n_embd,):
            raise ModelLoadError(f"{self.mmproj_path}: image_newline has {newline.size} values, the language "
                                 f"model is {self.n_embd} wide")
        return newline

    def _create_context(self, lm_path: Path, n_ctx: int) -> None:
        """The llama context, its memory and the two batches (text tokens, image embeddings)."""
        L = self._llama
        cparams = L.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = int(max(n_ctx, 512))
        cparams.n_ubatch = int(min(max(self.info.n_patches, 512), cparams.n_batch))
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
        rows = visual_counts.visual_token_count(self.family, self.info.n_patches)
        if rows > self.n_batch:
            raise ModelLoadError(f"{lm_path.name}: up to {rows} visual tokens per image at {self.info.n_patches} "
                                 f"per crop, more than the context of {n_ctx} (raise --ctx)")
        self._emb_batch = L.llama_batch_init(rows, self.n_embd, 1)

    def _setup_prompt(self) -> None:
        """The llama.cpp tokenizer adapter and the family's prompt builder over it."""
        image_id = self._lm_meta.get(IMAGE_TOKEN_ID_KEY)
        self.tokenizer = LlamaCppAdapter(self._llama, self.vocab, self._lm_meta, image_token=self.spec.image_token,
                                         image_token_id=int(image_id) if image_id is not None else None)
        self.image_token_id = self.tokenizer.image_token_id
        self.prompt = FamilyPrompt(self.family, self.tokenizer, self.model_id)

    # -- small helpers -----------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text`` in this model's vocabulary."""
        return native.tokenize(self._llama, self.vocab, text, add_special, parse_special)

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids`` (special tokens removed)."""
        return native.detokenize(self._llama, self.vocab, ids)

    def _ensure_rot(self) -> None:
        """Load the rot180 companion (deriving it into a temp dir if it is not next to the mmproj)."""
        if self.mctx_rot:
            return
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
                                                       native.mtmd_params(self._mtmd, self._mm_offload, self.threads))
        if not self.mctx_rot:
            raise ModelLoadError(f"llama.cpp could not load the patch-0 companion {path}")

    # -- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        """Token ids of the chat prompt with exactly ``n_image_tokens`` image placeholders."""
        return self.prompt.ids(question, n_image_tokens)

    # -- visual token counts -------------------------------------------------------------
    def visual_token_count(self, scale: int, image_hw: tuple[int, int] | None = None) -> int:
        """Visual embeddings the LM receives at per-crop ``scale`` for an ``(h, w)`` image
        (:func:`m3cli.backends.visual_counts.visual_token_count`)."""
        return visual_counts.visual_token_count(self.family, scale, image_hw)

    def scale_within(self, max_visual_tokens: int, encoded: Encoded) -> int:
        """The largest per-crop scale whose total visual tokens for this encoded image fit ``max_visual_tokens``."""
        return visual_counts.scale_within(self.family, max_visual_tokens, encoded.image_hw, self.scales,
                                          self.grid_side)

    # -- encoding --------------------------------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        """The ``size`` x ``size`` x 3 uint8 image handed to mtmd: the family's tower image (pad or crop), the
        same pixels the torch backend normalises; mtmd copies a bitmap of its own size unchanged."""
        return tower_array(self.family, image)

    def _raw(self, mctx, rgb: np.ndarray) -> np.ndarray:
        try:
            out = native.encode_rgb(self._mtmd, mctx, rgb, self.n_embd)
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

    def _encode_crop(self, rgb: np.ndarray) -> tuple[np.ndarray, bool, np.ndarray | None]:
        """(grid (N, D), patch 0 exact, pixels kept for the lazy exact pass) of one tower-size crop."""
        raw = self._raw(self.mctx, rgb)
        if not self.row_fix:
            return raw, True, None
        grid = np.empty_like(raw)
        grid[1:] = raw[:-1]               # rows are HF patches 1..N-1, then CLS
        if self.patch0 == "exact":
            grid[0] = self._patch0_exact(rgb)
            return grid, True, None
        grid[0] = fill_patch0(grid, self.grid_side)
        return grid, False, (rgb if self.patch0 == "auto" else None)

    def encode(self, images: Sequence) -> list[Encoded]:
        """mtmd once per crop (twice for patch0='exact'); returns (G*G, n_embd) float32 grids (LLaVA-NeXT:
        (crops, G*G, n_embd), the base crop first, with the original image's size)."""
        results: list[Encoded] = []
        g = self.grid_side
        for image in images:
            start = time.perf_counter()
            if not self.next:
                grid, exact, pixels = self._encode_crop(self.preprocess(image))
                ms = (time.perf_counter() - start) * 1000
                results.append(LlamaEncoded(grid=grid, side=g, encode_ms=ms, pixels=pixels, patch0_exact=exact))
                continue
            parts = [self._encode_crop(rgb) for rgb in crop_arrays(self.family, image)]
            exact = all(p[1] for p in parts)
            pixels = np.stack([p[2] for p in parts]) if not exact and parts[0][2] is not None else None
            ms = (time.perf_counter() - start) * 1000
            results.append(LlamaEncoded(grid=np.stack([p[0] for p in parts]), side=g, encode_ms=ms,
                                        image_hw=(image.height, image.width), crops=len(parts), pixels=pixels,
                                        patch0_exact=exact))
        return results

    def _grid_for(self, enc: Encoded, scale: int) -> np.ndarray:
        grid = np.asarray(enc.grid, dtype=np.float32)
        if (isinstance(enc, LlamaEncoded) and not enc.patch0_exact and enc.pixels is not None
                and self.patch0 == "auto" and scale >= AUTO_EXACT_MIN_SCALE):
            start = time.perf_counter()
            grid = grid.copy()
            if grid.ndim == 3:
                for i, rgb in enumerate(enc.pixels):
                    grid[i, 0] = self._patch0_exact(rgb)
            else:
                grid[0] = self._patch0_exact(enc.pixels)
            enc.grid, enc.patch0_exact, enc.pixels = grid, True, None
            enc.encode_ms += (time.perf_counter() - start) * 1000
        return grid

    def _visual(self, enc: Encoded, scale: int) -> np.ndarray:
        """The request's visual embeddings (n, n_embd): the grid pooled to ``scale`` (LLaVA-NeXT: every crop
        pooled, then packed by the family with the newline)."""
        grid = self._grid_for(enc, scale)
        if not self.next:
            visual = self.family.visual_tokens([pool_np(grid, scale)])
        else:
            if grid.ndim != 3 or enc.image_hw is None:
                raise ValueError("a LLaVA-NeXT request needs an image encoded by this backend (its crops' grids)")
            visual = self.family.visual_tokens(list(pool_np(grid, scale)), image_hw=enc.image_hw,
                                               newline=self.newline)
        return np.ascontiguousarray(visual, dtype=np.float32)

    # -- decoding --------------------------------------------------------------------------
    def _decode_tokens(self, ids: list[int], pos0: int, want_logits: bool) -> None:
        native.decode_tokens(self._llama, self.lctx, self._tok_batch, self.n_batch, ids, pos0, want_logits)

    def _answer_one(self, req: AnswerRequest) -> Generation:
        L = self._llama
        visual = self._visual(req.encoded, req.scale)
        pre, post = self.prompt.parts(req.question)
        total = len(pre) + len(visual) + len(post) + req.max_new_tokens
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
        native.decode_embd(L, self.lctx, self._emb_batch, visual, len(pre))
        pos = len(pre) + len(visual)
        self._decode_tokens(post, pos, want_logits=True)
        pos += len(post)
        prefill_ms = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        tokens: list[int] = []
        logprobs: list[float] = []
        stopped = ended = False
        for _ in range(req.max_new_tokens):
            lp = native.last_logprobs(L, self.lctx, self.n_vocab)
            tok = int(lp.argmax())
            if L.llama_vocab_is_eog(self.vocab, tok):
                ended = True
                break
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            stopped = stops_early(req, logprobs)
            if stopped or len(tokens) >= req.max_new_tokens:
                break
            if req.stop and stop_index(self.detokenize(tokens), req.stop) is not None:
                ended = True
                break
            self._decode_tokens([tok], pos, want_logits=True)
            pos += 1
        decode_ms = (time.perf_counter() - start) * 1000
        text, reason = finish(self.detokenize(tokens), req.stop, len(tokens), req.max_new_tokens, ended)
        return Generation(text=text, token_ids=tokens, logprobs=logprobs, prefill_ms=prefill_ms, decode_ms=decode_ms,
                          stopped_early=stopped, visual_tokens=int(visual.shape[0]), finish_reason=reason,
                          prompt_tokens=len(pre) + len(visual) + len(post), completion_tokens=len(tokens))

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
