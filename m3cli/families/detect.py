"""Detect a model directory's family from its JSON files, before any weights load; refuse the rest in one line.

Read: ``config.json`` (architecture, model_type, the original layout's ``mm_*`` keys, our ``m3cli`` block),
the image processor settings (``processor_config.json``'s nested ``image_processor``, else
``preprocessor_config.json``, the order transformers 5 uses), the chat template (``processor_config.json``'s
``chat_template``, ``chat_template.json``, ``chat_template.jinja``, then ``tokenizer_config.json``'s
``chat_template``) and ``tokenizer_config.json`` (added tokens, ``legacy``). Nothing else is opened.
The file readers are in :mod:`m3cli.families.config_files`, the original layout in
:mod:`m3cli.families.original_layout`.
"""

from __future__ import annotations

from pathlib import Path

from m3cli.errors import ModelError
from m3cli.families.config_files import (
    find_chat_template,
    grid_pinpoints,
    image_processor_config,
    image_spec,
    prefix_after_special,
    read_json,
)
from m3cli.families.converted import M3CLI_KEY, read_m3cli_block, recipe_of_template
from m3cli.families.original_layout import ORIGINAL_ARCHS, original_spec
from m3cli.families.spec import (
    LLAVA15_HF,
    LLAVANEXT_HF,
    SUPPORTED,
    FamilySpec,
    TemplateError,
    UnsupportedModelError,
)

HF_LLAVA = "LlavaForConditionalGeneration"
HF_NEXT = "LlavaNextForConditionalGeneration"
ORIGINAL_TYPES = {"llava_llama", "llava_mistral"}

# Image processors whose default path is CLIP's: resize the short side, centre crop (LLaVA's adds do_pad).
CLIP_LIKE = {"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
             "LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"}
NEXT_PROCESSORS = {"LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil"}
LLAVA_PROCESSORS = {"LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"}


# model_type / architecture markers of families we recognise only to refuse them by name.
_QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_ONEVISION_TYPES = ("llava_onevision", "llava_qwen")
_TEXT_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox",
               "falcon", "mpt", "opt", "bloom", "stablelm", "starcoder2", "olmo", "cohere", "yi", "internlm2"}

TEMPLATE_SOURCES = "chat_template.jinja, chat_template.json, or chat_template in tokenizer_config/processor_config"


def detect_family(path: str | Path, *, vision_tower: str | Path | None = None,
                  fallback_recipe: str | None = None) -> FamilySpec:
    """The :class:`FamilySpec` of the model directory ``path``, from its JSON files only.

    ``vision_tower``: a local CLIP directory for an original-layout checkpoint (``--vision-tower``); without
    it ``mm_vision_tower`` is used when it names an existing directory, else the known CLIP towers' settings.
    ``fallback_recipe``: the prompt recipe for an HF LLaVA directory that has no chat template (e.g. from the
    registry); without one such a directory is refused. Raises :class:`UnsupportedModelError` (one line naming
    what is supported), :class:`TemplateError` or :class:`ModelError`.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"{root}: not a model directory")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError(f"{root.name}: no config.json, so not a model directory m3 can read; "
                                    f"supported: {SUPPORTED}")
    cfg = read_json(config_path)
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    model_type = str(cfg.get("model_type") or "")

    refusal = _refusal(cfg, arch, model_type)
    if refusal:
        raise UnsupportedModelError(f"{root.name}: {refusal} is not supported; supported: {SUPPORTED}")
    if _is_original_config(cfg, arch, model_type):
        return original_spec(root, cfg, arch, model_type, vision_tower)
    if arch == HF_NEXT or model_type == "llava_next":
        return _hf(root, cfg, arch or HF_NEXT, next_=True, fallback_recipe=fallback_recipe)
    if arch == HF_LLAVA or model_type == "llava":
        return _hf(root, cfg, arch or HF_LLAVA, next_=False, fallback_recipe=fallback_recipe)
    raise UnsupportedModelError(f"{root.name}: {_what(cfg, arch, model_type)} is not supported; "
                                f"supported: {SUPPORTED}")


def is_original_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` says original layout (haotian-liu/LLaVA), as
    :func:`detect_family` classifies it; False when there is no readable config (detection says why)."""
    try:
        cfg = read_json(Path(path) / "config.json")
    except ModelError:
        return False
    archs = cfg.get("architectures") or []
    return _is_original_config(cfg, str(archs[0]) if archs else "", str(cfg.get("model_type") or ""))


# -- classification ------------------------------------------------------------------------------------
def _is_original_config(cfg: dict, arch: str, model_type: str) -> bool:
    return arch in ORIGINAL_ARCHS or model_type in ORIGINAL_TYPES or _looks_original(cfg)


def _looks_original(cfg: dict) -> bool:
    # liuhaotian's first releases said model_type "llava" like transformers' own LLaVA: the mm_* keys tell them apart
    return "mm_vision_tower" in cfg and "vision_config" not in cfg


def _refusal(cfg: dict, arch: str, model_type: str) -> str | None:
    """A name for the families we know and refuse (None: not one of those)."""
    low = arch.lower()
    if model_type.startswith(_QWEN_VL) or "qwen2vl" in low or "qwen2_5_vl" in low or "qwen3vl" in low:
        return "Qwen2-VL (" + (arch or model_type) + ")"
    aspect = str(cfg.get("image_aspect_ratio") or "")
    if model_type in _ONEVISION_TYPES or "onevision" in low or arch == "LlavaQwenForCausalLM" \
            or aspect.startswith("anyres_max"):
        return "LLaVA-OneVision (" + (arch or model_type) + ")"
    if model_type == "llava_next_video" or "llavanextvideo" in low:
        return "LLaVA-NeXT-Video (" + (arch or model_type) + ")"
    if arch.startswith("Llava") and arch.endswith("ForCausalLM") and arch not in ORIGINAL_ARCHS:
        return f"the original-layout {arch}"
    return None


def _what(cfg: dict, arch: str, model_type: str) -> str:
    """How a refused model is named in the one-line message."""
    name = arch or model_type or "a model without architectures/model_type"
    vision = "vision_config" in cfg or "visual" in cfg or any(k.startswith("mm_") for k in cfg)
    if vision or "ForConditionalGeneration" in arch or "ImageTextToText" in arch:
        return f"{name}, a vision-language model other than LLaVA,"
    if arch.endswith(("ForCausalLM", "LMHeadModel")) or model_type in _TEXT_TYPES:
        return f"{name}, a text-only model,"
    return f"{name}, not a LLaVA model,"


# -- the llava-hf layouts --------------------------------------------------------------------------------
def _hf(root: Path, cfg: dict, arch: str, *, next_: bool, fallback_recipe: str | None) -> FamilySpec:
    vision_cfg = cfg.get("vision_config") or {}
    proc_cfg = read_json(root / "processor_config.json", missing_ok=True) or {}
    image_cfg = image_processor_config(root, proc_cfg)
    if image_cfg is None:
        raise ModelError(f"{root.name}: no image processor settings (processor_config.json or "
                         "preprocessor_config.json)")
    block = read_m3cli_block(cfg)
    kind = str(image_cfg.get("image_processor_type") or "")
    padded = kind in LLAVA_PROCESSORS and bool(image_cfg.get("do_pad"))
    aspect = block.get("image_aspect_ratio") if block else None
    image = image_spec(root.name, image_cfg, vision_cfg, square_input=next_ or padded or aspect == "pad")

    pinpoints: tuple[tuple[int, int], ...] = ()
    if next_:
        preprocess = "anyres"
        if kind and kind not in NEXT_PROCESSORS:
            raise ModelError(f"{root.name}: LLaVA-NeXT with image processor {kind}, expected LlavaNextImageProcessor")
        raw = image_cfg.get("image_grid_pinpoints") or cfg.get("image_grid_pinpoints")
        pinpoints = grid_pinpoints(root.name, raw, order="hw")
    else:
        if kind and kind not in CLIP_LIKE:
            raise ModelError(f"{root.name}: image processor {kind} is not supported (CLIP's resize and centre "
                             "crop, optionally LLaVA's do_pad, are)")
        preprocess = "pad" if aspect == "pad" or padded else "crop"

    template = find_chat_template(root, proc_cfg)
    notes: tuple[str, ...] = ()
    if block and block.get("prompt_recipe"):
        recipe = str(block["prompt_recipe"])
    elif template:
        # m3's own vicuna_v1 template (a converted checkpoint that lost its block) means the recipe itself
        recipe = recipe_of_template(template) or "hf_template"
    elif fallback_recipe:
        recipe = fallback_recipe
    elif next_:
        # a NeXT directory without a template gets its language model's conversation (what the original
        # evaluation scripts use for it); said in the spec's notes
        from m3cli.families.llavanext import fallback_recipe as next_fallback

        recipe = next_fallback(cfg)
        notes = (f"no chat template: the {recipe} conversation of its language model",)
    else:
        raise TemplateError(f"{root.name}: no chat template ({TEMPLATE_SOURCES}) and no prompt recipe to fall "
                            "back on; add one or pass --chat-template")
    _check_recipe(root.name, recipe)

    tok_cfg = read_json(root / "tokenizer_config.json", missing_ok=True) or {}
    token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    layer = cfg.get("vision_feature_layer", -2)
    return FamilySpec(
        name=LLAVANEXT_HF if next_ else LLAVA15_HF,
        family="llavanext" if next_ else "llava15",
        layout="hf",
        preprocess=preprocess,
        image=image,
        prompt_recipe=recipe,
        model_dir=root,
        architecture=arch,
        chat_template=template,
        image_token=str(proc_cfg.get("image_token") or "<image>"),
        image_token_id=int(token_id) if token_id is not None else None,
        prefix_after_special=prefix_after_special(root, tok_cfg),
        converted=bool(block),
        grid_pinpoints=pinpoints,
        # a conversion of an original NeXT checkpoint keeps the original code's unpadding (its m3cli block says so)
        anyres_flavour=str((block or {}).get("anyres_flavour") or "hf") if next_ else None,
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
        vision_feature_select_strategy=str(cfg.get("vision_feature_select_strategy") or "default"),
        notes=notes,
    )


def _check_recipe(name: str, recipe: str) -> None:
    from m3cli.families.prompts import RECIPE_NAMES

    if recipe not in RECIPE_NAMES:
        raise ModelError(f"{name}: unknown prompt recipe {recipe!r} (known: {', '.join(RECIPE_NAMES)})")




__all__ = ["M3CLI_KEY", "detect_family", "find_chat_template", "is_original_checkpoint"]
