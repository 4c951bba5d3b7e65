"""Convert an original-LLaVA checkpoint (``LlavaLlamaForCausalLM``) to the Hugging Face layout.

M3's released checkpoints (``mucai/llava-v1.5-7b-m3``) and liuhaotian's LLaVA-1.5 are stored the way
haotian-liu/LLaVA saves them: ``model_type`` ``llava_llama`` (or ``llava`` with the ``mm_*`` keys), the
projector as ``model.mm_projector.{0,2}``, the Llama weights at ``model.*`` and the CLIP tower either
inside the checkpoint (``model.vision_tower.vision_tower.vision_model.*``) or only named by
``mm_vision_tower``. This module rewrites such a directory as a stock ``LlavaForConditionalGeneration``
+ ``LlavaProcessor`` directory (a LLaVA-NeXT one, ``image_aspect_ratio: anyres`` with ``spatial_unpad``, as
``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` keeping ``model.image_newline`` and the pinpoints)
that keeps the original recipe (``pad`` preprocessing through
``LlavaImageProcessor(do_pad=True)``, the ``vicuna_v1`` chat template, an ``m3cli`` block in config.json;
see :mod:`m3cli.families.converted`), so ``TorchBackend`` and plain transformers both answer as the
original does. :mod:`m3cli.convert.original_cache` runs it once into the cache on first load.

Weights are streamed one source shard at a time into a model built on the meta device, so
peak memory is about one copy of the model (never the source and the output together).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from m3cli.convert.original_parts import (
    find_tower_dir,
    is_sentencepiece,
    llava_processor,
    prepare_tokenizer,
    vision_config_for,
)
from m3cli.convert.original_weights import (
    SRC_PROJECTOR,
    SRC_PROJECTOR_KEYS,
    SRC_TOWER,
    KeyMapper,
    WeightFiles,
    droppable,
    resize_rows,
    tower_rest,
)
from m3cli.errors import ConvertError, ModelError, describe
from m3cli.families.converted import M3CLI_KEY, m3cli_block, vicuna_v1_template
from m3cli.fileio import atomic_dir
from m3cli.models.build import IMAGE_TOKEN
from m3cli.models.dtypes import DTYPES, torch_dtype
from m3cli.output import OutputWriteError

log = logging.getLogger(__name__)

# Llama fields of a llava_llama config that carry over into the HF text config.
_TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias", "pretraining_tp", "bos_token_id", "eos_token_id",
)


def convert_original_to_hf(
    src: str | Path,
    out: str | Path,
    dtype: str = "auto",
    vision_tower: str | Path | None = None,
    *,
    source: str | None = None,
) -> Path:
    """Convert the original-LLaVA directory ``src`` into a HF LLaVA directory ``out``.

    ``vision_tower`` is a local CLIP directory (``config.json``, optionally weights and
    ``preprocessor_config.json``), needed when the checkpoint does not carry its tower and
    ``mm_vision_tower`` is neither a local path nor in the local Hugging Face cache. Tower weights
    inside the checkpoint take precedence over the directory's. ``dtype`` is ``auto`` (keep the
    checkpoint's) or float32 / float16 / bfloat16. ``source`` names the checkpoint in the output's
    ``m3cli`` block (default: ``src``). ``out`` must not exist or be empty; it is written to a
    temporary sibling first and appears only when complete. Returns ``out``.

    The output keeps the original recipe (see :mod:`m3cli.families.converted`): an ``m3cli`` block in
    config.json, a ``LlavaImageProcessor`` that pads (``image_aspect_ratio: pad``) and the ``vicuna_v1``
    chat template.
    """
    import torch

    src = Path(src).expanduser()
    out = Path(out).expanduser()
    if dtype not in ("auto", *DTYPES):
        raise ConvertError(f"unknown dtype {dtype!r} (use auto, float32, float16 or bfloat16)")
    cfg = _read_source_config(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"output {out} already exists and is not empty")
    if out.resolve() == src.resolve():
        raise ConvertError("output directory must differ from the source directory")

    weights = WeightFiles(src, what="checkpoint")
    names = weights.keys()
    _check_lm_weights(src, names)
    tower_dir = find_tower_dir(cfg, src, vision_tower)
    spec = _source_spec(src, tower_dir)
    tower_in_ckpt = any(k.startswith(SRC_TOWER) for k in names)
    tower_files = None if tower_in_ckpt else _separate_tower(cfg, src, tower_dir)
    vision_config = vision_config_for(cfg, tower_dir, weights if tower_in_ckpt else tower_files)
    tokenizer, tok_before, added = prepare_tokenizer(src)
    spm = is_sentencepiece(tokenizer)
    template = vicuna_v1_template(spm=spm) if spec.prompt_recipe == "vicuna_v1" else None
    tokenizer.chat_template = template

    src_rows, hidden = weights.shape("model.embed_tokens.weight")
    if tok_before > src_rows:
        raise ConvertError(f"{src}: tokenizer has {tok_before} tokens but the embeddings only {src_rows} rows")
    vocab = max(src_rows, len(tokenizer))
    new_rows = sorted({*range(src_rows, vocab), *(i for i in added.values() if i < src_rows)})

    proj_shape = weights.shape(f"{SRC_PROJECTOR}0.weight")
    if proj_shape != (int(cfg.get("hidden_size", hidden)), vision_config.hidden_size):
        raise ConvertError(
            f"{src}: projector maps {proj_shape[1]} -> {proj_shape[0]} but the tower has width "
            f"{vision_config.hidden_size} and the LM {cfg.get('hidden_size', hidden)}"
        )

    target_dtype = _target_dtype(dtype, weights.dtype("model.embed_tokens.weight"))
    tie = "lm_head.weight" not in names
    if tie and not cfg.get("tie_word_embeddings", False):
        raise ConvertError(f"{src}: lm_head.weight missing (and the config does not tie embeddings)")

    select = cfg.get("mm_vision_select_feature", "patch")
    strategy = {"patch": "default", "cls_patch": "full"}.get(select)
    if strategy is None:
        raise ConvertError(f"{src}: unsupported mm_vision_select_feature {select!r} (patch or cls_patch)")
    grid = vision_config.image_size // vision_config.patch_size
    next_ = spec.family == "llavanext"
    if next_ and "model.image_newline" not in names:
        raise ConvertError(f"{src}: a LLaVA-NeXT checkpoint (anyres, spatial_unpad) without model.image_newline")
    config = _llava_config(cfg, vision_config, tokenizer, vocab, tie, strategy,
                           grid * grid + (strategy == "full"), target_dtype,
                           pinpoints=spec.grid_pinpoints if next_ else None)
    setattr(config, M3CLI_KEY, m3cli_block(spec, source or str(src)))

    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration)(config)
    _fill_weights(model, src, weights, tower_files, tie, vocab, new_rows, target_dtype)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = llava_processor(tokenizer, vision_config, strategy, spec, template)

    try:
        with atomic_dir(out, prefix=f".{out.name}.converting-") as tmp:
            model.save_pretrained(tmp, max_shard_size="5GB")
            processor.save_pretrained(tmp)
            (tmp / "README.md").write_text(_readme(src, cfg, spec, tower_in_ckpt, tower_dir, added, src_rows, vocab,
                                                   vision_config, strategy, spm))
            if out.exists():
                with contextlib.suppress(OSError):  # checked empty above; a racing conversion may have filled it
                    out.rmdir()
    except OSError as exc:  # a full disk part-way: nothing half written is left (the folder appears whole)
        raise OutputWriteError(f"{out}: cannot write the converted model ({describe(exc)})") from None
    log.info("wrote %s", out)
    return out


def _source_spec(src: Path, tower_dir: Path | None):
    """The family detection's view of the source (its recipe and preprocessing go into the output)."""
    from m3cli.families import detect_family

    try:
        spec = detect_family(src, vision_tower=tower_dir)
    except ModelError as exc:
        raise ConvertError(str(exc)) from None
    if spec.layout != "original":
        raise ConvertError(f"{src}: not an original-layout LLaVA checkpoint ({spec.name})")
    if spec.family not in ("llava15", "llavanext"):
        aspect = spec.source.image_aspect_ratio if spec.source else "?"
        raise ConvertError(f"{src}: {spec.name} (image_aspect_ratio {aspect}) is not supported by the converter; "
                           "LLaVA-1.5 and LLaVA-NeXT checkpoints are")
    return spec


def _check_lm_weights(src: Path, names) -> None:
    """The projector and the language model's ends must be in the checkpoint."""
    missing = [k for k in SRC_PROJECTOR_KEYS if k not in names]
    if missing:
        raise ConvertError(f"{src}: projector weights missing ({', '.join(missing)}); not an mlp2x_gelu LLaVA")
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        if key not in names:
            raise ConvertError(f"{src}: language-model weight {key} missing")


def _separate_tower(cfg: dict, src: Path, tower_dir: Path | None) -> WeightFiles:
    """The weight files of a tower the checkpoint does not carry (from the CLIP directory)."""
    if tower_dir is None:
        raise ConvertError(
            f"{src}: the checkpoint has no vision-tower weights and {cfg.get('mm_vision_tower')!r} is not "
            "a local directory; pass the CLIP tower directory (vision_tower=DIR / --vision-tower DIR)"
        )
    tower_files = WeightFiles(tower_dir, what="vision tower", allow_empty=True)
    if not any(tower_rest(k) is not None for k in tower_files.keys()):
        raise ConvertError(f"{tower_dir}: no CLIP vision weights found (vision_model.*)")
    return tower_files


def _fill_weights(model, src: Path, weights: WeightFiles, tower_files: WeightFiles | None, tie: bool,
                  vocab: int, new_rows: list[int], dtype) -> None:
    """Stream the checkpoint (and tower) into the meta-device ``model``, one source file at a time.

    The embedding and LM head get ``vocab`` rows, ``new_rows`` (added tokens) set to the mean of the old.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapper = KeyMapper(expected)
    resize_keys = {mapper.lm_prefix + "embed_tokens.weight", mapper.lm_head}

    # Plan every key before reading any data, so a bad checkpoint fails in seconds.
    plan = {k: mapper.checkpoint_key(k) for k in weights.keys()}
    unknown = [k for k, t in plan.items() if t is None and not droppable(k)]
    if unknown:
        raise ConvertError(
            f"{src}: unexpected weight {unknown[0]} ({len(unknown)} in all); not a LLaVA-Llama checkpoint?"
        )
    planned = {t for t in plan.values() if t is not None}
    if tower_files is not None:
        planned |= {t for k in tower_files.keys() if tower_rest(k) and (t := mapper.tower_key(tower_rest(k)))}
    if tie:
        planned.add(mapper.lm_head)
    absent = [k for k in expected if k not in planned]
    if absent:
        raise ConvertError(f"{src}: {len(absent)} weights missing, e.g. {absent[0]}")
    filled: set[str] = set()

    def load(batch: dict) -> None:
        result = model.load_state_dict(batch, strict=False, assign=True)
        if result.unexpected_keys:  # the mapper only produces expected keys; a guard all the same
            raise ConvertError(f"internal: unexpected keys {result.unexpected_keys[:3]}")
        filled.update(batch)

    def convert(key: str, tensor, target: str):
        if target in resize_keys:
            return resize_rows(tensor, vocab, new_rows, dtype)
        if tuple(tensor.shape) != expected[target]:
            raise ConvertError(f"weight {key} has shape {tuple(tensor.shape)}, expected {expected[target]}")
        return tensor.to(dtype)

    sources = [(weights, "", lambda k: plan[k] is not None, plan.get)]
    if tower_files is not None:
        sources.append((tower_files, "vision tower ", lambda k: tower_rest(k) is not None,
                        lambda k: mapper.tower_key(tower_rest(k))))
    for files, what, select, target_of in sources:
        for path, tensors in files.iter_files(select=select):
            log.info("converting %s%s", what, path.name)
            batch = {}
            for key, tensor in tensors:
                target = target_of(key)
                if target is not None:
                    batch[target] = convert(key, tensor, target)
            load(batch)
            del batch

    if tie:
        model.tie_weights()
        filled.add(mapper.lm_head)
    absent = [k for k in expected if k not in filled]
    if absent:  # guarded by the plan above
        raise ConvertError(f"{src}: {len(absent)} weights missing after conversion, e.g. {absent[0]}")


# -- config ------------------------------------------------------------------------------


def _read_source_config(src: Path) -> dict:
    if not src.is_dir():
        raise ConvertError(f"source directory not found: {src}")
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no config.json (not a checkpoint directory)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: unreadable config: {describe(exc)}") from exc
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: config is not a JSON object")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    # liuhaotian's own releases say model_type "llava" like transformers' LLaVA; their mm_* keys tell them apart
    original = "mm_vision_tower" in cfg and "vision_config" not in cfg
    if not original and (model_type in ("llava", "llava_next") or "LlavaForConditionalGeneration" in archs):
        raise ConvertError(f"{src}: already a Hugging Face LLaVA (model_type {model_type}); load it directly")
    if model_type not in ("llava_llama", "llava") and "LlavaLlamaForCausalLM" not in archs:
        raise ConvertError(f"{src}: not an original LLaVA-Llama checkpoint (model_type {model_type!r})")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConvertError(f"{src}: projector type {cfg['mm_projector_type']!r} unsupported (only mlp2x_gelu)")
    if cfg.get("mm_use_im_start_end"):
        raise ConvertError(f"{src}: mm_use_im_start_end checkpoints are not supported")
    if "mm_vision_select_layer" not in cfg:
        raise ConvertError(f"{src}: config lacks mm_vision_select_layer")
    return cfg


def _llava_config(cfg, vision_config, tokenizer, vocab, tie, strategy, seq_len, dtype, pinpoints=None):
    """``LlavaConfig``, or with ``pinpoints`` (``(h, w)`` pairs) a ``LlavaNextConfig`` keeping them in order."""
    from transformers import LlamaConfig, LlavaConfig, LlavaNextConfig

    text_kwargs = {k: cfg[k] for k in _TEXT_FIELDS if cfg.get(k) is not None}
    text = LlamaConfig(
        **text_kwargs,
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    extra = {}
    if pinpoints is not None:
        # transformers reads [height, width]; detection already swapped the original [width, height] pairs,
        # keeping their order (which breaks select_best_resolution's ties as the original code does)
        extra["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    config = (LlavaNextConfig if pinpoints is not None else LlavaConfig)(
        **extra,
        vision_config=vision_config,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",  # mlp2x_gelu is Linear, GELU (erf), Linear
        vision_feature_layer=int(cfg["mm_vision_select_layer"]),
        vision_feature_select_strategy=strategy,
        image_seq_length=seq_len,
        multimodal_projector_bias=True,
        tie_word_embeddings=tie,
    )
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    return config


def _target_dtype(requested: str, source):
    if requested == "auto":
        return source
    return torch_dtype(requested)


def _readme(src, cfg, spec, tower_in_ckpt, tower_dir, added, src_rows, vocab, vc, strategy, spm) -> str:
    tower = "from the checkpoint" if tower_in_ckpt else f"from {tower_dir}"
    added_text = ", ".join(f"{t} (id {i})" for t, i in added.items()) or "none"
    aspect = cfg.get("image_aspect_ratio", "square")
    target = "LlavaNextForConditionalGeneration" if spec.preprocess == "anyres" else "LlavaForConditionalGeneration"
    if spec.preprocess == "anyres":
        how = (" — anyres: the best of the pinpoints for the image, tiles of the tower's size plus the whole image "
               "(`LlavaNextImageProcessor`, pinpoints stored as [height, width], each original [width, height] pair "
               "swapped, order kept), `model.image_newline` kept; the `m3cli` block records the original code's "
               "`int()` unpadding (`anyres_flavour: original`).")
    elif spec.preprocess == "pad":
        how = (" — each image is padded to a square with the processor's mean colour, centred, before CLIP "
               "preprocessing (`LlavaImageProcessor` with `do_pad: true`, the original `expand2square`).")
    else:
        how = " — CLIP's resize and centre crop."
    lines = [
        "# Converted LLaVA checkpoint",
        "",
        f"Converted by m3 from `{src}` (original LLaVA layout, "
        f"`{(cfg.get('architectures') or ['LlavaLlamaForCausalLM'])[0]}`) to `{target}`. "
        "It keeps the original recipe, also for plain transformers users (`AutoProcessor` + the chat template):",
        "",
        f"- Vision tower `{cfg.get('mm_vision_tower')}` ({tower}): {vc.image_size}px, patch {vc.patch_size}, "
        f"feature layer {cfg.get('mm_vision_select_layer')}, strategy `{strategy}`.",
        f"- Tokens added: {added_text}; embeddings resized {src_rows} -> {vocab} rows (new rows = mean of the old).",
        f"- image_aspect_ratio: {aspect}{how}",
        f"- Prompt: `{spec.prompt_recipe}`"
        + (" (the system line, then `USER: <image>\\n{question} ASSISTANT:`), as the LLaVA-1.5 and M3 evaluations "
           "use it; the chat template writes `<image> \\n` so that transformers' tokenisation gives the original "
           "per-piece ids (a `▁` before the newline)." if spec.prompt_recipe == "vicuna_v1" and spm else
           " (the system line, then `USER: <image>\\n{question} ASSISTANT:`)." if spec.prompt_recipe == "vicuna_v1"
           else " (recorded in config.json's `m3cli` block; no chat template written)."),
        "- config.json's `m3cli` block records the recipe for m3.",
    ]
    return "\n".join(lines) + "\n"
