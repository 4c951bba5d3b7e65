"""The pieces of an original-LLaVA conversion that are not weights: the CLIP tower's config, the
tokenizer (with ``<image>`` and ``<pad>`` added) and the ``LlavaProcessor``."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from m3cli.convert.original_weights import SRC_TOWER, WeightFiles, tower_rest
from m3cli.errors import ConvertError, describe
from m3cli.models.build import IMAGE_TOKEN, PAD

# The public towers LLaVA uses, so a checkpoint that carries its tower converts without
# a copy of the CLIP repository. Checked against the weight shapes before use.
CLIP_PRESETS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


# -- vision tower ------------------------------------------------------------------------


def find_tower_dir(cfg: dict, src: Path, given) -> Path | None:
    """The local CLIP directory: the argument, else ``mm_vision_tower`` as a local directory (absolute, or
    relative to the checkpoint), else that hub id's snapshot in the local Hugging Face cache (no network)."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise ConvertError(f"vision tower directory not found: {path}")
        if not (path / "config.json").is_file():
            raise ConvertError(f"{path}: no config.json (not a CLIP checkpoint directory)")
        return path
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise ConvertError(f"{src}: config lacks mm_vision_tower")
    for path in (Path(name).expanduser(), src / name):
        try:
            if path.is_dir() and (path / "config.json").is_file():
                return path
        except OSError:
            continue
    from m3cli.models import hub

    if hub.looks_like_hub_id(name):
        cached = hub.cached_snapshot(name)
        if cached is not None and (cached / "config.json").is_file():
            return cached
    return None


def vision_config_for(cfg: dict, tower_dir: Path | None, weights: WeightFiles):
    """CLIPVisionConfig from the tower directory or a known preset, checked against the weights."""
    from transformers import CLIPVisionConfig

    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if tower_dir is not None:
        try:
            data = json.loads((tower_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{tower_dir}/config.json: unreadable: {describe(exc)}") from exc
        if "vision_config" in data:
            data = data["vision_config"] or {}
        elif data.get("model_type") not in (None, "clip_vision_model"):
            raise ConvertError(f"{tower_dir}: not a CLIP vision tower (model_type {data.get('model_type')!r})")
        data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "model_type")}
        vc = CLIPVisionConfig(**data)
        origin = str(tower_dir)
    elif name in CLIP_PRESETS:
        vc = CLIPVisionConfig(**CLIP_PRESETS[name])
        origin = name
    else:
        raise ConvertError(
            f"cannot tell the vision tower's config ({name!r} is not a local directory); "
            "pass the CLIP tower directory (vision_tower=DIR / --vision-tower DIR)"
        )

    keys = weights.keys()

    def find(suffix: str) -> str:
        hits = [k for k in keys if k.endswith(suffix) and (k.startswith(SRC_TOWER) or tower_rest(k))]
        if not hits:
            raise ConvertError(f"vision tower weight *{suffix} missing")
        return hits[0]

    patch = weights.shape(find("embeddings.patch_embedding.weight"))
    positions = weights.shape(find("embeddings.position_embedding.weight"))[0]
    fc1 = weights.shape(find("layers.0.mlp.fc1.weight"))[0]
    layers = {int(m.group(1)) for k in keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))
              and (k.startswith(SRC_TOWER) or tower_rest(k))}
    found = dict(hidden_size=patch[0], patch_size=patch[-1], intermediate_size=fc1,
                 num_positions=positions, num_hidden_layers=len(layers))
    want = dict(hidden_size=vc.hidden_size, patch_size=vc.patch_size, intermediate_size=vc.intermediate_size,
                num_positions=(vc.image_size // vc.patch_size) ** 2 + 1, num_hidden_layers=vc.num_hidden_layers)
    bad = [f"{k} {found[k]} vs {want[k]}" for k in want if found[k] != want[k]]
    if bad:
        raise ConvertError(f"vision tower weights do not match the config from {origin}: {', '.join(bad)}")
    return vc


# -- tokenizer and processor ------------------------------------------------------------


def prepare_tokenizer(src: Path):
    """The source tokenizer with ``<image>`` (and ``<pad>`` if missing) added; (tok, len before, added).

    A ``tokenizer.model``-only checkpoint (every LLaVA-1.5 / Vicuna release) is converted to a fast tokenizer,
    which needs ``sentencepiece`` and ``protobuf``; without them this is one line saying so (transformers would
    fall back to a tiktoken reader and fail with a message about tiktoken). The copy that is loaded has the
    ``"__type": "AddedToken"`` keys of transformers-4.31-era configs removed: the tokenizers library prints an
    "Ignored unknown kwarg option __type" line for each one otherwise.
    """
    from transformers import AddedToken, AutoTokenizer

    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ConvertError(f"{src}: no tokenizer files (tokenizer.model or tokenizer.json)")
    spm_only = (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file()
    if spm_only:
        missing = [m for m in ("sentencepiece", "google.protobuf") if not _importable(m)]
        if missing:
            names = " and ".join("protobuf" if m == "google.protobuf" else m for m in missing)
            raise ConvertError(f"{src}: its tokenizer is a SentencePiece tokenizer.model, which needs the {names} "
                               f"package{'s' if len(missing) > 1 else ''}: pip install sentencepiece protobuf")
    try:
        # Load from a copy of just the tokenizer files: next to a llava_llama config.json,
        # AutoTokenizer would consult that (unknown) model type.
        with tempfile.TemporaryDirectory(prefix="m3-tokenizer-") as tmp:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    _copy_tokenizer_file(src / name, Path(tmp) / name)
            tok = AutoTokenizer.from_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure becomes one line
        raise ConvertError(f"{src}: cannot load the tokenizer: {describe(exc)}") from exc
    before = len(tok)
    vocab = tok.get_vocab()
    added: dict[str, int] = {}
    for text in (IMAGE_TOKEN, PAD):
        if text not in vocab:
            tok.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
            added[text] = tok.convert_tokens_to_ids(text)
    tok.pad_token = PAD
    tok.padding_side = "left"
    probe = tok("USER: <image>\nhi", add_special_tokens=False).input_ids
    if probe.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) != 1:
        raise ConvertError(f"{src}: the tokenizer does not keep {IMAGE_TOKEN} as one token")
    return tok, before, added


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _copy_tokenizer_file(src: Path, dst: Path) -> None:
    """Copy a tokenizer file; JSON configs lose their ``__type`` keys on the way."""
    if src.suffix != ".json":
        shutil.copyfile(src, dst)
        return
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{src}: unreadable: {describe(exc)}") from exc
    dst.write_text(json.dumps(_without_type_keys(data), ensure_ascii=False), encoding="utf-8")


def _without_type_keys(value):
    if isinstance(value, dict):
        return {k: _without_type_keys(v) for k, v in value.items() if k != "__type"}
    if isinstance(value, list):
        return [_without_type_keys(v) for v in value]
    return value


def is_sentencepiece(tokenizer) -> bool:
    """Whether the tokenizer puts SentencePiece's dummy prefix in front of a text (LLaMA / Vicuna ones do)."""
    from m3cli.families import HFTokenizerAdapter, PieceEncoder

    return PieceEncoder(HFTokenizerAdapter(tokenizer)).has_dummy_prefix


def llava_processor(tokenizer, vision_config, strategy: str, spec, chat_template: str | None):
    """A stock processor that keeps the original recipe: ``LlavaProcessor`` with ``LlavaImageProcessor``
    (``do_pad`` for ``image_aspect_ratio: pad``), or for anyres ``LlavaNextProcessor`` with
    ``LlavaNextImageProcessor`` and the pinpoints, the tower's settings as detection read them, and
    ``chat_template``."""
    from m3cli.families.converted import image_processor_config

    side = vision_config.image_size
    if spec.image.size != side:
        raise ConvertError(f"the image processor makes {spec.image.size}x{spec.image.size} images but the tower "
                           f"expects {side}x{side}")
    settings = {k: v for k, v in image_processor_config(spec).items() if k != "image_processor_type"}
    if spec.preprocess == "anyres":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        processor_cls, image_processor = LlavaNextProcessor, LlavaNextImageProcessorPil(**settings)
    else:
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        processor_cls, image_processor = LlavaProcessor, LlavaImageProcessorPil(**settings)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )
