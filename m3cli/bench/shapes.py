"""Paper-scale LLaVA shapes for ``m3 bench --shape``: their sizes, dtype, and whether they fit in memory.

A :class:`Shape` names the real architecture (CLIP tower, ``mlp2x_gelu`` projector, Llama LM); its
``LlavaConfig`` and a storage-free ``meta`` model give the exact parameter count, from which a run is
refused in one line before anything is allocated when memory is short. Building the model with random
weights is :mod:`m3cli.bench.shape_model`'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from m3cli.errors import ModelError, UsageError


class ShapeMemoryError(ModelError):
    """The machine has too little free memory for the shape (one line, before anything is allocated)."""


@dataclass(frozen=True)
class Shape:
    """The sizes of a LLaVA: CLIP tower, ``mlp2x_gelu`` projector, Llama LM."""

    name: str
    label: str
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_ff: int = 4096
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 32
    text_ff: int = 11008
    vocab: int = 32064  # 32000 SentencePiece pieces + LLaVA's added tokens, padded to a multiple of 64
    max_positions: int = 4096
    full_text_layers: int | None = None  # set by with_layers(): the depth of the real shape
    # LLaVA-NeXT (anyres): the pinpoints as (height, width); empty for LLaVA-1.5
    pinpoints: tuple[tuple[int, int], ...] = ()

    @property
    def next_(self) -> bool:
        """Whether this is a LLaVA-NeXT shape (anyres crops, a newline per tile row)."""
        return bool(self.pinpoints)

    @property
    def max_visual_rows(self) -> int:
        """The most visual tokens one image gives the LM at 576 per crop (NeXT: base crop, the largest
        pinpoint's tiles kept whole, a newline per row)."""
        n = self.grid * self.grid
        if not self.next_:
            return n
        from m3cli.families.anyres import max_visual_token_count

        return max_visual_token_count(self.pinpoints, self.image_size, n)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def model_id(self) -> str:
        cut = f"@{self.text_layers}of{self.full_text_layers}L" if self.full_text_layers else ""
        return f"shape:{self.name}{cut}"

    def with_layers(self, layers: int | None) -> Shape:
        """The same shape with only ``layers`` LM decoder layers (quick profiling; times scale ~linearly)."""
        if layers is None or layers == self.text_layers:
            return self
        if layers < 1:
            raise UsageError(f"--layers must be >= 1, got {layers}")
        if layers > (self.full_text_layers or self.text_layers):
            raise UsageError(f"--layers {layers}: {self.name} has {self.full_text_layers or self.text_layers} layers")
        return dataclasses.replace(self, text_layers=layers, full_text_layers=self.full_text_layers or self.text_layers)

    def describe(self) -> str:
        """One line: the architecture in words."""
        cut = f" (cut to {self.text_layers} of {self.full_text_layers} layers)" if self.full_text_layers else ""
        anyres = ""
        if self.next_:
            pins = ", ".join(f"{h}x{w}" for h, w in self.pinpoints)
            anyres = f", anyres (pinpoints {pins}; up to {self.max_visual_rows} visual tokens at 576 per crop)"
        return (f"{self.label}: CLIP {self.vision_layers}x{self.vision_hidden} (image {self.image_size}, patch "
                f"{self.patch_size}, {self.grid}x{self.grid} grid) + mlp2x_gelu {self.vision_hidden}->"
                f"{self.text_hidden}->{self.text_hidden} + Llama {self.text_layers}x{self.text_hidden}{cut}, "
                f"FF {self.text_ff}, vocab {self.vocab}{anyres}")


# LLaVA-1.6's pinpoints as transformers reads them (height, width)
V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape("llava-1.5-7b", "LLaVA-1.5-7B"),
    "llava-next-7b": Shape("llava-next-7b", "LLaVA-NeXT-7B (Vicuna)", pinpoints=V16_PINPOINTS),
    "llava-1.5-13b": Shape("llava-1.5-13b", "LLaVA-1.5-13B", text_hidden=5120, text_layers=40, text_heads=40,
                           text_kv_heads=40, text_ff=13824),
}
# the same code path on toy sizes, for the tests (not listed in --help)
HIDDEN_SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", "tiny test shape", image_size=48, patch_size=2, vision_hidden=32, vision_layers=2,
                  vision_heads=2, vision_ff=64, text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=2,
                  text_ff=128, vocab=512, max_positions=1024),
    "tiny-next": Shape("tiny-next", "tiny NeXT test shape", image_size=48, patch_size=2, vision_hidden=32,
                       vision_layers=2, vision_heads=2, vision_ff=64, text_hidden=64, text_layers=2, text_heads=2,
                       text_kv_heads=2, text_ff=128, vocab=512, max_positions=4096,
                       pinpoints=((48, 96), (96, 48), (96, 96), (144, 48), (48, 144))),
}
NOT_YET: dict[str, str] = {}   # shapes named before they can be built (refused with their reason)


def shape_names() -> list[str]:
    """The shapes ``--shape`` lists (hidden test shapes and not-yet shapes excluded)."""
    return sorted(SHAPES)


def resolve_shape(name: str, layers: int | None = None) -> Shape:
    """The named shape (optionally cut to ``layers`` LM layers), or a one-line UsageError."""
    if name in NOT_YET:
        raise UsageError(NOT_YET[name])
    shape = SHAPES.get(name) or HIDDEN_SHAPES.get(name)
    if shape is None:
        raise UsageError(f"unknown --shape {name!r} (one of {', '.join(shape_names())})")
    return shape.with_layers(layers)


# ---------------------------------------------------------------------------------------------
# dtype and memory
# ---------------------------------------------------------------------------------------------
def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            return set(value.split())
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16, AMX-BF16, or Arm's BF16), not by emulation."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_shape_dtype(device: str, requested: str = "auto"):
    """bf16 where the device computes it natively (CUDA with bf16, CPUs with BF16 instructions), else fp32
    on CPU and fp16 on other GPUs; or the requested dtype."""
    import torch

    from m3cli.backends.torch import pick_dtype

    if requested != "auto":
        return pick_dtype(device, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def dtype_reason(device: str, dtype) -> str:
    """Why this dtype, in a few words (printed with every shape run)."""
    import torch

    name = str(dtype).replace("torch.", "")
    if device.startswith("cuda"):
        return f"{name} on CUDA"
    if dtype == torch.bfloat16:
        return f"{name} (the CPU has native BF16 instructions)" if cpu_has_bf16() else f"{name} (as requested)"
    return f"{name} (the CPU has no native BF16)" if not cpu_has_bf16() else f"{name} (as requested)"


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` in bytes, or None where the kernel does not report it."""
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, where they were read) for the device the weights will live on."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "CUDA free memory"
    return meminfo_available(), "MemAvailable"


def param_count(shape: Shape) -> int:
    """Exact parameter count of the shape (summed over a ``meta`` model: no memory, no init)."""
    model = meta_model(shape)
    return sum(p.numel() for p in model.parameters())


def memory_needed(shape: Shape, dtype_bytes: int, batch: int = 1, max_rows: int = 640,
                  n_params: int | None = None) -> int:
    """Bytes a run needs: weights x 1.1 (allocator slack, buffers) + KV cache and prefill working set.

    ``max_rows`` is the longest prompt + answer of one item (the 576-token grid, the text and the new tokens).
    """
    n_params = param_count(shape) if n_params is None else n_params
    head_dim = shape.text_hidden // shape.text_heads
    kv = 2 * shape.text_layers * batch * max_rows * shape.text_kv_heads * head_dim * dtype_bytes
    # one layer's live activations in a prefill: hidden states, q/k/v/o, gate/up/act of the MLP, scores
    work = batch * max_rows * (6 * shape.text_hidden + 3 * shape.text_ff) * dtype_bytes
    scores = batch * shape.text_heads * max_rows * max_rows * 4
    logits = batch * shape.vocab * 4 * 2
    return int(n_params * dtype_bytes * 1.1) + kv + work + scores + logits


def check_memory(shape: Shape, dtype, device: str, batch: int = 1, max_rows: int = 640,
                 n_params: int | None = None, available: tuple[int | None, str] | None = None) -> int:
    """Refuse in one line when the shape will not fit; returns the bytes needed."""
    import torch

    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    need = memory_needed(shape, dtype_bytes, batch, max_rows, n_params)
    free, where = available if available is not None else available_memory(device)
    if free is not None and need > free:
        name = str(dtype).replace("torch.", "")
        raise ShapeMemoryError(
            f"--shape {shape.name} in {name} at batch {batch} needs ~{need / 2**30:.1f} GiB but only "
            f"{free / 2**30:.1f} GiB is free ({where}): use --layers N, a smaller --batch-size, fp32->bf16, "
            "or a bigger machine")
    return need


# ---------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------
def shape_config(shape: Shape, tokenizer=None):
    """The ``LlavaConfig`` of the shape: LLaVA-1.5's (untied LM head, feature layer -2, CLS dropped); a
    ``LlavaNextConfig`` with the pinpoints for a NeXT shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    from m3cli.models.build import IMAGE_TOKEN

    ids = {"bos": 0, "eos": 1, "pad": 2, "image": 3}  # build_tokenizer's special-token order
    if tokenizer is not None:
        ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
               "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    vision = CLIPVisionConfig(image_size=shape.image_size, patch_size=shape.patch_size,
                              hidden_size=shape.vision_hidden, intermediate_size=shape.vision_ff,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_ff,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.max_positions,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=ids["bos"],
                       eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    common = dict(vision_config=vision, text_config=text, image_token_id=ids["image"], projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=shape.grid * shape.grid, tie_word_embeddings=False)
    if shape.next_:
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in shape.pinpoints], **common)
    return LlavaConfig(**common)


def meta_model(shape: Shape, tokenizer=None):
    """The shape's ``LlavaForConditionalGeneration`` (NeXT: ``LlavaNextForConditionalGeneration``) on the meta
    device: every tensor a shape, no storage."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if shape.next_ else LlavaForConditionalGeneration
    with torch.device("meta"):
        return cls(shape_config(shape, tokenizer))
