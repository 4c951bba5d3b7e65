"""What a model directory's JSON files say, read without loading weights: the image processor settings, the
LLaVA-NeXT pinpoints, the chat template and the tokenizer's behaviour after special tokens.

Shared by :mod:`m3cli.families.detect` (llava-hf layouts) and :mod:`m3cli.families.original_layout`
(haotian-liu/LLaVA checkpoints and their CLIP towers). Every unreadable file is a one-line ``ModelError``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from m3cli.errors import ModelError, describe
from m3cli.families.spec import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec


def image_processor_config(root: Path, proc_cfg: dict) -> dict | None:
    """The image processor's settings, in transformers 5's order: nested in processor_config, then the file."""
    nested = proc_cfg.get("image_processor")
    if isinstance(nested, dict):
        return nested
    return read_json(root / "preprocessor_config.json", missing_ok=True)


def image_spec(name: str, image_cfg: dict, vision_cfg: dict, *, square_input: bool = False) -> ImageSpec:
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
    mean = triple(image_cfg.get("image_mean"), OPENAI_CLIP_MEAN)
    std = triple(image_cfg.get("image_std"), OPENAI_CLIP_STD)
    patch = vision_cfg.get("patch_size")
    return ImageSpec(
        size=side, mean=mean, std=std, shortest_edge=shortest,
        resample=int(image_cfg.get("resample", 3)),
        do_rescale=bool(image_cfg.get("do_rescale", True)),
        rescale_factor=float(image_cfg.get("rescale_factor", 1 / 255)),
        do_normalize=bool(image_cfg.get("do_normalize", True)),
        patch_size=int(patch) if patch else None,
    )


def triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # type: ignore[return-value]
    a, b, c = (float(x) for x in value)
    return (a, b, c)


def legacy_spm(tok_cfg: dict) -> bool:
    # transformers' Llama tokenizer with legacy=true prefixes "▁" to text after every special token (its
    # Metaspace prepend_scheme "always"); the default legacy=false does so only at the start ("first")
    cls = str(tok_cfg.get("tokenizer_class") or "")
    return bool(tok_cfg.get("legacy")) and cls.startswith(("LlamaTokenizer", "CodeLlamaTokenizer"))


def prefix_after_special(root: Path, tok_cfg: dict) -> bool:
    """Whether transformers' tokenizer of ``root`` puts SentencePiece's "▁" in front of text after a special token.

    transformers 5 runs a ``tokenizer.json`` pipeline as it is written, so that file decides: a ``Prepend("▁")``
    normaliser (the form transformers 4.3x wrote, e.g. in the llava-hf repositories) or a Metaspace
    pre-tokenizer with ``prepend_scheme: always`` prefixes every text segment, also the one after ``<image>``;
    ``prepend_scheme: first`` only the first. Without a ``tokenizer.json`` the slow tokenizer is converted
    with the ``legacy`` flag of ``tokenizer_config.json``.
    """
    path = root / "tokenizer.json"
    if not path.is_file():
        return legacy_spm(tok_cfg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return legacy_spm(tok_cfg)  # the tokenizer load reports a broken file; detection stays on the config
    if not isinstance(data, dict):
        return False
    for node in pipeline_nodes(data.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in pipeline_nodes(data.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.14 wrote add_prefix_space instead
                return bool(node.get("add_prefix_space", True))
            return scheme == "always"
    return False


def pipeline_nodes(node: Any) -> list[dict]:
    """A tokenizer.json normaliser / pre-tokenizer and the members of its Sequence, flattened."""
    if not isinstance(node, dict):
        return []
    members = node.get("normalizers") or node.get("pretokenizers")
    if node.get("type") == "Sequence" and isinstance(members, list):
        return [n for m in members for n in pipeline_nodes(m)]
    return [node]


def find_chat_template(root: str | Path, proc_cfg: dict | None = None) -> str | None:
    """The model directory's chat template text, or None.

    The processor's own sources first, in transformers 5's order (``processor_config.json``'s key, then
    ``chat_template.json``, then ``chat_template.jinja``), then ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which "default" is taken).
    """
    root = Path(root)
    if proc_cfg is None:
        proc_cfg = read_json(root / "processor_config.json", missing_ok=True) or {}
    found = template_value(proc_cfg.get("chat_template"))
    if found:
        return found
    legacy = read_json(root / "chat_template.json", missing_ok=True)
    if legacy:
        found = template_value(legacy.get("chat_template"))
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
    tok_cfg = read_json(root / "tokenizer_config.json", missing_ok=True) or {}
    return template_value(tok_cfg.get("chat_template"))


def template_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, dict):
        return template_value(value.get("default"))
    if isinstance(value, list):
        named = {str(t.get("name")): t.get("template") for t in value if isinstance(t, dict)}
        return template_value(named.get("default"))
    return None


def grid_pinpoints(name: str, raw: Any, *, order: str) -> tuple[tuple[int, int], ...]:
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


def read_json(path: Path, *, missing_ok: bool = False) -> dict | None:
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
