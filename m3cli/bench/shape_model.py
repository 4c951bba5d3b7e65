"""A shape made in memory with random weights, run by the project's own torch backend.

The modules are created on the ``meta`` device (no memory, no init), then every parameter is materialised
with a cheap fixed-seed fill (a ~1M-value random block copied in at a per-tensor offset; a ``normal_`` init
of 7B values takes minutes on 2 cores). The fill is keyed by parameter name, so :class:`ShapeWeights`
regenerates any tensor on its own: the GGUF bench writes the very same weights without holding the torch
model. Answers from random weights are meaningless; only the arithmetic is real, and timing needs nothing
else.

The result is a stock ``LlavaForConditionalGeneration`` plus a ``LlavaProcessor`` whose byte-level BPE
tokenizer (``m3cli.models.build``) is padded to the real vocabulary size, run by the project's own
:class:`~m3cli.backends.torch.TorchBackend` (see :func:`shape_backend`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from m3cli.bench.shapes import Shape, meta_model, pick_shape_dtype
from m3cli.errors import ModelError

# CLIP ViT-L/14-336's image normalisation (the processor of every LLaVA-1.5)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5's evaluation prompt (conv_vicuna_v1): ~35 tokens of system line before the image
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")

FILL_BLOCK = 1_000_003  # prime: rows of any width start at distinct offsets, so no two logits rows tie
FILL_STD = 0.02
FILL_SEED = 0


# ---------------------------------------------------------------------------------------------
# tokenizer and processor
# ---------------------------------------------------------------------------------------------
def shape_chat_template() -> str:
    """LLaVA-1.5's vicuna_v1 conversation in the messages format: system line, image, question."""
    from m3cli.models.build import CHAT_TEMPLATE

    return '{{ "' + VICUNA_V1_SYSTEM + ' " }}' + CHAT_TEMPLATE


def shape_words() -> list[str]:
    """Words the tokenizer keeps whole: the system line, the bench question and the scene questions."""
    from m3cli.bench.scenes import BENCH_QUESTION

    text = f"{VICUNA_V1_SYSTEM} USER ASSISTANT {BENCH_QUESTION} how many shapes are there which colour letter " \
           "written yes no red green blue yellow circle square triangle"
    return [w.strip(".,?:'") for w in text.split() if w.strip(".,?:'")]


def build_shape_tokenizer(vocab: int):
    """``m3cli.models.build``'s byte-level BPE tokenizer, its vocabulary padded to ``vocab`` entries.

    The padding entries are plain vocabulary rows (never produced by a merge), so ``len(tokenizer)``, the
    embedding, the LM head and the GGUF vocabulary all have the real size, as in LLaVA-1.5 (32064).
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from m3cli.models.build import BOS, EOS, IMAGE_TOKEN, PAD, build_tokenizer

    base = build_tokenizer(shape_words())
    spec = json.loads(base.backend_tokenizer.to_str())
    table = spec["model"]["vocab"]
    if len(table) > vocab:
        raise ModelError(f"the bench tokenizer has {len(table)} tokens, more than the shape's vocabulary {vocab}")
    for i in range(len(table), vocab):
        table[f"<unused{i}>"] = i
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS,
                                   eos_token=EOS, pad_token=PAD, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = shape_chat_template()
    if len(fast) != vocab:
        raise ModelError(f"padded bench tokenizer has {len(fast)} tokens, expected {vocab}")
    return fast


def build_shape_processor(shape: Shape, tokenizer):
    """A stock ``LlavaProcessor`` (CLIP-336 preprocessing, vicuna_v1 template) for the shape; for a NeXT shape a
    ``LlavaNextProcessor`` with the shape's pinpoints (as llava-hf's 1.6 repositories have)."""
    from m3cli.models.build import ModelSpec, build_processor

    if shape.next_:
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size},
            image_grid_pinpoints=[list(p) for p in shape.pinpoints], image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch_size,
                                  vision_feature_select_strategy="default", chat_template=shape_chat_template(),
                                  num_additional_image_tokens=1)
    spec = ModelSpec(image_size=shape.image_size, patch_size=shape.patch_size, image_mean=CLIP_MEAN,
                     image_std=CLIP_STD)
    processor = build_processor(spec, tokenizer)
    processor.chat_template = shape_chat_template()
    return processor


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def _fill_block(dtype, device):
    """The fixed random block every weight is cut from (N(0, 0.02), fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(FILL_SEED)
    return (torch.randn(FILL_BLOCK, generator=gen) * FILL_STD).to(device=device, dtype=dtype)


def fill_kind(name: str, norm_params: set[str]) -> str:
    """How a parameter is filled: ``ones`` (norm weights), ``zeros`` (biases) or ``random``."""
    if name in norm_params:
        return "ones" if name.endswith("weight") else "zeros"
    return "zeros" if name.endswith("bias") else "random"


def fill_(tensor, name: str, kind: str, block) -> None:
    """Fill ``tensor`` in place: constant, or the block copied in from a per-name offset (wrapping)."""
    if kind == "ones":
        tensor.fill_(1.0)
        return
    if kind == "zeros":
        tensor.zero_()
        return
    flat = tensor.view(-1)
    n, size = flat.numel(), block.numel()
    pos, src = 0, zlib.crc32(name.encode()) % size
    while pos < n:
        k = min(n - pos, size - src)
        flat[pos : pos + k].copy_(block[src : src + k])
        pos, src = pos + k, 0


def norm_param_names(model) -> set[str]:
    """Names of the parameters that belong to LayerNorm / RMSNorm modules."""
    out = set()
    for mod_name, module in model.named_modules():
        if "Norm" in type(module).__name__:
            out.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False))
    return out


class ShapeWeights:
    """The shape's weights by parameter name, one freshly filled tensor at a time.

    ``tensor(name)`` equals the parameter :func:`build_shape_model` makes for the same name (up to the
    dtype's rounding): the GGUF bench writes the same weights from here without holding the whole model.
    """

    def __init__(self, shape: Shape, dtype=None, device: str = "cpu"):
        import torch

        self.dtype = torch.float32 if dtype is None else dtype
        self.device = device
        model = meta_model(shape)
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.norms = norm_param_names(model)
        self.block = _fill_block(self.dtype, device)

    def fill(self, name: str, tensor) -> None:
        """Fill ``tensor`` (of parameter ``name``'s shape) with that parameter's values."""
        fill_(tensor, name, fill_kind(name, self.norms), self.block)

    def tensor(self, name: str):
        """A new tensor holding parameter ``name``."""
        import torch

        out = torch.empty(self.shapes[name], dtype=self.dtype, device=self.device)
        self.fill(name, out)
        return out


def build_shape_model(shape: Shape, tokenizer, dtype, device: str = "cpu"):
    """The shape as a ready ``LlavaForConditionalGeneration`` (eval mode) on ``device`` in ``dtype``.

    Built on ``meta``, moved to empty storage, its non-persistent buffers (rotary frequencies, position
    ids) initialised by transformers' own ``_init_weights``, then every parameter filled (see module doc).
    """
    import torch

    model = meta_model(shape, tokenizer)
    weights = ShapeWeights(shape, dtype, device)
    model.to_empty(device=device)
    with torch.no_grad():
        _init_buffers(model)
        for name, param in list(model.named_parameters()):
            owner, _, attr = name.rpartition(".")
            fresh = torch.empty(param.shape, dtype=dtype, device=device)
            weights.fill(name, fresh)
            model.get_submodule(owner)._parameters[attr] = torch.nn.Parameter(fresh, requires_grad=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.dtype = dtype
    model.eval()
    return model


def _init_buffers(model) -> None:
    """Initialise the non-persistent buffers (position ids, rotary frequencies) that ``to_empty`` left as
    garbage, each by the ``_init_weights`` of its innermost pretrained model (CLIP's knows its position ids,
    Llava's does not). Only buffer-owning modules are touched: a few small embeddings, no big matmul."""
    from transformers import PreTrainedModel

    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    owners.sort(key=lambda item: -item[0].count(".") - bool(item[0]))  # innermost first
    done: set[int] = set()
    for _, owner in owners:
        for module in owner.modules():
            if id(module) not in done and any(True for _ in module.buffers(recurse=False)):
                owner._init_weights(module)
                done.add(id(module))


@dataclass
class BuiltShape:
    """A shape made in memory: the untouched stock model and its processor."""

    shape: Shape
    model: object
    processor: object
    dtype: object
    device: str

    @property
    def model_id(self) -> str:
        return self.shape.model_id


def build_shape(shape: Shape, device: str = "cpu", dtype=None) -> BuiltShape:
    """Tokenizer, processor and model of ``shape`` on ``device`` (dtype: :func:`pick_shape_dtype`)."""

    if dtype is None:
        dtype = pick_shape_dtype(device)
    tokenizer = build_shape_tokenizer(shape.vocab)
    processor = build_shape_processor(shape, tokenizer)
    model = build_shape_model(shape, tokenizer, dtype, device)
    return BuiltShape(shape, model, processor, dtype, device)


# ---------------------------------------------------------------------------------------------
# the project's torch backend around a built model
# ---------------------------------------------------------------------------------------------
def save_metadata(built: BuiltShape, directory: str | Path) -> Path:
    """Write the shape's HF directory without weights: config, generation config, processor, tokenizer and
    chat template (what model detection, the family and the processor are read from)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    built.model.config.save_pretrained(out)
    built.model.generation_config.save_pretrained(out)
    built.processor.save_pretrained(out)
    return out


def shape_backend(built: BuiltShape, threads: int | None = None):
    """The project's :class:`TorchBackend` around ``built``, EOS suppressed so every answer has exactly
    ``max_new_tokens`` tokens (random weights: timing only).

    The backend's own constructor runs on a weightless copy of the shape's HF directory (detection, family,
    processor, prompt: all its own); only its weights loader is handed the built model instead of reading
    safetensors. Where that loader is not there to hand over (a later refactor), the weights are saved into
    the directory and loaded the ordinary way (slower: a 7B model writes 14 GB).
    """
    import tempfile

    from m3cli.backends import torch as torch_backend

    tmp = tempfile.TemporaryDirectory(prefix="m3-shape-")
    directory = save_metadata(built, tmp.name)
    dtype = str(built.dtype).replace("torch.", "")
    original = getattr(torch_backend, "_load_weights", None)
    if original is None:
        built.model.save_pretrained(directory)
        backend = torch_backend.TorchBackend(str(directory), device=built.device, dtype=dtype, threads=threads)
    else:
        def prebuilt(*args, **kwargs):  # whatever it is told to load: the model already built on its device
            return built.model.eval()

        torch_backend._load_weights = prebuilt
        try:
            backend = torch_backend.TorchBackend(str(directory), device=built.device, dtype=dtype, threads=threads)
        finally:
            torch_backend._load_weights = original
    backend.model_id = built.model_id
    backend.eos_ids = set()  # never stop early: fixed-length answers for timing
    backend.shape = built.shape
    backend._shape_dir = tmp  # removed with the backend
    return backend
