"""Detect a model directory's family from its JSON files, before any weights load; refuse the rest in one line.

Read: ``config.json`` (architecture, model_type, the original layout's ``mm_*`` keys, our ``m3cli`` block),
the image processor settings (``processor_config.json``'s nested ``image_processor``, else
``preprocessor_config.json``, the order transformers 5 uses), the chat template (``processor_config.json``'s
``chat_template``, ``chat_template.json``, ``chat_template.jinja``, then ``tokenizer_config.json``'s
``chat_template``) and ``tokenizer_config.json`` (added tokens, ``legacy``). Nothing else is opened.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from m3cli.errors import ModelError, describe
from m3cli.families.converted import M3CLI_KEY, read_m3cli_block, recipe_of_template
from m3cli.families.spec import (
    LLAVA15_HF,
    LLAVA15_ORIGINAL,
    LLAVANEXT_HF,
    LLAVANEXT_ORIGINAL,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SUPPORTED,
    FamilySpec,
    ImageSpec,
    OriginalSource,
    TemplateError,
    UnsupportedModelError,
)

HF_LLAVA = "LlavaForConditionalGeneration"
HF_NEXT = "LlavaNextForConditionalGeneration"
ORIGINAL_ARCHS = {"LlavaLlamaForCausalLM": "llava_llama", "LlavaMistralForCausalLM": "llava_mistral"}
ORIGINAL_TYPES = {"llava_llama", "llava_mistral"}

# Image processors whose default path is CLIP's: resize the short side, centre crop (LLaVA's adds do_pad).
CLIP_LIKE = {"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
             "LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"}
NEXT_PROCESSORS = {"LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil"}
LLAVA_PROCESSORS = {"LlavaImageProcessor", "LlavaImageProcessorFast", "LlavaImageProcessorPil"}

# CLIP towers named by hub id in original checkpoints, for when the tower is not on this machine yet.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": ImageSpec(size=336, shortest_edge=336, patch_size=14),
    "openai/clip-vit-large-patch14": ImageSpec(size=224, shortest_edge=224, patch_size=14),
}

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
    cfg = _read_json(config_path)
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    model_type = str(cfg.get("model_type") or "")

    refusal = _refusal(cfg, arch, model_type)
    if refusal:
        raise UnsupportedModelError(f"{root.name}: {refusal} is not supported; supported: {SUPPORTED}")
    if _is_original_config(cfg, arch, model_type):
        return _original(root, cfg, arch, model_type, vision_tower)
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
        cfg = _read_json(Path(path) / "config.json")
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
    proc_cfg = _read_json(root / "processor_config.json", missing_ok=True) or {}
    image_cfg = _image_processor_config(root, proc_cfg)
    if image_cfg is None:
        raise ModelError(f"{root.name}: no image processor settings (processor_config.json or "
                         "preprocessor_config.json)")
    block = read_m3cli_block(cfg)
    kind = str(image_cfg.get("image_processor_type") or "")
    padded = kind in LLAVA_PROCESSORS and bool(image_cfg.get("do_pad"))
    aspect = block.get("image_aspect_ratio") if block else None
    image = _image_spec(root.name, image_cfg, vision_cfg, square_input=next_ or padded or aspect == "pad")

    pinpoints: tuple[tuple[int, int], ...] = ()
    if next_:
        preprocess = "anyres"
        if kind and kind not in NEXT_PROCESSORS:
            raise ModelError(f"{root.name}: LLaVA-NeXT with image processor {kind}, expected LlavaNextImageProcessor")
        raw = image_cfg.get("image_grid_pinpoints") or cfg.get("image_grid_pinpoints")
        pinpoints = _pinpoints(root.name, raw, order="hw")
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

    tok_cfg = _read_json(root / "tokenizer_config.json", missing_ok=True) or {}
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
        prefix_after_special=_prefix_after_special(root, tok_cfg),
        converted=bool(block),
        grid_pinpoints=pinpoints,
        # a conversion of an original NeXT checkpoint keeps the original code's unpadding (its m3cli block says so)
        anyres_flavour=str((block or {}).get("anyres_flavour") or "hf") if next_ else None,
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
        vision_feature_select_strategy=str(cfg.get("vision_feature_select_strategy") or "default"),
        notes=notes,
    )


def _image_processor_config(root: Path, proc_cfg: dict) -> dict | None:
    """The image processor's settings, in transformers 5's order: nested in processor_config, then the file."""
    nested = proc_cfg.get("image_processor")
    if isinstance(nested, dict):
        return nested
    return _read_json(root / "preprocessor_config.json", missing_ok=True)


def _image_spec(name: str, image_cfg: dict, vision_cfg: dict, *, square_input: bool = False) -> ImageSpec:
    """An :class:`ImageSpec` from a CLIP-style image processor config (and the tower's config)."""
    if image_cfg.get("do_resize") is False:
        raise ModelError(f"{name}: image processor with do_resize false is not supported")
    size = image_cfg.get("size")
    crop = image_cfg.get("crop_size")
    do_crop = image_cfg.get("do_center_crop", True)
    shortest: int | None = None
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size and "width" in size:
        if int(size["height"]) != int(size["width"]):
            raise ModelError(f"{name}: non-square image processor size {size} is not supported")
        crop = crop or size
    elif isinstance(size, int):
        shortest = size
    elif size is not None:
        raise ModelError(f"{name}: image processor size {size!r} is not supported")
    if isinstance(crop, int):
        side = crop
    elif isinstance(crop, dict) and "height" in crop and "width" in crop:
        if int(crop["height"]) != int(crop["width"]):
            raise ModelError(f"{name}: non-square crop_size {crop} is not supported")
        side = int(crop["height"])
    elif shortest is not None:
        side = shortest
    else:
        side = int(vision_cfg.get("image_size") or 0)
    if shortest is not None and not do_crop and not square_input:
        raise ModelError(f"{name}: image processor without centre crop would feed non-square images")
    tower = vision_cfg.get("image_size")
    if tower and int(tower) != side:
        raise ModelError(f"{name}: the image processor makes {side}x{side} images but the vision tower "
                         f"expects {tower}x{tower}")
    if side <= 0:
        raise ModelError(f"{name}: cannot tell the vision tower's image size")
    mean = _triple(image_cfg.get("image_mean"), OPENAI_CLIP_MEAN)
    std = _triple(image_cfg.get("image_std"), OPENAI_CLIP_STD)
    patch = vision_cfg.get("patch_size")
    return ImageSpec(
        size=side, mean=mean, std=std, shortest_edge=shortest,
        resample=int(image_cfg.get("resample", 3)),
        do_rescale=bool(image_cfg.get("do_rescale", True)),
        rescale_factor=float(image_cfg.get("rescale_factor", 1 / 255)),
        do_normalize=bool(image_cfg.get("do_normalize", True)),
        patch_size=int(patch) if patch else None,
    )


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # type: ignore[return-value]
    a, b, c = (float(x) for x in value)
    return (a, b, c)


def _legacy_spm(tok_cfg: dict) -> bool:
    # transformers' Llama tokenizer with legacy=true prefixes "▁" to text after every special token (its
    # Metaspace prepend_scheme "always"); the default legacy=false does so only at the start ("first")
    cls = str(tok_cfg.get("tokenizer_class") or "")
    return bool(tok_cfg.get("legacy")) and cls.startswith(("LlamaTokenizer", "CodeLlamaTokenizer"))


def _prefix_after_special(root: Path, tok_cfg: dict) -> bool:
    """Whether transformers' tokenizer of ``root`` puts SentencePiece's "▁" in front of text after a special token.

    transformers 5 runs a ``tokenizer.json`` pipeline as it is written, so that file decides: a ``Prepend("▁")``
    normaliser (the form transformers 4.3x wrote, e.g. in the llava-hf repositories) or a Metaspace
    pre-tokenizer with ``prepend_scheme: always`` prefixes every text segment, also the one after ``<image>``;
    ``prepend_scheme: first`` only the first. Without a ``tokenizer.json`` the slow tokenizer is converted
    with the ``legacy`` flag of ``tokenizer_config.json``.
    """
    path = root / "tokenizer.json"
    if not path.is_file():
        return _legacy_spm(tok_cfg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return _legacy_spm(tok_cfg)  # the tokenizer load reports a broken file; detection stays on the config
    if not isinstance(data, dict):
        return False
    for node in _pipeline_nodes(data.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in _pipeline_nodes(data.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.14 wrote add_prefix_space instead
                return bool(node.get("add_prefix_space", True))
            return scheme == "always"
    return False


def _pipeline_nodes(node: Any) -> list[dict]:
    """A tokenizer.json normaliser / pre-tokenizer and the members of its Sequence, flattened."""
    if not isinstance(node, dict):
        return []
    members = node.get("normalizers") or node.get("pretokenizers")
    if node.get("type") == "Sequence" and isinstance(members, list):
        return [n for m in members for n in _pipeline_nodes(m)]
    return [node]


def find_chat_template(root: str | Path, proc_cfg: dict | None = None) -> str | None:
    """The model directory's chat template text, or None.

    The processor's own sources first, in transformers 5's order (``processor_config.json``'s key, then
    ``chat_template.json``, then ``chat_template.jinja``), then ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which "default" is taken).
    """
    root = Path(root)
    if proc_cfg is None:
        proc_cfg = _read_json(root / "processor_config.json", missing_ok=True) or {}
    found = _template_value(proc_cfg.get("chat_template"))
    if found:
        return found
    legacy = _read_json(root / "chat_template.json", missing_ok=True)
    if legacy:
        found = _template_value(legacy.get("chat_template"))
        if found:
            return found
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        try:
            text = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{jinja}: cannot read ({describe(exc)})") from exc
        if text.strip():
            return text
    tok_cfg = _read_json(root / "tokenizer_config.json", missing_ok=True) or {}
    return _template_value(tok_cfg.get("chat_template"))


def _template_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, dict):
        return _template_value(value.get("default"))
    if isinstance(value, list):
        named = {str(t.get("name")): t.get("template") for t in value if isinstance(t, dict)}
        return _template_value(named.get("default"))
    return None


def _check_recipe(name: str, recipe: str) -> None:
    from m3cli.families.prompts import RECIPE_NAMES

    if recipe not in RECIPE_NAMES:
        raise ModelError(f"{name}: unknown prompt recipe {recipe!r} (known: {', '.join(RECIPE_NAMES)})")


# -- the original (haotian-liu/LLaVA) layout ---------------------------------------------------------------
def _original(root: Path, cfg: dict, arch: str, model_type: str, vision_tower: str | Path | None) -> FamilySpec:
    if cfg.get("mm_use_im_start_end"):
        raise UnsupportedModelError(f"{root.name}: mm_use_im_start_end (image start/end tokens) is not supported; "
                                    f"supported: {SUPPORTED}")
    tower_name = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    if not tower_name:
        raise ModelError(f"{root.name}: original LLaVA config without mm_vision_tower")
    aspect = str(cfg.get("image_aspect_ratio") or "square")
    merge = str(cfg.get("mm_patch_merge_type") or "flat")
    if aspect == "anyres":
        if not (merge.startswith("spatial") and "unpad" in merge):
            raise UnsupportedModelError(f"{root.name}: anyres with mm_patch_merge_type {merge} is not supported; "
                                        f"supported: {SUPPORTED}")
        name, family, preprocess = LLAVANEXT_ORIGINAL, "llavanext", "anyres"
    elif aspect == "pad":
        name, family, preprocess = LLAVA15_ORIGINAL, "llava15", "pad"
    elif aspect in ("square", "", "crop", "none", "None"):
        # the original code's else-branch: the CLIP processor as it is (resize + centre crop)
        name, family, preprocess = LLAVA15_ORIGINAL, "llava15", "crop"
    else:
        raise UnsupportedModelError(f"{root.name}: image_aspect_ratio {aspect} is not supported; "
                                    f"supported: {SUPPORTED}")

    tower_dir = _tower_dir(root, tower_name, vision_tower)
    image = _tower_image_spec(root.name, tower_name, tower_dir)
    tok_cfg = _read_json(root / "tokenizer_config.json", missing_ok=True) or {}
    arch = arch or next((a for a, t in ORIGINAL_ARCHS.items() if t == model_type), "LlavaLlamaForCausalLM")
    pinpoints = _pinpoints(root.name, cfg.get("image_grid_pinpoints"), order="wh") if preprocess == "anyres" else ()
    source = OriginalSource(
        architecture=arch,
        model_type=model_type or ORIGINAL_ARCHS.get(arch, "llava_llama"),
        vision_tower=tower_name,
        vision_tower_dir=tower_dir,
        select_layer=int(cfg.get("mm_vision_select_layer", -2)),
        select_feature=str(cfg.get("mm_vision_select_feature") or "patch"),
        projector_type=str(cfg.get("mm_projector_type") or "linear"),
        mm_hidden_size=int(cfg["mm_hidden_size"]) if cfg.get("mm_hidden_size") else None,
        patch_merge_type=merge,
        image_aspect_ratio=aspect,
        tokenizer_files=tuple(f for f in ("tokenizer.model", "tokenizer.json") if (root / f).is_file()),
        weight_files=tuple(sorted(p.name for p in root.iterdir()
                                  if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))),
        tower_in_checkpoint=_tower_in_index(root),
    )
    return FamilySpec(
        name=name,
        family=family,
        layout="original",
        preprocess=preprocess,
        image=image,
        prompt_recipe=_original_recipe(arch, model_type, tok_cfg),
        model_dir=root,
        architecture=arch,
        chat_template=None,
        image_token="<image>",
        source=source,
        grid_pinpoints=pinpoints,
        anyres_flavour="original" if preprocess == "anyres" else None,
        vision_feature_layer=source.select_layer,
        vision_feature_select_strategy="default" if source.select_feature == "patch" else "full",
    )


def _original_recipe(arch: str, model_type: str, tok_cfg: dict) -> str:
    """The conversation the original evaluation uses for this checkpoint's language model."""
    if arch == "LlavaMistralForCausalLM" or model_type == "llava_mistral":
        return "mistral_instruct"
    added = tok_cfg.get("added_tokens_decoder") or {}
    texts = {str(v.get("content")) for v in added.values() if isinstance(v, dict)}
    if "<|im_start|>" in texts:  # the 34B NeXT (Nous-Hermes-2-Yi) evaluates with chatml_direct
        return "chatml_direct"
    return "vicuna_v1"  # LLaVA-1.5 / Vicuna NeXT and the M3 releases (--conv-mode vicuna_v1)


def _tower_dir(root: Path, tower_name: str, given: str | Path | None) -> Path | None:
    if given is not None:
        path = Path(given)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a vision tower directory (no config.json)")
        return path
    for candidate in (Path(tower_name), root / tower_name):
        try:
            if (candidate / "config.json").is_file():
                return candidate
        except OSError:  # a hub id is not a path on every filesystem
            continue
    return None


def _tower_image_spec(name: str, tower_name: str, tower_dir: Path | None) -> ImageSpec:
    if tower_dir is None:
        known = KNOWN_TOWERS.get(tower_name)
        if known is None:
            raise ModelError(f"{name}: its vision tower {tower_name} is neither a local directory nor in the local "
                             f"Hugging Face cache; pass --vision-tower DIR, or download it first "
                             f"(huggingface-cli download {tower_name})")
        return known
    tower_cfg = _read_json(tower_dir / "config.json")
    vision_cfg = tower_cfg.get("vision_config") or tower_cfg
    proc_cfg = _read_json(tower_dir / "processor_config.json", missing_ok=True) or {}
    image_cfg = _image_processor_config(tower_dir, proc_cfg)
    if image_cfg is None:
        known = KNOWN_TOWERS.get(tower_name)
        if known is None:
            raise ModelError(f"{tower_dir}: vision tower without preprocessor_config.json")
        return known
    return _image_spec(str(tower_dir), image_cfg, vision_cfg)


def _tower_in_index(root: Path) -> bool | None:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        data = _read_json(root / index, missing_ok=True)
        if data is not None:
            return any(str(k).startswith("model.vision_tower.") for k in (data.get("weight_map") or {}))
    return None


def _pinpoints(name: str, raw: Any, *, order: str) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT pinpoints as (height, width): transformers stores [h, w], the original code [w, h]."""
    if raw is None:
        raise ModelError(f"{name}: LLaVA-NeXT config without image_grid_pinpoints")
    if isinstance(raw, str):  # the original code accepts a Python literal string
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise ModelError(f"{name}: unreadable image_grid_pinpoints {raw!r}") from exc
    try:
        pairs = [(int(a), int(b)) for a, b in raw]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name}: unreadable image_grid_pinpoints {raw!r}") from exc
    return tuple(pairs if order == "hw" else [(b, a) for a, b in pairs])


def _read_json(path: Path, *, missing_ok: bool = False) -> dict | None:
    if not path.is_file():
        if missing_ok:
            return None
        raise ModelError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({describe(exc)})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


__all__ = ["M3CLI_KEY", "detect_family", "find_chat_template", "is_original_checkpoint"]
