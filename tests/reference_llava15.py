"""An independent reference of the LLaVA-1.5 / M3 answering recipes, written for the tests.

Written from the facts in /work/shared/LLAVA-RECIPES.md and M3-NOTES.md, without ``m3cli``:

- the ORIGINAL recipe (haotian-liu/LLaVA, M3 evaluation with ``--conv-mode vicuna_v1``): pad the
  image to a square with the CLIP mean colour, CLIP preprocessing (resize the short side with
  bicubic, long side truncated with ``int()``, centre crop, rescale, normalise), the ``vicuna_v1``
  prompt tokenised piece by piece with SentencePiece itself, ``hidden_states[-2]`` without CLS,
  the ``mlp2x_gelu`` projector, M3 average pooling after the projector, greedy decoding from
  ``inputs_embeds`` until ``</s>``;
- the llava-hf recipe: the directory's own processor and chat template, the same pooling of the
  projected features, greedy decoding (at 576 tokens: exactly stock ``generate``).

Only the modelling blocks come from transformers (``CLIPVisionModel``, ``LlamaForCausalLM``); the
recipe around them, and the reading of the checkpoint files, are owned here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SCALES = (576, 144, 36, 9, 1)


# --------------------------------------------------------------------------- prompt


def vicuna_v1_prompt(question: str) -> str:
    """``conv_vicuna_v1`` with one image before the question (separator style TWO, no answer yet)."""
    return f"{VICUNA_V1_SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


def reference_prompt_ids(spm_path: str | Path, question: str, n_image_tokens: int, image_token_id: int,
                         prompt: str | None = None) -> list[int]:
    """Prompt ids the original way (``tokenizer_image_token``): split at ``<image>``, each piece
    encoded on its own by SentencePiece (so each starts with the dummy-prefix ``▁``), BOS once at
    the start, ``n_image_tokens`` copies of ``image_token_id`` where the image was."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    text = vicuna_v1_prompt(question) if prompt is None else prompt
    ids = [sp.bos_id()]
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids += [image_token_id] * n_image_tokens
        ids += sp.encode(piece)
    return ids


# --------------------------------------------------------------------------- pixels


def mean_background(mean) -> tuple[int, int, int]:
    """The padding colour of ``image_aspect_ratio: pad``: (122, 116, 104) for CLIP's mean."""
    return tuple(int(x * 255) for x in mean)


def expand2square(image, background):
    """Pad to a square of the longer side, the image centred (offset floored), in ``background``."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_resize_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(width, height) after CLIP's resize: short side -> ``shortest``, long side ``int()``-truncated."""
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


def reference_pixels(image, mean, std, size: int, *, crop: int | None = None, pad: bool = True) -> np.ndarray:
    """CHW float32 pixels of the original recipe: ``expand2square`` (when ``pad``), bicubic resize of
    the short side to ``size`` on uint8, centre crop ``crop`` (default ``size``), /255, normalise."""
    from PIL import Image

    img = image.convert("RGB")
    if pad:
        img = expand2square(img, mean_background(mean))
    img = img.resize(clip_resize_size(*img.size, size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    crop = size if crop is None else crop
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    arr = arr[top:top + crop, left:left + crop]
    x = arr.astype(np.float64) * (1 / 255)
    x = (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return x.astype(np.float32).transpose(2, 0, 1).copy()


# --------------------------------------------------------------------------- features and decoding


def pool_grid(features, scale: int):
    """M3 pooling of projected features ``[side*side, D]`` -> ``[scale, D]``: one average pool with
    kernel = stride = side / sqrt(scale), row-major in and out."""
    import torch.nn.functional as F

    n, d = features.shape
    side, new_side = math.isqrt(n), math.isqrt(scale)
    if side * side != n or new_side * new_side != scale or side % new_side:
        raise ValueError(f"cannot pool {n} tokens to {scale}")
    k = side // new_side
    grid = features.reshape(side, side, d).permute(2, 0, 1)[None]
    return F.avg_pool2d(grid, kernel_size=k, stride=k)[0].permute(1, 2, 0).reshape(scale, d)


def greedy_from_embeds(step, embeds, embed_tokens, eos_ids, max_new_tokens: int) -> list[int]:
    """Greedy decoding from ``embeds`` ``[1, L, D]``: ``step(embeds, cache) -> (logits, cache)``.
    Stops at any of ``eos_ids`` (not returned) or after ``max_new_tokens``."""
    import torch

    out, cache, x = [], None, embeds
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, cache = step(x, cache)
            nxt = int(torch.argmax(logits[0, -1]))
            if nxt in eos_ids:
                break
            out.append(nxt)
            x = embed_tokens(torch.tensor([[nxt]]))
    return out


def splice_embeds(ids: list[int], image_token_id: int, features, embed_tokens):
    """Token embeddings of ``ids`` with the run of ``image_token_id`` replaced by ``features``."""
    import torch

    t = torch.tensor([ids])
    pos = (t[0] == image_token_id).nonzero().flatten()
    if len(pos) != features.shape[0] or (len(pos) and int(pos[-1] - pos[0]) + 1 != len(pos)):
        raise ValueError("the image placeholders must be one run as long as the features")
    emb = embed_tokens(torch.where(t == image_token_id, 0, t))
    if len(pos):
        emb[0, int(pos[0]):int(pos[-1]) + 1] = features.to(emb.dtype)
    return emb


# --------------------------------------------------------------------------- original checkpoints


@dataclass
class OriginalParts:
    """What the original recipe runs, read from an original-layout checkpoint."""

    tower: object            # transformers CLIPVisionModel
    projector: object        # torch.nn.Sequential(Linear, GELU, Linear)
    lm: object               # transformers LlamaForCausalLM
    spm_path: Path
    image_mean: list[float]
    image_std: list[float]
    resize: int
    crop: int
    select_layer: int
    pad: bool
    eos_ids: tuple[int, ...]
    image_token_id: int      # stands for the original IMAGE_TOKEN_INDEX (-200) in our id lists


def read_checkpoint(model_dir: str | Path) -> dict:
    """All tensors of a sharded (or single-file) safetensors / ``pytorch_model*.bin`` checkpoint."""
    import torch

    model_dir = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else [single] if (model_dir / single).is_file() else [])
        if files:
            break
    else:
        raise FileNotFoundError(f"no checkpoint in {model_dir}")
    tensors = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors.update(load_file(str(model_dir / name)))
        else:
            tensors.update(torch.load(model_dir / name, map_location="cpu", weights_only=True))
    return tensors


def _image_processor_params(tower_dir: Path) -> tuple[list, list, int, int]:
    cfg = json.loads((tower_dir / "preprocessor_config.json").read_text())
    size, crop = cfg.get("size", 224), cfg.get("crop_size", cfg.get("size", 224))
    size = size if isinstance(size, int) else size["shortest_edge"]
    crop = crop if isinstance(crop, int) else crop["height"]
    return cfg["image_mean"], cfg["image_std"], int(size), int(crop)


def _load_module(module, prefix_free: dict) -> None:
    """Load ``{name: tensor}`` whose names may or may not carry the module's own top-level prefix."""
    own = module.state_dict()
    wanted = {}
    for k in own:
        alt = [k, k.removeprefix("vision_model."), "vision_model." + k]
        src = next((a for a in alt if a in prefix_free), None)
        if src is None:
            if k.endswith("position_ids"):
                continue
            raise KeyError(f"missing tensor for {k}")
        wanted[k] = prefix_free[src].to(own[k].dtype)
    module.load_state_dict(wanted, strict=False)


def load_original_parts(model_dir: str | Path, tower_dir: str | Path | None = None, *, dtype=None,
                        image_token_id: int = -200) -> OriginalParts:
    """Read an original ``LlavaLlamaForCausalLM`` checkpoint into plain modules (float32 by default).

    The CLIP config and preprocessing come from ``tower_dir`` (default: ``mm_vision_tower``); the tower
    weights from ``model.vision_tower.vision_tower.*`` when the checkpoint holds them, else from it."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    dtype = dtype or torch.float32
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError("only the mlp2x_gelu projector is in this reference")
    tower_dir = Path(tower_dir or cfg["mm_vision_tower"])
    tensors = read_checkpoint(model_dir)

    llama_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size",
                  "hidden_act")
    lm = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in llama_keys if k in cfg}, tie_word_embeddings=False))
    lm_state = {k: v for k, v in tensors.items()
                if (k.startswith("model.") or k == "lm_head.weight") and "mm_projector" not in k
                and "vision_tower" not in k and not k.endswith("rotary_emb.inv_freq")}
    lm.load_state_dict({k: v.to(dtype) for k, v in lm_state.items()}, strict=True)

    w1, w2 = tensors["model.mm_projector.0.weight"], tensors["model.mm_projector.2.weight"]
    projector = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.GELU(),
                                    torch.nn.Linear(w2.shape[1], w2.shape[0]))
    projector.load_state_dict({"0.weight": w1, "0.bias": tensors["model.mm_projector.0.bias"],
                               "2.weight": w2, "2.bias": tensors["model.mm_projector.2.bias"]})

    tower_cfg = json.loads((tower_dir / "config.json").read_text())
    tower = CLIPVisionModel(CLIPVisionConfig(**tower_cfg.get("vision_config", tower_cfg)))
    inside = "model.vision_tower.vision_tower."
    tower_state = {k.removeprefix(inside): v for k, v in tensors.items() if k.startswith(inside)}
    if not tower_state:
        tower_state = read_checkpoint(tower_dir)
    _load_module(tower, tower_state)

    mean, std, resize, crop = _image_processor_params(tower_dir)
    return OriginalParts(
        tower=tower.to(dtype).eval(), projector=projector.to(dtype).eval(), lm=lm.to(dtype).eval(),
        spm_path=model_dir / "tokenizer.model", image_mean=mean, image_std=std, resize=resize, crop=crop,
        select_layer=int(cfg.get("mm_vision_select_layer", -2)), pad=cfg.get("image_aspect_ratio") == "pad",
        eos_ids=(int(cfg.get("eos_token_id", 2)),), image_token_id=image_token_id,
    )


def reference_features(parts: OriginalParts, image):
    """Projected patch features ``[576, D]`` of one image by the original recipe."""
    import torch

    pixels = torch.from_numpy(reference_pixels(image, parts.image_mean, parts.image_std, parts.resize,
                                               crop=parts.crop, pad=parts.pad))[None]
    with torch.no_grad():
        hidden = parts.tower(pixels.to(parts.tower.dtype), output_hidden_states=True).hidden_states
        return parts.projector(hidden[parts.select_layer][0, 1:])


def reference_answer(parts: OriginalParts, image, question: str, scale: int = 576,
                     max_new_tokens: int = 8) -> list[int]:
    """Greedy answer token ids (``</s>`` excluded) of the original LLaVA-1.5 / M3 recipe at ``scale``."""
    feats = pool_grid(reference_features(parts, image), scale)
    ids = reference_prompt_ids(parts.spm_path, question, scale, parts.image_token_id)
    emb = parts.lm.get_input_embeddings()

    def step(x, cache):
        out = parts.lm(inputs_embeds=x, cache=cache, use_cache=True)
        return out.logits, out.cache

    import torch

    with torch.no_grad():
        embeds = splice_embeds(ids, parts.image_token_id, feats, emb)
    return greedy_from_embeds(step, embeds, emb, parts.eos_ids, max_new_tokens)


# --------------------------------------------------------------------------- llava-hf recipe


def hf_conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def hf_inputs(processor, image, question: str):
    """The llava-hf recipe's inputs: its chat template, then its processor (576 placeholders)."""
    text = processor.apply_chat_template(hf_conversation(question), add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def _eos_ids(model) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def reference_hf_answer(model, processor, image, question: str, scale: int = 576,
                        max_new_tokens: int = 8) -> list[int]:
    """Greedy answer ids (EOS excluded) of a llava-hf ``LlavaForConditionalGeneration`` by its own
    recipe, the projected features pooled to ``scale`` and the placeholder run shortened to match."""
    import torch

    cfg = model.config
    inputs = hf_inputs(processor, image, question)
    ids = inputs["input_ids"][0].tolist()
    image_id = cfg.image_token_id
    first = ids.index(image_id)
    n = sum(1 for i in ids if i == image_id)
    ids = ids[:first] + [image_id] * scale + ids[first + n:]
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"].to(model.dtype), output_hidden_states=True)
        layer = cfg.vision_feature_layer
        feats = hidden.hidden_states[layer][0]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[1:]
        feats = pool_grid(model.model.multi_modal_projector(feats), scale)
        emb = model.get_input_embeddings()
        embeds = splice_embeds(ids, image_id, feats, emb)

    def step(x, cache):
        out = model.model.language_model(inputs_embeds=x, cache=cache, use_cache=True)
        return model.lm_head(out.last_hidden_state), out.cache

    return greedy_from_embeds(step, embeds, emb, _eos_ids(model), max_new_tokens)
