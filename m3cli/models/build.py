"""Build a fresh, standard Hugging Face LLaVA (random weights) from a small spec.

Used by ``m3 train`` to create the shipped model and by the tests to make tiny models.
Everything is a stock class (``CLIPVisionModel`` tower, ``mlp2x_gelu`` projector, Llama LM,
``LlavaProcessor``) so the result loads anywhere transformers runs and converts to GGUF.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# LLaVA-1.5's conversation shape, written for our messages format. The image placeholder
# comes before the question, as in LLaVA, so the image prefix can be shared across questions.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class ModelSpec:
    """Sizes of a from-scratch LLaVA. Defaults give a 24x24 grid on 48x48 images."""

    image_size: int = 48
    patch_size: int = 2
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 1024
    vision_feature_layer: int = -2
    init_std: float = 0.02
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(words: Iterable[str], extra_text: Iterable[str] = ()):
    """A byte-level BPE tokenizer whose merges make every given word one token.

    Byte-level BPE (the GPT-2 scheme) is what llama.cpp's ``gpt2`` tokenizer model reads,
    so the same tokenizer works in the GGUF backend. Any text still tokenizes (bytes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(words))
    corpus = [" ".join(words), *extra_text, "USER: ASSISTANT: \n ? . , yes no"]
    # Each word standing alone, with and without its leading space, so merges cover both.
    corpus += [w for w in words] + [" " + w for w in words]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 4 * len(words) + 200,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(spec: ModelSpec, tokenizer):
    """A stock ``LlavaProcessor`` for the spec's image size and our chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        image_mean=spec.image_mean,
        image_std=spec.image_std,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(spec: ModelSpec, tokenizer, seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` matching ``spec`` and ``tokenizer``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
        initializer_range=spec.init_std,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=spec.init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=spec.grid * spec.grid,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model


def save_bundle(model, processor, out_dir: str | Path) -> Path:
    """Save model (safetensors), processor, tokenizer and chat template side by side."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_model(out_dir: str | Path, words: Iterable[str], spec: ModelSpec | None = None, seed: int = 0):
    """Build and save a random LLaVA in one call (tests, docs examples); returns the directory."""
    spec = spec or ModelSpec()
    tokenizer = build_tokenizer(words)
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer, seed=seed)
    return save_bundle(model, processor, out_dir)
