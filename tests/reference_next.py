"""An independent reference of LLaVA-NeXT anyres answering with M3 pooling per crop, written for the tests.

Written from the method (the M3 paper and the reference code's facts in /work/shared/LLAVA-RECIPES.md and
M3-NOTES.md), without ``m3cli``:

- crops: the best resolution among the pinpoints (the most effective resolution after an aspect-kept downscale,
  ties to the least waste, the first wins an exact tie), the image resized into it with its aspect kept (the
  free side rounded up) and centred on black, cut into square tiles row-major; the whole image squashed to one
  tile first (the base crop);
- features: per crop ``hidden_states[layer]`` without CLS, the projector; M3 pools every crop alike;
- tokens, built one by one: the base crop's pooled tokens; then, walking the merged pooled tile grid row by row
  and keeping only the rows/columns that hold the image (the padding band removed on the POOLED grid, the same
  count from both ends), each kept cell's token and, after each kept row, the newline;
- the prompt (the model's own recipe) with that many placeholders, greedy decoding from ``inputs_embeds``.

Only the modelling blocks come from the model (tower, projector, LM); everything around them is owned here.
"""

from __future__ import annotations

import math

import numpy as np
import reference_llava15 as ref

SCALES = ref.SCALES


def best_resolution(size_wh: tuple[int, int], candidates_wh: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``(w, h)`` candidate the image ``(w, h)`` fits best (see the module docstring)."""
    ow, oh = size_wh
    best, best_eff, best_waste = None, -1, math.inf
    for w, h in candidates_wh:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def candidates_wh(pinpoints: list, order: str) -> list[tuple[int, int]]:
    """Config pinpoints as ``(w, h)``: transformers stores [h, w] (``order="hw"``), the original [w, h]."""
    return [(int(b), int(a)) if order == "hw" else (int(a), int(b)) for a, b in pinpoints]


def reference_crops(image, pinpoints: list, order: str, tile: int):
    """``(crops, (tiles_high, tiles_wide))``: the base crop then the tiles row-major, RGB ``tile x tile`` each."""
    from PIL import Image

    img = image.convert("RGB")
    ow, oh = img.size
    tw_px, th_px = best_resolution((ow, oh), candidates_wh(pinpoints, order))
    sw, sh = tw_px / ow, th_px / oh
    if sw < sh:
        new_w, new_h = tw_px, min(math.ceil(oh * sw), th_px)
    else:
        new_w, new_h = min(math.ceil(ow * sh), tw_px), th_px
    canvas = Image.new("RGB", (tw_px, th_px), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.BICUBIC), ((tw_px - new_w) // 2, (th_px - new_h) // 2))
    tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, th_px, tile) for x in range(0, tw_px, tile)]
    return [img.resize((tile, tile), Image.BICUBIC), *tiles], (th_px // tile, tw_px // tile)


def crop_pixels(crop, mean, std) -> np.ndarray:
    """CHW float32: /255 and normalised (the CLIP resize and centre crop are no-ops on a tile-size crop)."""
    x = np.asarray(crop).astype(np.float64) / 255.0
    x = (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return x.astype(np.float32).transpose(2, 0, 1).copy()


def crop_features(tower, projector, crops, mean, std, layer: int):
    """``[crops, 576, D]`` projected features, each crop on its own through the tower."""
    import torch

    out = []
    with torch.no_grad():
        for c in crops:
            px = torch.from_numpy(crop_pixels(c, mean, std))[None].to(next(tower.parameters()).dtype)
            hidden = tower(px, output_hidden_states=True).hidden_states[layer]
            out.append(projector(hidden[0, 1:]))
    return torch.stack(out)


def kept_range(current: int, other_cur: int, orig_this: int, orig_other: int, rounding: str) -> tuple[int, int]:
    """Start and stop of the kept rows (or columns) of one side of the merged pooled grid."""
    value = orig_this * (other_cur / orig_other)
    kept = int(round(value, 7)) if rounding == "hf" else int(value)
    pad = (current - kept) // 2
    return pad, current - pad


def reference_tokens(features, grid_hw: tuple[int, int], size_hw: tuple[int, int], scale: int, newline,
                     rounding: str):
    """The LM's visual tokens ``[n, D]`` at per-crop ``scale``, one by one (base first, see module docstring)."""
    import torch

    th, tw = grid_hw
    pooled = [ref.pool_grid(f, scale) for f in features]
    side = math.isqrt(scale)
    rows, cols = th * side, tw * side
    oh, ow = size_hw
    r0, r1, c0, c1 = 0, rows, 0, cols
    if ow / oh > cols / rows:
        r0, r1 = kept_range(rows, cols, oh, ow, rounding)
    else:
        c0, c1 = kept_range(cols, rows, ow, oh, rounding)
    out = list(pooled[0])
    for r in range(r0, r1):
        for c in range(c0, c1):
            tile = (r // side) * tw + c // side
            out.append(pooled[1 + tile][(r % side) * side + c % side])
        out.append(newline)
    return torch.stack(out)


def hf_prompt_ids(processor, question: str, n_image_tokens: int) -> list[int]:
    """A llava-hf directory's prompt: its chat template, ``n`` placeholders, its tokenizer (BOS once)."""
    text = processor.apply_chat_template(ref.hf_conversation(question), add_generation_prompt=True)
    tok = processor.tokenizer
    bos = tok.bos_token
    text = text.replace(ref.IMAGE_PLACEHOLDER, ref.IMAGE_PLACEHOLDER * n_image_tokens)
    return tok(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def hf_reference_answer(model, processor, image, question: str, scale: int, max_new_tokens: int = 8):
    """``(answer ids, n visual tokens)`` of a llava-hf ``LlavaNextForConditionalGeneration`` by this reference."""
    cfg = model.config
    ip = processor.image_processor
    crops, grid_hw = reference_crops(image, cfg.image_grid_pinpoints, "hw", cfg.vision_config.image_size)
    feats = crop_features(model.model.vision_tower, model.model.multi_modal_projector, crops, ip.image_mean,
                          ip.image_std, cfg.vision_feature_layer)
    tokens = reference_tokens(feats, grid_hw, (image.height, image.width), scale,
                              model.model.image_newline.detach(), "hf")
    ids = hf_prompt_ids(processor, question, tokens.shape[0])
    emb = model.get_input_embeddings()

    def step(x, cache):
        out = model.model.language_model(inputs_embeds=x, cache=cache, use_cache=True)
        return model.lm_head(out.last_hidden_state), out.cache

    import torch

    with torch.no_grad():
        embeds = ref.splice_embeds(ids, cfg.image_token_id, tokens, emb)
    eos = model.generation_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ref.greedy_from_embeds(step, embeds, emb, eos_ids, max_new_tokens), tokens.shape[0]


def load_original_next_parts(model_dir, tower_dir, *, image_token_id: int):
    """``(parts, image_newline)`` of an original NeXT checkpoint: reference_llava15's loader, minus the newline.

    That loader (written for LLaVA-1.5) puts every ``model.*`` tensor into the LM, so it is handed the
    checkpoint's tensors without ``model.image_newline``, which is returned on its own.
    """
    from pathlib import Path

    tensors = ref.read_checkpoint(model_dir)
    newline = tensors.pop("model.image_newline").float()
    read = ref.read_checkpoint
    ref.read_checkpoint = lambda d: tensors if Path(d) == Path(model_dir) else read(d)
    try:
        parts = ref.load_original_parts(model_dir, tower_dir, image_token_id=image_token_id)
    finally:
        ref.read_checkpoint = read
    return parts, newline


def original_reference_answer(parts, newline, pinpoints: list, image, question: str, scale: int,
                              max_new_tokens: int = 8):
    """``(answer ids, n visual tokens)`` of an ORIGINAL NeXT checkpoint (``parts``: reference_llava15's
    :class:`OriginalParts`) by this reference: pinpoints read as [w, h], ``int()`` unpadding, ``vicuna_v1``."""
    crops, grid_hw = reference_crops(image, pinpoints, "wh", parts.crop)
    feats = crop_features(parts.tower, parts.projector, crops, parts.image_mean, parts.image_std,
                          parts.select_layer)
    tokens = reference_tokens(feats, grid_hw, (image.height, image.width), scale, newline, "original")
    ids = ref.reference_prompt_ids(parts.spm_path, question, tokens.shape[0], parts.image_token_id)
    emb = parts.lm.get_input_embeddings()

    def step(x, cache):
        out = parts.lm(inputs_embeds=x, cache=cache, use_cache=True)
        return out.logits, out.cache

    import torch

    with torch.no_grad():
        embeds = ref.splice_embeds(ids, parts.image_token_id, tokens, emb)
    return ref.greedy_from_embeds(step, embeds, emb, parts.eos_ids, max_new_tokens), tokens.shape[0]
