"""LLaVA-NeXT on transformers with M3 pooling per crop: encode every crop once, re-pool and pack per scale.

The torch backend calls these for a loaded ``LlavaNextForConditionalGeneration`` and a
:class:`~m3cli.families.llavanext.LlavaNextFamily`::

    enc = encode_images(model, family, images)[0]        # tower + projector once per crop: CropGrids
    visual = visual_sequence(model, family, enc, 36)      # pool each crop to 36, pack: (n, D) with newlines
    ids = family.prompt_ids(question, visual.shape[0], tok)
    [gen] = greedy_batch(model, [ids], [visual], image_token_id, eos_ids=eos)

Escalation (``--auto-scale``) only calls :func:`visual_sequence` again on the same :class:`CropGrids`: the crops
are never re-encoded. Features are read as transformers' own ``get_image_features`` reads them
(``hidden_states[vision_feature_layer]``, CLS dropped, the projector), but per crop and without its packing, which
assumes the full 24x24 side; at ``s = 576`` :func:`visual_sequence` equals transformers' packed features.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from m3cli.families.anyres import image_hw as pil_hw
from m3cli.families.preprocess import pixel_array
from m3cli.families.spec import ImageSpec
from m3cli.matryoshka.scales import grid_side, pool


@dataclass
class CropGrids:
    """One image's crops, encoded once: each crop's projected ``side x side`` grid, row-major."""

    grids: Any                   # torch tensor (crops, side*side, D): the base crop first, then the tiles
    image_hw: tuple[int, int]    # the ORIGINAL image's (height, width), which the unpadding needs
    side: int                    # 24 for CLIP-L/14 at 336
    encode_ms: float             # this image's share of the tower + projector time

    @property
    def crops(self) -> int:
        """Crops the tower encoded (tiles + base)."""
        return int(self.grids.shape[0])


@dataclass
class Greedy:
    """A greedy answer: token ids and their log-probabilities (EOS excluded), and its share of the time."""

    token_ids: list[int]
    logprobs: list[float]
    prefill_ms: float
    decode_ms: float


def model_device_dtype(model: Any) -> tuple[Any, Any]:
    """Where the model's weights live and their dtype."""
    param = next(model.parameters())
    return param.device, param.dtype


def crop_pixels(crops: Sequence[Image.Image], image: ImageSpec, *, device: Any = None, dtype: Any = None) -> Any:
    """``(crops, 3, H, W)`` pixel tensor of tower-size crops, normalised as transformers does."""
    import numpy as np
    import torch

    arr = np.stack([pixel_array(c, image) for c in crops])
    return torch.from_numpy(arr).to(device=device, dtype=dtype)


def encode_pixels(model: Any, pixel_values: Any, *, batch_size: int | None = None) -> Any:
    """Projected patch grids ``(crops, side*side, D)``: tower ``hidden_states[layer]``, CLS dropped, projector.

    Reads ``model.config.vision_feature_layer`` (an int, or a list whose layers are concatenated, as transformers
    does) and refuses the ``full`` strategy (CLS kept: no square grid to pool). ``batch_size`` caps the crops in
    one tower pass (default: all of them).
    """
    import torch

    cfg = model.config
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        raise ValueError("only LLaVA-NeXT models that drop CLS (the 'default' strategy) have a square grid to pool")
    layer = cfg.vision_feature_layer
    step = batch_size or int(pixel_values.shape[0]) or 1
    out = []
    with torch.inference_mode():
        for start in range(0, int(pixel_values.shape[0]), step):
            hidden = model.model.vision_tower(pixel_values[start:start + step], output_hidden_states=True).hidden_states
            feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
            out.append(model.model.multi_modal_projector(feats[:, 1:]))
    grids = torch.cat(out, dim=0)
    grid_side(int(grids.shape[1]))  # refuses a tower whose patches do not form a square grid
    return grids


def encode_images(model: Any, family: Any, images: Sequence[Image.Image], *,
                  batch_size: int | None = None) -> list[CropGrids]:
    """Every image's crops (``family.crops``) through tower + projector once, all crops batched together."""
    if not images:
        return []
    device, dtype = model_device_dtype(model)
    rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    crops = [family.crops(im) for im in rgb]
    flat = [c for per in crops for c in per]
    start = time.perf_counter()
    grids = encode_pixels(model, crop_pixels(flat, family.spec.image, device=device, dtype=dtype),
                          batch_size=batch_size)
    _sync(device)
    per_crop_ms = (time.perf_counter() - start) * 1000 / len(flat)
    side = grid_side(int(grids.shape[1]))
    out, at = [], 0
    for im, per in zip(rgb, crops, strict=True):
        out.append(CropGrids(grids[at:at + len(per)], pil_hw(im), side, per_crop_ms * len(per)))
        at += len(per)
    return out


def image_newline(model: Any) -> Any:
    """The learned ``image_newline`` ``(D,)`` of a ``LlavaNextForConditionalGeneration``."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        raise ValueError("the model has no image_newline (not a LLaVA-NeXT model?)")
    return newline.detach()


def visual_sequence(model: Any, family: Any, encoded: CropGrids, scale: int) -> Any:
    """The LM's visual embeddings ``(n, D)`` at per-crop ``scale``: every crop pooled, then packed by the family.

    ``n == family.n_visual_tokens(scale, image_hw=encoded.image_hw)``: base tokens, the unpadded pooled tile grid,
    one ``image_newline`` per row.
    """
    import torch

    with torch.inference_mode():
        pooled = pool(encoded.grids, scale)
        return family.visual_tokens(list(pooled), image_hw=encoded.image_hw, newline=image_newline(model))


def embed_prompt(model: Any, prompt_ids: Sequence[int], visual: Any, image_token_id: int) -> Any:
    """``(1, L, D)`` input embeddings: the prompt's token embeddings with its placeholders replaced by ``visual``."""
    import torch

    device, _ = model_device_dtype(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    mask = ids[0] == image_token_id
    if int(mask.sum()) != int(visual.shape[0]):
        raise ValueError(f"the prompt has {int(mask.sum())} image placeholders for {int(visual.shape[0])} visual "
                         "embeddings")
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        embeds[0, mask] = visual.to(device=embeds.device, dtype=embeds.dtype)
    return embeds


def greedy_batch(model: Any, prompts: Sequence[Sequence[int]], visuals: Sequence[Any], image_token_id: int, *,
                 eos_ids: Sequence[int], max_new_tokens: int | Sequence[int] = 16) -> list[Greedy]:
    """Greedy answers for prompts whose placeholders take ``visuals`` (any lengths), from ``inputs_embeds``.

    The batch is left-padded (masked, positions counted from each row's first real token), prefilled once and
    decoded step by step with a ``DynamicCache``; a row stops at any of ``eos_ids`` (not returned) or after its
    ``max_new_tokens``. At batch size 1 this is exactly transformers' greedy ``generate``.
    """
    import torch
    from transformers import DynamicCache

    n = len(prompts)
    if n == 0:
        return []
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    device, _ = model_device_dtype(model)
    rows = [embed_prompt(model, p, v, image_token_id)[0] for p, v in zip(prompts, visuals, strict=True)]
    width = max(r.shape[0] for r in rows)
    dim = rows[0].shape[1]
    embeds = rows[0].new_zeros((n, width, dim))
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = set(int(e) for e in eos_ids)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    done = [limit <= 0 for limit in limits]
    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache(config=model.config.text_config)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        last = positions[:, -1]
        while not all(done):
            scores = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            best = scores.argmax(dim=-1)
            best_lp = scores.gather(-1, best[:, None])[:, 0]
            for i, (tok, lp) in enumerate(zip(best.tolist(), best_lp.tolist(), strict=True)):
                if done[i]:
                    continue
                if tok in eos:
                    done[i] = True
                    continue
                tokens[i].append(tok)
                logprobs[i].append(lp)
                done[i] = len(tokens[i]) >= limits[i]
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            last = last + 1
            out = model(input_ids=best[:, None], attention_mask=mask,
                        position_ids=last[:, None], cache=cache, use_cache=True)
        _sync(device)
        decode_ms = (time.perf_counter() - start) * 1000
    return [Greedy(t, lp, prefill_ms / n, decode_ms / n) for t, lp in zip(tokens, logprobs, strict=True)]


def _sync(device: Any) -> None:
    """Wait for queued GPU work so timings are real."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
