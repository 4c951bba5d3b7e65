"""Where a converted original checkpoint keeps its recipe, so that detection finds the original one again.

``m3 convert --to hf`` (and the one-step cache conversion) turns an original-layout checkpoint into an HF
``LlavaForConditionalGeneration`` directory. Three things in it carry the original recipe:

1. ``config.json`` gets an ``m3cli`` block (transformers keeps unknown config keys, also through
   ``save_pretrained``, and warns about none)::

       "m3cli": {"format": 1, "family": "llava15", "source_layout": "original", "source": "<name or path>",
                 "image_aspect_ratio": "pad", "prompt_recipe": "vicuna_v1"}

   A LLaVA-NeXT conversion says ``"family": "llavanext"``, ``"image_aspect_ratio": "anyres"`` and
   ``"anyres_flavour": "original"``: the original code's ``int()`` unpadding, which detection keeps.

   Detection reads it first: ``image_aspect_ratio`` "pad" gives the ``pad`` preprocessing, ``prompt_recipe``
   the recipe (with its original per-piece tokenisation), whatever the other files say.
2. ``processor_config.json``'s nested ``image_processor`` (or ``preprocessor_config.json``) is a
   ``LlavaImageProcessor`` with ``do_pad: true`` (:func:`image_processor_config`): transformers' own
   ``LlavaImageProcessor`` then pads to a square with ``tuple(int(x * 255) for x in image_mean)``, centred,
   exactly as the original ``expand2square``, so plain transformers users get the original preprocessing.
3. ``chat_template.jinja`` is :func:`vicuna_v1_template`: the ``vicuna_v1`` prompt in jinja (system line,
   ``USER: ``, images, text, ``ASSISTANT:``; multi-turn with ``</s>`` after assistant turns, as separator
   style TWO). For a SentencePiece tokenizer it writes ``<image> \\n`` (a space before the newline): transformers
   puts no ``▁`` after a special token, the original per-piece tokenisation does, and that space is how jinja
   gives plain transformers users the original ids (``▁``, ``<0x0A>``). With a byte-level BPE tokenizer it
   writes ``<image>\\n``. m3 itself recognises both texts (:func:`recipe_of_template`) and uses the recipe.

m3's GGUF writer records the recipe as the ``m3cli.prompt_recipe`` metadata key
(:data:`m3cli.families.prompts.GGUF_RECIPE_KEY`); a GGUF made by llama.cpp's converter from a converted
directory carries the template of (3), which maps back to ``vicuna_v1`` too.
"""

from __future__ import annotations

from typing import Any

from m3cli.errors import ModelError
from m3cli.families.spec import FamilySpec

M3CLI_KEY = "m3cli"
FORMAT = 1

_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.")

_VICUNA_V1 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set system = '" + _SYSTEM.replace("'", "\\'") + "' %}{% set turns = messages %}{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>@NL@' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vicuna_v1_template(*, spm: bool = True) -> str:
    """The ``vicuna_v1`` conversation as a chat template (``spm``: the tokenizer is SentencePiece)."""
    return _VICUNA_V1.replace("@NL@", " \\n" if spm else "\\n")


def recipe_of_template(template: str) -> str | None:
    """The recipe name when ``template`` is one m3 wrote (None: a template of the model's own)."""
    text = template.strip()
    if text in (vicuna_v1_template(spm=True), vicuna_v1_template(spm=False)):
        return "vicuna_v1"
    return None


def m3cli_block(spec: FamilySpec, source: str) -> dict[str, Any]:
    """The ``config.json`` block that a converted directory of the original ``spec`` carries."""
    if spec.layout != "original":
        raise ModelError(f"{spec.model_dir.name}: only original-layout checkpoints are converted with a recipe")
    block = {"format": FORMAT, "family": spec.family, "source_layout": "original", "source": source,
             "image_aspect_ratio": spec.preprocess, "prompt_recipe": spec.prompt_recipe}
    if spec.preprocess == "anyres":
        # the original code unpads with int(), transformers with round(): detection keeps the original's
        block["anyres_flavour"] = spec.anyres_flavour or "original"
    return block


def read_m3cli_block(cfg: dict) -> dict[str, Any] | None:
    """The ``m3cli`` block of a ``config.json`` dict (None when absent); unknown formats are refused."""
    block = cfg.get(M3CLI_KEY)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ModelError(f"config.json: {M3CLI_KEY} is not an object")
    fmt = block.get("format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ModelError(f"config.json: {M3CLI_KEY} format {fmt!r} is newer than this m3 (knows {FORMAT})")
    aspect = block.get("image_aspect_ratio")
    if aspect is not None and aspect not in ("pad", "crop", "anyres"):
        raise ModelError(f"config.json: {M3CLI_KEY}.image_aspect_ratio {aspect!r} is not pad, crop or anyres")
    flavour = block.get("anyres_flavour")
    if flavour is not None and flavour not in ("hf", "original"):
        raise ModelError(f"config.json: {M3CLI_KEY}.anyres_flavour {flavour!r} is not hf or original")
    return block


def image_processor_config(spec: FamilySpec) -> dict[str, Any]:
    """The image processor settings a converted directory stores: transformers' ``LlavaImageProcessor`` for
    LLaVA-1.5, ``LlavaNextImageProcessor`` with the pinpoints as ``[height, width]`` for LLaVA-NeXT."""
    img = spec.image
    anyres = spec.preprocess == "anyres"
    config: dict[str, Any] = {
        "image_processor_type": "LlavaNextImageProcessor" if anyres else "LlavaImageProcessor",
        "do_pad": anyres or spec.preprocess == "pad",
        "do_resize": True,
        "size": {"shortest_edge": img.size if anyres else (img.shortest_edge or img.size)},
        "resample": img.resample,
        "do_center_crop": True,
        "crop_size": {"height": img.size, "width": img.size},
        "do_rescale": img.do_rescale,
        "rescale_factor": img.rescale_factor,
        "do_normalize": img.do_normalize,
        "image_mean": list(img.mean),
        "image_std": list(img.std),
        "do_convert_rgb": True,
    }
    if anyres:
        config["image_grid_pinpoints"] = [list(p) for p in spec.grid_pinpoints]  # detection made them (h, w)
    return config
