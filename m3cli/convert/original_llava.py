"""Convert an original-LLaVA checkpoint (``LlavaLlamaForCausalLM``) to the Hugging Face layout.

M3's released checkpoints (``mucai/llava-v1.5-7b-m3``, ``mucai/llava-next-vicuna-7b-m3``) are
stored the way haotian-liu/LLaVA saves them: ``model_type: llava_llama``, the projector as
``model.mm_projector.{0,2}``, the Llama weights at ``model.*`` and the CLIP tower either inside
the checkpoint (``model.vision_tower.vision_tower.vision_model.*``) or only named by
``mm_vision_tower``. This module rewrites such a directory as a stock
``LlavaForConditionalGeneration`` + ``LlavaProcessor`` directory that ``TorchBackend`` loads.

Weights are streamed one source shard at a time into a model built on the meta device, so
peak memory is about one copy of the model (never the source and the output together).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from m3cli.convert.errors import ConvertError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# Source key prefixes (original LLaVA layout).
_SRC_TOWER = "model.vision_tower.vision_tower."
_SRC_PROJECTOR = "model.mm_projector."
_SRC_PROJECTOR_KEYS = tuple(f"{_SRC_PROJECTOR}{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}

# Llama fields of a llava_llama config that carry over into the HF text config.
_TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias", "pretraining_tp", "bos_token_id", "eos_token_id",
)

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The public towers LLaVA uses, so a checkpoint that carries its tower converts without
# a copy of the CLIP repository. Checked against the weight shapes before use.
_CLIP_PRESETS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")

# Image-processor settings read from a CLIP ``preprocessor_config.json``.
_IMAGE_PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                           "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")




def convert_original_to_hf(
    src: str | Path,
    out: str | Path,
    dtype: str = "auto",
    vision_tower: str | Path | None = None,
) -> Path:
    """Convert the original-LLaVA directory ``src`` into a HF LLaVA directory ``out``.

    ``vision_tower`` is a local CLIP directory (``config.json``, optionally weights and
    ``preprocessor_config.json``), needed when the checkpoint does not carry its tower and
    ``mm_vision_tower`` is not a local path. Tower weights inside the checkpoint take
    precedence over the directory's. ``dtype`` is ``auto`` (keep the checkpoint's) or
    float32 / float16 / bfloat16. ``out`` must not exist or be empty; it is written to a
    temporary sibling first and appears only when complete. Returns ``out``.
    """
    import torch

    src = Path(src).expanduser()
    out = Path(out).expanduser()
    if dtype not in ("auto", *_DTYPES):
        raise ConvertError(f"unknown dtype {dtype!r} (use auto, float32, float16 or bfloat16)")
    cfg = _read_source_config(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"output {out} already exists and is not empty")
    if out.resolve() == src.resolve():
        raise ConvertError("output directory must differ from the source directory")

    weights = _WeightFiles(src, what="checkpoint")
    names = weights.keys()
    missing = [k for k in _SRC_PROJECTOR_KEYS if k not in names]
    if missing:
        raise ConvertError(f"{src}: projector weights missing ({', '.join(missing)}); not an mlp2x_gelu LLaVA")
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        if key not in names:
            raise ConvertError(f"{src}: language-model weight {key} missing")

    tower_dir = _tower_dir(cfg, src, vision_tower)
    tower_in_ckpt = any(k.startswith(_SRC_TOWER) for k in names)
    tower_files = None
    if not tower_in_ckpt:
        if tower_dir is None:
            raise ConvertError(
                f"{src}: the checkpoint has no vision-tower weights and {cfg.get('mm_vision_tower')!r} is not "
                "a local directory; pass the CLIP tower directory (vision_tower=DIR / --vision-tower DIR)"
            )
        tower_files = _WeightFiles(tower_dir, what="vision tower", allow_empty=True)
        if not any(_tower_rest(k) is not None for k in tower_files.keys()):
            raise ConvertError(f"{tower_dir}: no CLIP vision weights found (vision_model.*)")

    vision_config = _vision_config(cfg, tower_dir, weights if tower_in_ckpt else tower_files)
    tokenizer, tok_before, added = _prepare_tokenizer(src)

    src_rows, hidden = weights.shape("model.embed_tokens.weight")
    if tok_before > src_rows:
        raise ConvertError(f"{src}: tokenizer has {tok_before} tokens but the embeddings only {src_rows} rows")
    vocab = max(src_rows, len(tokenizer))
    new_rows = sorted({*range(src_rows, vocab), *(i for i in added.values() if i < src_rows)})

    proj_shape = weights.shape(f"{_SRC_PROJECTOR}0.weight")
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
    config = _llava_config(cfg, vision_config, tokenizer, vocab, tie, strategy,
                           grid * grid + (strategy == "full"), target_dtype)

    from transformers import GenerationConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapper = _KeyMapper(expected)
    resize_keys = {mapper.lm_prefix + "embed_tokens.weight", mapper.lm_head}

    # Plan every key before reading any data, so a bad checkpoint fails in seconds.
    plan = {k: mapper.checkpoint_key(k) for k in names}
    unknown = [k for k, t in plan.items() if t is None and not _droppable(k)]
    if unknown:
        raise ConvertError(
            f"{src}: unexpected weight {unknown[0]} ({len(unknown)} in all); not a LLaVA-Llama checkpoint?"
        )
    planned = {t for t in plan.values() if t is not None}
    if tower_files is not None:
        planned |= {t for k in tower_files.keys() if _tower_rest(k) and (t := mapper.tower_key(_tower_rest(k)))}
    if tie:
        planned.add(mapper.lm_head)
    absent = [k for k in expected if k not in planned]
    if absent:
        raise ConvertError(f"{src}: {len(absent)} weights missing, e.g. {absent[0]}")
    notes: list[str] = []
    if "model.image_newline" in names:
        notes.append("LLaVA-NeXT `image_newline` dropped: this is a plain LLaVA (one base image, no anyres tiles).")
    filled: set[str] = set()

    def load(batch: dict) -> None:
        result = model.load_state_dict(batch, strict=False, assign=True)
        if result.unexpected_keys:  # the mapper only produces expected keys; a guard all the same
            raise ConvertError(f"internal: unexpected keys {result.unexpected_keys[:3]}")
        filled.update(batch)

    def convert(key: str, tensor, target: str):
        if target in resize_keys:
            return _resize_rows(tensor, vocab, new_rows, target_dtype)
        if tuple(tensor.shape) != expected[target]:
            raise ConvertError(f"weight {key} has shape {tuple(tensor.shape)}, expected {expected[target]}")
        return tensor.to(target_dtype)

    for path, tensors in weights.iter_files(select=lambda k: plan[k] is not None):
        log.info("converting %s", path.name)
        batch = {}
        for key, tensor in tensors:
            target = plan[key]
            batch[target] = convert(key, tensor, target)
        load(batch)
        del batch
    if tower_files is not None:
        for path, tensors in tower_files.iter_files(select=lambda k: _tower_rest(k) is not None):
            log.info("converting vision tower %s", path.name)
            batch = {}
            for key, tensor in tensors:
                target = mapper.tower_key(_tower_rest(key))
                if target is None:
                    continue
                batch[target] = convert(key, tensor, target)
            load(batch)
            del batch

    if tie:
        model.tie_weights()
        filled.add(mapper.lm_head)
    absent = [k for k in expected if k not in filled]
    if absent:  # guarded by the plan above
        raise ConvertError(f"{src}: {len(absent)} weights missing after conversion, e.g. {absent[0]}")

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = _processor(tokenizer, vision_config, strategy, tower_dir, src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="5GB")
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(_readme(src, cfg, tower_in_ckpt, tower_dir, added, src_rows, vocab,
                                               vision_config, strategy, notes))
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


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
        raise ConvertError(f"{path}: unreadable config: {_first_line(exc)}") from exc
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: config is not a JSON object")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "llava" or "LlavaForConditionalGeneration" in archs:
        raise ConvertError(f"{src}: already a Hugging Face LLaVA (model_type llava); load it directly")
    if model_type != "llava_llama" and "LlavaLlamaForCausalLM" not in archs:
        raise ConvertError(f"{src}: not an original LLaVA-Llama checkpoint (model_type {model_type!r})")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConvertError(f"{src}: projector type {cfg['mm_projector_type']!r} unsupported (only mlp2x_gelu)")
    if cfg.get("mm_use_im_start_end"):
        raise ConvertError(f"{src}: mm_use_im_start_end checkpoints are not supported")
    if "mm_vision_select_layer" not in cfg:
        raise ConvertError(f"{src}: config lacks mm_vision_select_layer")
    return cfg


def _llava_config(cfg, vision_config, tokenizer, vocab, tie, strategy, seq_len, dtype):
    from transformers import LlamaConfig, LlavaConfig

    text_kwargs = {k: cfg[k] for k in _TEXT_FIELDS if cfg.get(k) is not None}
    text = LlamaConfig(
        **text_kwargs,
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
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
    import torch

    if requested == "auto":
        return source
    return getattr(torch, _DTYPES[requested])


# -- vision tower ------------------------------------------------------------------------


def _tower_dir(cfg: dict, src: Path, given) -> Path | None:
    """The local CLIP directory: the argument, else ``mm_vision_tower`` if it is a local dir."""
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
    return None


def _tower_rest(key: str) -> str | None:
    """A CLIP checkpoint key's part inside the vision model, or None for non-vision keys."""
    if key.startswith("vision_model."):
        return key
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return key  # a CLIPVisionModel saved by transformers 5 (no vision_model prefix)
    return None


def _vision_config(cfg: dict, tower_dir: Path | None, weights: _WeightFiles):
    """CLIPVisionConfig from the tower directory or a known preset, checked against the weights."""
    from transformers import CLIPVisionConfig

    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if tower_dir is not None:
        try:
            data = json.loads((tower_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{tower_dir}/config.json: unreadable: {_first_line(exc)}") from exc
        if "vision_config" in data:
            data = data["vision_config"] or {}
        elif data.get("model_type") not in (None, "clip_vision_model"):
            raise ConvertError(f"{tower_dir}: not a CLIP vision tower (model_type {data.get('model_type')!r})")
        data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "model_type")}
        vc = CLIPVisionConfig(**data)
        origin = str(tower_dir)
    elif name in _CLIP_PRESETS:
        vc = CLIPVisionConfig(**_CLIP_PRESETS[name])
        origin = name
    else:
        raise ConvertError(
            f"cannot tell the vision tower's config ({name!r} is not a local directory); "
            "pass the CLIP tower directory (vision_tower=DIR / --vision-tower DIR)"
        )

    keys = weights.keys()

    def find(suffix: str) -> str:
        hits = [k for k in keys if k.endswith(suffix) and (k.startswith(_SRC_TOWER) or _tower_rest(k))]
        if not hits:
            raise ConvertError(f"vision tower weight *{suffix} missing")
        return hits[0]

    patch = weights.shape(find("embeddings.patch_embedding.weight"))
    positions = weights.shape(find("embeddings.position_embedding.weight"))[0]
    fc1 = weights.shape(find("layers.0.mlp.fc1.weight"))[0]
    layers = {int(m.group(1)) for k in keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))
              and (k.startswith(_SRC_TOWER) or _tower_rest(k))}
    found = dict(hidden_size=patch[0], patch_size=patch[-1], intermediate_size=fc1,
                 num_positions=positions, num_hidden_layers=len(layers))
    want = dict(hidden_size=vc.hidden_size, patch_size=vc.patch_size, intermediate_size=vc.intermediate_size,
                num_positions=(vc.image_size // vc.patch_size) ** 2 + 1, num_hidden_layers=vc.num_hidden_layers)
    bad = [f"{k} {found[k]} vs {want[k]}" for k in want if found[k] != want[k]]
    if bad:
        raise ConvertError(f"vision tower weights do not match the config from {origin}: {', '.join(bad)}")
    return vc


# -- tokenizer and processor -------------------------------------------------------------


def _prepare_tokenizer(src: Path):
    """The source tokenizer with ``<image>`` (and ``<pad>`` if missing) added; (tok, len before, added)."""
    from transformers import AddedToken, AutoTokenizer

    from m3cli.build import CHAT_TEMPLATE

    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ConvertError(f"{src}: no tokenizer files (tokenizer.model or tokenizer.json)")
    try:
        # Load from a copy of just the tokenizer files: next to a llava_llama config.json,
        # AutoTokenizer would consult that (unknown) model type.
        with tempfile.TemporaryDirectory(prefix="m3-tokenizer-") as tmp:
            for name in _TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, Path(tmp) / name)
            tok = AutoTokenizer.from_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure becomes one line
        hint = " (a sentencepiece tokenizer.model needs the sentencepiece package)" \
            if (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file() else ""
        raise ConvertError(f"{src}: cannot load the tokenizer: {_first_line(exc)}{hint}") from exc
    before = len(tok)
    vocab = tok.get_vocab()
    added: dict[str, int] = {}
    for text in (IMAGE_TOKEN, PAD_TOKEN):
        if text not in vocab:
            tok.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
            added[text] = tok.convert_tokens_to_ids(text)
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    probe = tok("USER: <image>\nhi", add_special_tokens=False).input_ids
    if probe.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) != 1:
        raise ConvertError(f"{src}: the tokenizer does not keep {IMAGE_TOKEN} as one token")
    return tok, before, added


def _processor(tokenizer, vision_config, strategy: str, tower_dir: Path | None, src: Path):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from m3cli.build import CHAT_TEMPLATE

    side = vision_config.image_size
    settings = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                    do_center_crop=True, resample=3, image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD)
    for folder in (tower_dir, src):
        path = folder / "preprocessor_config.json" if folder is not None else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConvertError(f"{path}: unreadable: {_first_line(exc)}") from exc
            settings.update({k: data[k] for k in _IMAGE_PROCESSOR_FIELDS if k in data})
            break
    if isinstance(settings["size"], int):
        settings["size"] = {"shortest_edge": settings["size"]}
    if isinstance(settings["crop_size"], int):
        settings["crop_size"] = {"height": settings["crop_size"], "width": settings["crop_size"]}
    crop = settings["crop_size"]
    if settings.get("do_center_crop", True) and (crop.get("height"), crop.get("width")) != (side, side):
        raise ConvertError(f"image processor crops to {crop} but the tower expects {side}x{side}")
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**settings),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def _readme(src, cfg, tower_in_ckpt, tower_dir, added, src_rows, vocab, vc, strategy, notes) -> str:
    tower = "from the checkpoint" if tower_in_ckpt else f"from {tower_dir}"
    added_text = ", ".join(f"{t} (id {i})" for t, i in added.items()) or "none"
    lines = [
        "# Converted LLaVA checkpoint",
        "",
        f"Converted by `m3 convert --to hf` from `{src}` (original LLaVA layout, "
        f"`{(cfg.get('architectures') or ['LlavaLlamaForCausalLM'])[0]}`) to `LlavaForConditionalGeneration`.",
        "",
        f"- Vision tower `{cfg.get('mm_vision_tower')}` ({tower}): {vc.image_size}px, patch {vc.patch_size}, "
        f"feature layer {cfg.get('mm_vision_select_layer')}, strategy `{strategy}`.",
        f"- Tokens added: {added_text}; embeddings resized {src_rows} -> {vocab} rows (new rows = mean of the old).",
        "- Chat template: LLaVA-1.5 `USER: <image>\\n{question} ASSISTANT:` (vicuna_v1 without its system line).",
        f"- image_aspect_ratio: {cfg.get('image_aspect_ratio', 'square')}"
        + (" — the original pads each image to a square (background = the processor's mean colour) before "
           "CLIP preprocessing; this processor does not pad (the media loader does, if at all)."
           if cfg.get("image_aspect_ratio") == "pad" else ""),
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# -- weights -----------------------------------------------------------------------------


class _KeyMapper:
    """Original-LLaVA key -> this transformers version's LlavaForConditionalGeneration key."""

    def __init__(self, expected: dict):
        self.expected = expected

        def prefix_of(suffix: str, must: str = "") -> str:
            hits = [k for k in expected if k.endswith(suffix) and must in k]
            if len(hits) != 1:
                raise ConvertError(f"internal: cannot locate {suffix} in LlavaForConditionalGeneration")
            return hits[0][: -len(suffix)]

        self.lm_prefix = prefix_of("embed_tokens.weight")
        self.proj_prefix = prefix_of("linear_1.weight", "multi_modal_projector")
        self.tower_prefix = prefix_of("embeddings.patch_embedding.weight")
        self.lm_head = prefix_of("lm_head.weight") + "lm_head.weight"

    def checkpoint_key(self, key: str) -> str | None:
        if key.startswith(_SRC_PROJECTOR):
            rest = key[len(_SRC_PROJECTOR):]
            index, _, param = rest.partition(".")
            linear = {"0": "linear_1", "2": "linear_2"}.get(index)
            return self._known(f"{self.proj_prefix}{linear}.{param}") if linear else None
        if key.startswith(_SRC_TOWER):
            return self.tower_key(key[len(_SRC_TOWER):])
        if key == "lm_head.weight":
            return self.lm_head
        if key.startswith("model."):
            return self._known(self.lm_prefix + key[len("model."):])
        return None

    def tower_key(self, rest: str) -> str | None:
        rest = rest.removeprefix("vision_model.")
        for candidate in (self.tower_prefix + rest, self.tower_prefix + "vision_model." + rest):
            if candidate in self.expected:
                return candidate
        return None

    def _known(self, key: str) -> str | None:
        return key if key in self.expected else None


def _droppable(key: str) -> bool:
    """Source keys with no HF counterpart that are safe to leave behind."""
    return (key.endswith(("rotary_emb.inv_freq", "position_ids"))
            or key == "model.image_newline")


def _resize_rows(tensor, rows: int, new_rows: list[int], dtype):
    """Embedding / LM-head matrix with ``rows`` rows; ``new_rows`` set to the mean of the old rows."""
    import torch

    old = tensor.shape[0]
    mean = tensor.float().mean(dim=0).to(dtype)
    out = torch.empty((rows, tensor.shape[1]), dtype=dtype)
    out[:old] = tensor.to(dtype)
    for i in new_rows:
        out[i] = mean
    return out


class _WeightFiles:
    """The weight files of a checkpoint directory: safetensors preferred, else pytorch .bin shards."""

    def __init__(self, folder: Path, what: str, allow_empty: bool = False):
        self.folder = folder
        self.kind, self.files, self._keys = self._discover(folder)
        if not self.files and not allow_empty:
            raise ConvertError(f"{folder}: no {what} weights (*.safetensors or pytorch_model*.bin)")
        self._bin_cache: tuple[Path, dict] | None = None

    @staticmethod
    def _discover(folder: Path):
        for kind, index_name, pattern in (("safetensors", "model.safetensors.index.json", "*.safetensors"),
                                          ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")):
            index = folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ConvertError(f"{index}: unreadable index: {_first_line(exc)}") from exc
                files = sorted({folder / f for f in weight_map.values()})
                lost = [f.name for f in files if not f.is_file()]
                if lost:
                    raise ConvertError(f"{folder}: shard {lost[0]} listed in {index_name} is missing")
                return kind, files, {k: folder / f for k, f in weight_map.items()}
            files = sorted(folder.glob(pattern))
            if files:
                return kind, files, None
        return None, [], {}

    def keys(self) -> dict:
        """Every tensor name -> its file (reads safetensors headers; maps unindexed .bin files)."""
        if self._keys is None:
            keys = {}
            for path in self.files:
                for key in self._names(path):
                    keys[key] = path
            self._keys = keys
        return self._keys

    def _names(self, path: Path) -> list[str]:
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as f:
                    return list(f.keys())
            except Exception as exc:  # noqa: BLE001
                raise ConvertError(f"{path}: unreadable safetensors file: {_first_line(exc)}") from exc
        return list(self._load_bin(path))

    def _meta(self, key: str):
        path = self.keys()[key]
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                piece = f.get_slice(key)
                return tuple(piece.get_shape()), piece.get_dtype()
        tensor = self._load_bin(path)[key]
        return tuple(tensor.shape), tensor.dtype

    def shape(self, key: str) -> tuple:
        return self._meta(key)[0]

    def dtype(self, key: str):
        import torch

        found = self._meta(key)[1]
        if isinstance(found, torch.dtype):
            return found
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        if found not in names:
            raise ConvertError(f"{key}: unsupported source dtype {found}")
        return names[found]

    def _load_bin(self, path: Path) -> dict:
        """A .bin shard, memory-mapped where the format allows (one kept at a time)."""
        import torch

        if self._bin_cache is not None and self._bin_cache[0] == path:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(f"{path}: unreadable weights file: {_first_line(exc)}") from exc
        if not isinstance(data, dict):
            raise ConvertError(f"{path}: not a state dict")
        self._bin_cache = (path, data)
        return data

    def iter_files(self, select: Callable[[str], bool] | None = None) -> Iterator[tuple[Path, Iterator]]:
        """(file, iterator of (key, tensor)) per file; tensors own their memory."""
        keys = self.keys()
        for path in self.files:
            wanted = [k for k, p in keys.items() if p == path and (select is None or select(k))]
            if not wanted:
                continue
            yield path, self._tensors(path, wanted)
            self._bin_cache = None

    def _tensors(self, path: Path, wanted: list[str]):
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                for key in wanted:
                    yield key, f.get_tensor(key)
        else:
            data = self._load_bin(path)
            for key in wanted:
                yield key, data[key].clone()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
