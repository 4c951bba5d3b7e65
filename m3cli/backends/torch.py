"""PyTorch / transformers backend: a Hugging Face LLaVA or LLaVA-NeXT with M3 pooling after the projector.

The model's family (:mod:`m3cli.families`) is detected from its files before any weights load
(:func:`m3cli.backends.locate.locate_model`, which also finds hub ids and converts original-layout
checkpoints once into the cache); the family then gives the backend its pixels (``pad`` for original
LLaVA-1.5 checkpoints and their conversions, ``crop`` for llava-hf's CLIP processor, ``anyres`` crops for
LLaVA-NeXT) and its prompt ids (the family's recipe through :class:`~m3cli.families.HFTokenizerAdapter`).
transformers supplies the modelling code and the tokenizer only.

LLaVA-NeXT (:mod:`m3cli.backends.next_features`): every crop goes through the tower + projector once at encode;
each request pools every crop to its per-crop scale and the family packs them (base crop, unpadded tile grid,
one ``image_newline`` per row), so the prompt holds ``len(visual)`` placeholders, not the scale. The prefill,
the shared-prefix KV cache and the early exit are the same for both families.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from m3cli.backends import visual_counts
from m3cli.backends.base import AnswerRequest, Encoded, Generation, ModelLoadError, finish, stop_index, stops_early
from m3cli.backends.prompt import FamilyPrompt
from m3cli.errors import M3Error, describe
from m3cli.matryoshka.scales import nested_scales, pool
from m3cli.models.dtypes import DTYPES, torch_dtype

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> str:
    """cuda > mps > cpu for ``auto``; otherwise the requested device, checked to exist."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested}: CUDA is not available on this machine")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps: MPS is not available on this machine")
    if requested != "cpu" and not requested.startswith(("cuda", "mps")):
        raise ModelLoadError(f"unknown --device {requested!r} (use auto, cpu, cuda, cuda:N or mps)")
    return requested


def pick_dtype(device: str, requested: str = "auto"):
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, fp32 on CPU; or as requested."""
    import torch

    if requested != "auto":
        if requested not in DTYPES:
            raise ModelLoadError(f"unknown --dtype {requested!r} (use auto, float32, float16 or bfloat16)")
        return torch_dtype(requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


class TorchBackend:
    """Transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` with pooled
    features and greedy decoding."""

    name = "torch"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 vision_tower: str | Path | None = None, chat_template: str | None = None):
        from m3cli.backends.locate import find_model, prepare_model
        from m3cli.families import HFTokenizerAdapter, follow_tokenizer

        # detection first (no torch, no weights), then the device, then the one-time conversion and the load
        found = find_model(str(model), vision_tower=vision_tower, chat_template=chat_template)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        located = prepare_model(found)
        self.model_id = str(model)
        self.model_dir = located.path
        self.family = located.family
        self.spec = located.family.spec
        if self.spec.family not in ("llava15", "llavanext"):
            raise ModelLoadError(f"{model}: the torch backend runs LLaVA-1.5 and LLaVA-NeXT models, not "
                                 f"{self.spec.name}")
        self.next = self.spec.family == "llavanext"
        self.processor = _load_processor(self.model_id, located.path)
        self.tokenizer = self.processor.tokenizer
        # the prompt is checked against the tokenizer before the weights load
        adapter = HFTokenizerAdapter(self.tokenizer)
        self.family = follow_tokenizer(self.family, adapter)
        self.spec = self.family.spec
        self.prompt = FamilyPrompt(self.family, adapter, self.model_id)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model = _load_weights(self.model_id, located.path, self.device, self.dtype, next_=self.next)
        cfg = self.model.config
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise ModelLoadError(f"{model}: only LLaVA models that drop CLS ('default' strategy) are supported")
        vision = cfg.vision_config
        if vision.image_size != self.spec.image.size:
            raise ModelLoadError(f"{model}: the vision tower takes {vision.image_size}px images but the image "
                                 f"processor makes {self.spec.image.size}px ones")
        self.grid_side = vision.image_size // vision.patch_size  # per crop
        self.scales = nested_scales(self.grid_side)
        self.feature_layer = _drop_unused_tower_layers(self.model)
        self.image_token_id = cfg.image_token_id
        if self.prompt.image_token_id != self.image_token_id:
            raise ModelLoadError(f"{model}: the tokenizer's <image> is id {self.prompt.image_token_id} but the "
                                 f"model's image_token_id is {self.image_token_id}")
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        # the keys/values of the prompt's text before the image (the same for every item and rung): made once
        self.prefix_cache = True
        self._prefix_kv: tuple[tuple[int, ...], list] | None = None

    # -- prompts -------------------------------------------------------------------------
    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        """Token ids of the family's prompt with exactly ``n_image_tokens`` image placeholders."""
        return self.prompt.ids(question, n_image_tokens)

    # -- visual token counts -------------------------------------------------------------
    def visual_token_count(self, scale: int, image_hw: tuple[int, int] | None = None) -> int:
        """Visual embeddings the LM receives at per-crop ``scale`` for an ``(h, w)`` image
        (:func:`m3cli.backends.visual_counts.visual_token_count`)."""
        return visual_counts.visual_token_count(self.family, scale, image_hw)

    def scale_within(self, max_visual_tokens: int, encoded: Encoded) -> int:
        """The largest per-crop scale whose total visual tokens for this encoded image fit ``max_visual_tokens``
        (``--max-visual-tokens``); raises :class:`~m3cli.matryoshka.scales.BudgetError` when none does."""
        return visual_counts.scale_within(self.family, max_visual_tokens, encoded.image_hw, self.scales,
                                          self.grid_side)

    # -- encoding ------------------------------------------------------------------------
    def pixel_values(self, images: Sequence):
        """The family's normalised pixels for a list of PIL images: ``(N, 3, size, size)``.

        The geometry (pad or crop, CLIP's resize) and the normalisation are the family's
        (:func:`m3cli.families.tower_image`, :func:`m3cli.families.pixel_array`), equal bit for bit to
        transformers' PIL image processors and independent of which processor class is installed.
        """
        import numpy as np
        import torch

        from m3cli.families import pixel_array

        arrays = []
        for image in images:
            crops = self.family.crops(image if image.mode == "RGB" else image.convert("RGB"))
            if len(crops) != 1:
                raise ModelLoadError(f"{self.model_id}: {len(crops)} crops per image; the torch backend takes one")
            arrays.append(pixel_array(crops[0], self.spec.image))
        return torch.from_numpy(np.stack(arrays)).to(self.device, self.dtype)

    def encode(self, images: Sequence) -> list[Encoded]:
        """Vision tower + projector once per image: one (G*G, D) grid each (LLaVA-NeXT: once per crop, every
        crop of every image in one tower pass, kept as :class:`~m3cli.backends.next_features.CropGrids`)."""
        import torch

        if not images:
            return []
        if self.next:
            from m3cli.backends.next_features import encode_images

            grids = encode_images(self.model, self.family, images)
            return [Encoded(grid=g, side=g.side, encode_ms=g.encode_ms, image_hw=g.image_hw, crops=g.crops)
                    for g in grids]
        start = time.perf_counter()
        with torch.inference_mode():
            features = self.model.model.get_image_features(
                pixel_values=self.pixel_values(images), vision_feature_layer=self.feature_layer,
                output_hidden_states=True,
            )
            grids = list(features.pooler_output)
        _sync(self.device)
        per_image = (time.perf_counter() - start) * 1000 / len(images)
        return [Encoded(grid=g, side=self.grid_side, encode_ms=per_image) for g in grids]

    # -- answering -----------------------------------------------------------------------
    def answer(self, requests: Sequence[AnswerRequest]) -> list[Generation]:
        """Answer a batch; requests with different budgets run as separate sub-batches, so a 1-token
        request is never padded to the length of a 576-token one."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.scale, []).append(i)
        out: list[Generation | None] = [None] * len(requests)
        for members in groups.values():
            for i, gen in zip(members, self._answer_same_scale([requests[i] for i in members]), strict=True):
                out[i] = gen
        return out  # type: ignore[return-value]

    def _answer_same_scale(self, requests: Sequence[AnswerRequest]) -> list[Generation]:
        """Pool each grid to its scale, prefill the batch (left-padded) and decode greedily."""
        import torch
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if not requests:
            return []
        pooled = [self._visual(r) for r in requests]
        prompts = [self.prompt_ids(r.question, int(v.shape[0])) for r, v in zip(requests, pooled, strict=True)]
        prompt_lengths = [len(ids) for ids in prompts]
        before = self.prompt.parts(requests[0].question)[0]
        shared = self.prefix_cache and bool(before) and all(
            self.prompt.parts(r.question)[0] == before for r in requests)
        offset = len(before) if shared else 0
        prompts = [ids[offset:] for ids in prompts]  # with a shared prefix only the rest is prefilled
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
        max_new = max(r.max_new_tokens for r in requests)

        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        done = [False] * len(requests)
        stopped = [False] * len(requests)
        ended = [False] * len(requests)  # end of sequence, or a stop sequence
        with torch.inference_mode():
            start = time.perf_counter()
            if shared:
                cache = self._cache_after(tuple(before), len(prompts))
                mask = torch.cat([mask.new_ones((mask.shape[0], offset)), mask], dim=1)  # rows see the prefix
            else:
                cache = DynamicCache(config=self.model.config.text_config)
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                # an index, not the int 1: the int slices a (B, 1, H) view whose batch stride is the prompt's,
                # which sends CPU bf16 F.linear down matmul's expand-and-copy path (the LM head copied once
                # per row: seconds per item); an index gathers a packed copy and the head runs as one GEMM
                logits_to_keep=torch.tensor([width - 1], device=self.device),
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=pooled)},
            )
            _sync(self.device)
            prefill_ms = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            last_pos = positions[:, -1]
            for step in range(max_new):
                scores = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
                best = scores.argmax(dim=-1)
                best_lp = scores.gather(-1, best[:, None])[:, 0]
                for row, (tok, lp) in enumerate(zip(best.tolist(), best_lp.tolist(), strict=True)):
                    if done[row]:
                        continue
                    if tok in self.eos_ids or len(tokens[row]) >= requests[row].max_new_tokens:
                        done[row] = True
                        ended[row] = tok in self.eos_ids
                        continue
                    tokens[row].append(tok)
                    logprobs[row].append(lp)
                    if stops_early(requests[row], logprobs[row]):
                        done[row] = stopped[row] = True
                    elif requests[row].stop and self._hits_stop(tokens[row], requests[row].stop):
                        done[row] = ended[row] = True
                if all(done) or step == max_new - 1:
                    break
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                last_pos = last_pos + 1
                out = self.model(
                    input_ids=best[:, None],
                    attention_mask=mask,
                    position_ids=last_pos[:, None],
                    cache=cache,
                    use_cache=True,
                )
            _sync(self.device)
            decode_ms = (time.perf_counter() - start) * 1000
        n = len(requests)
        out = []
        for r, ids, lps, early, end, v, n_prompt in zip(requests, tokens, logprobs, stopped, ended, pooled,
                                                         prompt_lengths, strict=True):
            text, reason = finish(self.tokenizer.decode(ids, skip_special_tokens=True), r.stop, len(ids),
                                  r.max_new_tokens, end)
            out.append(Generation(text=text, token_ids=ids, logprobs=lps, prefill_ms=prefill_ms / n,
                                  decode_ms=decode_ms / n, stopped_early=early, visual_tokens=int(v.shape[0]),
                                  finish_reason=reason, prompt_tokens=n_prompt, completion_tokens=len(ids)))
        return out

    def _hits_stop(self, ids: list[int], stop: Sequence[str]) -> bool:
        """Whether the text of ``ids`` holds one of the stop sequences."""
        return stop_index(self.tokenizer.decode(ids, skip_special_tokens=True), stop) is not None

    def _visual(self, request: AnswerRequest):
        """The request's visual embeddings ``(n, D)``: the grid pooled to its scale (LLaVA-NeXT: every crop pooled,
        then packed by the family, ``image_newline`` included)."""
        if not self.next:
            return pool(request.encoded.grid, request.scale)
        from m3cli.backends.next_features import CropGrids, visual_sequence

        grids = request.encoded.grid
        if not isinstance(grids, CropGrids):
            raise ValueError("a LLaVA-NeXT request needs an image encoded by this backend (its crops' grids)")
        return visual_sequence(self.model, self.family, grids, request.scale)

    def _cache_after(self, prefix: tuple[int, ...], batch: int):
        """A cache holding ``prefix``'s keys and values for ``batch`` rows; the prefix runs once per model load
        (again only if the family's text before the image changes)."""
        import torch
        from transformers import DynamicCache

        if self._prefix_kv is None or self._prefix_kv[0] != prefix:
            cache = DynamicCache(config=self.model.config.text_config)
            ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self.model.model.language_model(input_ids=ids, position_ids=torch.arange(len(prefix),
                                                device=self.device)[None], cache=cache, use_cache=True)
            self._prefix_kv = (prefix, [(layer.keys, layer.values) for layer in cache.layers])
        out = DynamicCache(config=self.model.config.text_config)
        for i, (k, v) in enumerate(self._prefix_kv[1]):
            out.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return out

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _drop_unused_tower_layers(model):
    """Drop the vision layers after the one the projector reads; returns the layer index to read now.

    LLaVA reads ``hidden_states[-2]``: the tower's last layer runs for nothing (1/24 of CLIP-L,
    1/4 of the shipped model's tower). The kept layers compute exactly the same features.
    """
    import torch

    layer = model.config.vision_feature_layer
    encoder = getattr(model.model.vision_tower, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layer, int) or layer >= -1 or layers is None:
        return layer
    keep = len(layers) + 1 + layer  # hidden_states[layer] is the output of layer number `keep`
    if keep < 1:
        return layer
    encoder.layers = torch.nn.ModuleList(list(layers)[:keep])
    model.config.vision_feature_layer = -1  # keeps the model's own generate() consistent
    model.config.vision_config.num_hidden_layers = keep
    return -1


def _sync(device: str) -> None:
    """Wait for queued GPU work so timings are real."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _load_processor(model_id: str, path: Path):
    """The directory's processor (its tokenizer is what the backend uses), as one-line errors."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer/processor file is the user's to fix
        raise ModelLoadError(f"{model_id}: cannot load its tokenizer or processor: {describe(exc)}") from None
    if getattr(processor, "tokenizer", None) is None:
        raise ModelLoadError(f"{model_id}: processor lacks a tokenizer")
    return processor


def _load_weights(model_id: str, path: Path, device: str, dtype, *, next_: bool = False):
    """The model from the local directory ``path``, every failure one line.

    The weight files are checked first (an empty or truncated safetensors file is named, not a traceback);
    a ``pytorch_model.bin`` that ``torch.load(weights_only=True)`` refuses is one line too. ``next_`` loads a
    ``LlavaNextForConditionalGeneration``, refused when its weights lack the learned ``image_newline``
    (transformers would fill it with random numbers).
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from m3cli.models.weights import check_weight_files

    try:
        check_weight_files(path)
    except M3Error as exc:
        raise ModelLoadError(str(exc)) from None
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    try:
        net, info = cls.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or incompatible weights: one line, never a traceback
        raise ModelLoadError(_weights_error(model_id, path, exc)) from None
    if next_ and any(str(k).split(".")[-1] == "image_newline" for k in info.get("missing_keys") or ()):
        raise ModelLoadError(f"{model_id}: a LLaVA-NeXT directory whose weights lack image_newline (the learned "
                             "row separator); not a complete LlavaNextForConditionalGeneration checkpoint")
    net.to(device)
    net.eval()
    return net


def _weights_error(model_id: str, path: Path, exc: BaseException) -> str:
    """One line for a weights load failure."""
    text = describe(exc)
    if "weights_only" in str(exc) or type(exc).__name__ == "UnpicklingError":
        bins = sorted(p.name for p in path.glob("*.bin")) or ["pytorch_model.bin"]
        return (f"{model_id}: {bins[0]} holds pickled objects that torch.load(weights_only=True) refuses to run; "
                "convert it to safetensors where you trust it, or use a safetensors copy")
    return f"{model_id}: cannot load the weights: {type(exc).__name__}: {text}"
