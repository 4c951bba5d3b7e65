"""The original (haotian-liu/LLaVA) layout, as the M3 releases use it: its ``mm_*`` config keys, the CLIP
tower it names (inside the checkpoint, a local directory, or a known hub id) and the conversation its own
evaluation scripts use. :func:`original_spec` is called by :func:`m3cli.families.detect.detect_family`.
"""

from __future__ import annotations

from pathlib import Path

from m3cli.errors import ModelError
from m3cli.families.config_files import grid_pinpoints, image_processor_config, image_spec, read_json
from m3cli.families.spec import (
    LLAVA15_ORIGINAL,
    LLAVANEXT_ORIGINAL,
    SUPPORTED,
    FamilySpec,
    ImageSpec,
    OriginalSource,
    UnsupportedModelError,
)

ORIGINAL_ARCHS = {"LlavaLlamaForCausalLM": "llava_llama", "LlavaMistralForCausalLM": "llava_mistral"}


# CLIP towers named by hub id in original checkpoints, for when the tower is not on this machine yet.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": ImageSpec(size=336, shortest_edge=336, patch_size=14),
    "openai/clip-vit-large-patch14": ImageSpec(size=224, shortest_edge=224, patch_size=14),
}


def original_spec(root: Path, cfg: dict, arch: str, model_type: str, vision_tower: str | Path | None) -> FamilySpec:
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
    tok_cfg = read_json(root / "tokenizer_config.json", missing_ok=True) or {}
    arch = arch or next((a for a, t in ORIGINAL_ARCHS.items() if t == model_type), "LlavaLlamaForCausalLM")
    pinpoints = grid_pinpoints(root.name, cfg.get("image_grid_pinpoints"), order="wh") if preprocess == "anyres" else ()
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
    tower_cfg = read_json(tower_dir / "config.json")
    vision_cfg = tower_cfg.get("vision_config") or tower_cfg
    proc_cfg = read_json(tower_dir / "processor_config.json", missing_ok=True) or {}
    image_cfg = image_processor_config(tower_dir, proc_cfg)
    if image_cfg is None:
        known = KNOWN_TOWERS.get(tower_name)
        if known is None:
            raise ModelError(f"{tower_dir}: vision tower without preprocessor_config.json")
        return known
    return image_spec(str(tower_dir), image_cfg, vision_cfg)


def _tower_in_index(root: Path) -> bool | None:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        data = read_json(root / index, missing_ok=True)
        if data is not None:
            return any(str(k).startswith("model.vision_tower.") for k in (data.get("weight_map") or {}))
    return None
