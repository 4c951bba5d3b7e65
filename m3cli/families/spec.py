"""What detection learns about a model directory: the family, its layout, preprocessing and prompt recipe.

Plain data, no I/O: :mod:`m3cli.families.detect` fills it from JSON files; the backends, the converter
and the families read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from m3cli.errors import ModelError, UsageError

Layout = Literal["hf", "original", "gguf"]
PreprocessMode = Literal["pad", "crop", "anyres"]

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (image_utils.py), the settings of every CLIP tower LLaVA uses
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3     # PIL.Image.Resampling.BICUBIC, CLIP's "resample": 3

LLAVA15_HF = "llava15-hf"
LLAVA15_ORIGINAL = "llava15-original"
LLAVANEXT_HF = "llavanext-hf"
LLAVANEXT_ORIGINAL = "llavanext-original"

# What `m3` runs today; every refusal names it. A family module that lands extends it.
SUPPORTED = ("LLaVA-1.5: llava-hf LlavaForConditionalGeneration directories, original llava_llama checkpoints "
             "(image_aspect_ratio pad) and their m3 conversions; LLaVA-NeXT (anyres): llava-hf "
             "LlavaNextForConditionalGeneration directories, original checkpoints (image_aspect_ratio anyres, "
             "spatial_unpad) and their m3 conversions")


class UnsupportedModelError(ModelError):
    """The model's files say it is not a family m3 runs (one line naming what is supported)."""


class TemplateError(ModelError):
    """A chat template cannot be used: missing, not valid jinja, or not placing exactly one image."""


class QuestionError(UsageError):
    """A question that cannot be put into a prompt (it contains the image placeholder itself)."""


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the square bitmap the vision tower sees, and how that is normalised.

    ``shortest_edge`` is CLIP's resize target for the short side (the long side follows with transformers'
    ``int()`` arithmetic); ``None`` resizes straight to ``size`` x ``size``. The centre crop is always
    ``size`` x ``size``, the tower's input resolution.
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    shortest_edge: int | None = None
    resample: int = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    patch_size: int | None = None

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The original LLaVA's padding colour: ``tuple(int(x * 255) for x in image_mean)``."""
        r, g, b = (int(x * 255) for x in self.mean)
        return (r, g, b)

    @property
    def grid_side(self) -> int | None:
        """Patches per side of the tower's grid (24 for CLIP-L/14 at 336), when the patch size is known."""
        return self.size // self.patch_size if self.patch_size else None


@dataclass(frozen=True)
class OriginalSource:
    """What converting an original-layout (haotian-liu/LLaVA) checkpoint needs, read from its config.json."""

    architecture: str                    # LlavaLlamaForCausalLM, LlavaMistralForCausalLM
    model_type: str                      # llava_llama (older releases: llava), llava_mistral
    vision_tower: str                    # mm_vision_tower as written (hub id or path)
    vision_tower_dir: Path | None        # a local directory for it, when one was given or found
    select_layer: int                    # mm_vision_select_layer (-2: hidden_states[-2])
    select_feature: str                  # mm_vision_select_feature ("patch": drop CLS)
    projector_type: str                  # mm_projector_type ("mlp2x_gelu")
    mm_hidden_size: int | None
    patch_merge_type: str                # mm_patch_merge_type ("flat"; NeXT: "spatial_unpad")
    image_aspect_ratio: str              # "pad", "anyres", "square"/"" (crop)
    tokenizer_files: tuple[str, ...]     # tokenizer.model / tokenizer.json present in the checkpoint
    weight_files: tuple[str, ...]        # safetensors / bin shards or their index
    tower_in_checkpoint: bool | None     # the weight index lists model.vision_tower.* (None: no index to tell)


@dataclass(frozen=True)
class FamilySpec:
    """One model directory as detection sees it, before any weights load."""

    name: str                            # llava15-hf, llava15-original, llavanext-hf, llavanext-original,
                                         # llava15-gguf, llavanext-gguf
    family: str                          # llava15, llavanext
    layout: Layout
    preprocess: PreprocessMode
    image: ImageSpec
    prompt_recipe: str                   # vicuna_v1, mistral_instruct, chatml_direct, hf_template
    model_dir: Path
    architecture: str
    chat_template: str | None = None     # the model's own template (used by the hf_template recipe)
    image_token: str = "<image>"
    image_token_id: int | None = None    # config.json image_token_index (HF layouts)
    prefix_after_special: bool = False   # the HF tokenizer is "legacy": text after a special token gets a "▁"
    converted: bool = False              # an HF directory written by m3 convert from an original checkpoint
    source: OriginalSource | None = None  # original layouts: what the converter needs
    # LLaVA-NeXT: the pinpoints as (height, width) and whose arithmetic they follow ("hf" or "original")
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    anyres_flavour: str | None = None
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    notes: tuple[str, ...] = field(default=())

    @property
    def needs_conversion(self) -> bool:
        """Original layouts are converted (once, into the cache) before a backend loads them."""
        return self.layout == "original"

    def describe(self) -> str:
        """One line for logs and ``m3 models``: family, layout, preprocessing and recipe."""
        bits = [self.name, f"preprocess={self.preprocess}", f"prompt={self.prompt_recipe}"]
        if self.converted:
            bits.append("converted from the original layout")
        return " ".join(bits)
