"""The model-family layer: detection from files, shared preprocessing, prompt recipes and their tokenisation.

No weights: model directories are JSON files written here; tokenizers are trained here (a SentencePiece BPE
model with the sentencepiece library, a byte-level BPE with the tokenizers library).
"""

from __future__ import annotations

import ctypes
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3cli.errors import ModelError, UsageError
from m3cli.families import (
    SUPPORTED,
    HFTokenizerAdapter,
    PieceEncoder,
    QuestionError,
    TemplateError,
    UnsupportedModelError,
    chat_template_option,
    detect_family,
    family_for,
    gguf_family_spec,
    open_family,
    pixel_array,
    recipe_for_template,
    recipe_from_gguf,
    recipe_named,
    render_chat_template,
    tower_image,
)
from m3cli.families.converted import (
    image_processor_config,
    m3cli_block,
    recipe_of_template,
    vicuna_v1_template,
)
from m3cli.families.preprocess import expand_to_square, resize_size
from m3cli.families.spec import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "m3-shapes"

# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json), the official text with {% generation %}
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

QUESTIONS = [
    "What colours are there?",
    "How many circles are in the picture?\nAnswer the question using a single word or phrase.",
    "  leading spaces and trailing ones  ",
    "Is it 2024 or 1999? Count: 1234567.",
    "Qué colór tiene el círculo? naïve café",
    "tabs\tand\nnewlines\n\nand two  spaces",
    "x",
]


# -- tokenizers ------------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    rng = random.Random(0)
    words = ("a chat between curious user and an artificial intelligence assistant the gives helpful detailed "
             "polite answers to questions what colour colours is are there shape red blue green circle circles "
             "square how many picture answer question using single word or phrase image USER ASSISTANT INST "
             "yes no one two three").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(3000)]
    lines += [VICUNA_SYSTEM + " USER: What colours are there? ASSISTANT: Red and blue."] * 40
    lines += ["[INST] What is this? [/INST] A circle.", "Answer the question using a single word or phrase."] * 40
    return lines


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A LLaMA-like SentencePiece BPE model: byte fallback, dummy prefix, whitespace kept, ids 0/1/2 = unk/s//s."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return root / "tokenizer.model"


@pytest.fixture(scope="session")
def sp(spm_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


def _hf_spm_dir(root: Path, spm_model: Path, *, legacy: bool) -> Path:
    """A llava-hf style tokenizer: the SentencePiece model with <image> and <pad> added, saved and reloaded."""
    from transformers import AddedToken, AutoTokenizer

    src = root / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(spm_model.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy}))
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    out = root / "tok"
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def hf_spm(tmp_path_factory, spm_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_hf_spm_dir(tmp_path_factory.mktemp("hfspm"), spm_model,
                                                         legacy=False)))


@pytest.fixture(scope="session")
def hf_spm_legacy(tmp_path_factory, spm_model):
    from transformers import AutoTokenizer

    path = _hf_spm_dir(tmp_path_factory.mktemp("hfspm-legacy"), spm_model, legacy=True)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["legacy"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.legacy is True
    return tok


@pytest.fixture(scope="session")
def bpe_json(tmp_path_factory) -> str:
    """A byte-level BPE (tokenizers library) with <s> </s> <pad> <image> at ids 0..3 and BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 0)])
    return tok.to_str()


@pytest.fixture(scope="session")
def hf_bpe(bpe_json):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_json), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", extra_special_tokens=["<image>"])


def original_ids(sp, prompt: str, image_id: int) -> list[int]:
    """haotian-liu/LLaVA's tokenizer_image_token with a SentencePiece tokenizer, written from its description:
    split at <image>, each chunk encoded alone (dummy prefix, BOS), BOS kept once, the image index between."""
    chunks = [[sp.bos_id()] + sp.encode(chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_id)
        ids += chunk[1:]
    return ids


# -- model directories --------------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, object]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return root


CLIP_336 = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_processor_type": "CLIPImageProcessor", "image_std": list(OPENAI_CLIP_STD), "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": 336}}

HF_LLAVA_CONFIG = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                   "image_token_index": 32000, "vision_feature_layer": -2,
                   "vision_feature_select_strategy": "default",
                   "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
                   "text_config": {"model_type": "llama", "vocab_size": 32064}}

ORIGINAL_CONFIG = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                   "image_aspect_ratio": "pad", "mm_hidden_size": 1024, "mm_patch_merge_type": "flat",
                   "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
                   "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                   "mm_vision_tower": "openai/clip-vit-large-patch14-336", "hidden_size": 4096, "vocab_size": 32000}


def llava_hf_dir(root: Path, **extra: object) -> Path:
    files: dict[str, object] = {"config.json": HF_LLAVA_CONFIG, "preprocessor_config.json": CLIP_336,
                                "chat_template.json": {"chat_template": LLAVA_HF_TEMPLATE},
                                "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "legacy": False}}
    files.update(extra)
    return _write(root, {k: v for k, v in files.items() if v is not None})


def original_dir(root: Path, **overrides: object) -> Path:
    cfg = {**ORIGINAL_CONFIG, **overrides}
    return _write(root, {"config.json": {k: v for k, v in cfg.items() if v is not None},
                         "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer"},
                         "tokenizer.model": "stub", "model-00001-of-00002.safetensors": "",
                         "model.safetensors.index.json": {"weight_map": {
                             "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                             "model.mm_projector.0.weight": "model-00001-of-00002.safetensors"}}})


# -- detection -------------------------------------------------------------------------------------------
def test_shipped_model_is_llava15_hf_crop_with_its_template():
    spec = detect_family(SHIPPED)
    assert (spec.name, spec.family, spec.layout, spec.preprocess) == ("llava15-hf", "llava15", "hf", "crop")
    assert spec.prompt_recipe == "hf_template" and "ASSISTANT:" in spec.chat_template
    assert (spec.image.size, spec.image.shortest_edge, spec.image.mean, spec.image.patch_size) == (
        48, 48, (0.5, 0.5, 0.5), 2)
    assert spec.image.grid_side == 24 and spec.image_token_id == 3 and not spec.converted


def test_llava_hf_15_directory(tmp_path):
    spec = detect_family(llava_hf_dir(tmp_path / "llava-1.5-7b-hf"))
    assert (spec.name, spec.preprocess, spec.prompt_recipe) == ("llava15-hf", "crop", "hf_template")
    assert "{% generation %}" in spec.chat_template
    assert spec.image == ImageSpec(size=336, shortest_edge=336, patch_size=14)
    assert spec.image.pad_color == (122, 116, 104)
    assert spec.image_token_id == 32000 and spec.image_token == "<image>" and not spec.prefix_after_special
    assert family_for(spec).recipe.name == "hf_template"


@pytest.mark.parametrize("where", ["jinja", "tokenizer_config", "processor_config"])
def test_chat_template_sources(tmp_path, where):
    other = "{{ 'OTHER' }}<image>"
    files: dict[str, object] = {"chat_template.json": None}
    if where == "jinja":
        files["chat_template.jinja"] = LLAVA_HF_TEMPLATE
    elif where == "tokenizer_config":
        files["tokenizer_config.json"] = {"tokenizer_class": "LlamaTokenizer",
                                          "chat_template": [{"name": "default", "template": LLAVA_HF_TEMPLATE}]}
    else:  # the processor's own key wins over the files
        files["processor_config.json"] = {"chat_template": LLAVA_HF_TEMPLATE, "image_processor": CLIP_336}
        files["chat_template.jinja"] = other
    spec = detect_family(llava_hf_dir(tmp_path / "m", **files))
    assert spec.chat_template == LLAVA_HF_TEMPLATE


def test_nested_image_processor_wins_over_preprocessor_config(tmp_path):
    nested = {**CLIP_336, "image_mean": [0.5, 0.5, 0.5]}
    spec = detect_family(llava_hf_dir(tmp_path / "m", **{"processor_config.json": {"image_processor": nested}}))
    assert spec.image.mean == (0.5, 0.5, 0.5)


def test_original_layout_pad_vicuna(tmp_path):
    spec = detect_family(original_dir(tmp_path / "llava-v1.5-7b-m3"))
    assert (spec.name, spec.layout, spec.preprocess, spec.prompt_recipe) == (
        "llava15-original", "original", "pad", "vicuna_v1")
    assert spec.needs_conversion and spec.image.size == 336 and spec.image.mean == OPENAI_CLIP_MEAN
    src = spec.source
    assert (src.vision_tower, src.vision_tower_dir, src.select_layer, src.select_feature, src.projector_type) == (
        "openai/clip-vit-large-patch14-336", None, -2, "patch", "mlp2x_gelu")
    assert src.tokenizer_files == ("tokenizer.model",) and src.tower_in_checkpoint is False
    assert "model.safetensors.index.json" in src.weight_files
    assert family_for(spec).recipe.name == "vicuna_v1"


def test_original_layout_with_local_tower_and_old_model_type(tmp_path):
    tower = _write(tmp_path / "tiny-clip", {
        "config.json": {"model_type": "clip", "vision_config": {"image_size": 48, "patch_size": 2}},
        "preprocessor_config.json": {**CLIP_336, "crop_size": {"height": 48, "width": 48},
                                     "size": {"shortest_edge": 48}, "image_mean": [0.25, 0.5, 0.75]}})
    root = original_dir(tmp_path / "orig", model_type="llava", mm_vision_tower=str(tower))
    spec = detect_family(root)
    assert spec.name == "llava15-original" and spec.source.vision_tower_dir == tower
    assert (spec.image.size, spec.image.mean, spec.image.pad_color) == (48, (0.25, 0.5, 0.75), (63, 127, 191))
    # --vision-tower overrides, and an unknown tower with no directory is refused with the flag named
    assert detect_family(original_dir(tmp_path / "o2", mm_vision_tower="me/odd-tower"),
                         vision_tower=tower).image.size == 48
    with pytest.raises(ModelError, match="--vision-tower"):
        detect_family(original_dir(tmp_path / "o3", mm_vision_tower="me/odd-tower"))


def test_original_square_aspect_is_crop_and_tower_in_index(tmp_path):
    root = original_dir(tmp_path / "o", image_aspect_ratio=None)
    index = {"weight_map": {"model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": "a"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = detect_family(root)
    assert spec.preprocess == "crop" and spec.source.tower_in_checkpoint is True


def test_original_next_is_detected_and_flagged(tmp_path):
    root = original_dir(tmp_path / "llava-next-vicuna-7b-m3", image_aspect_ratio="anyres",
                        mm_patch_merge_type="spatial_unpad",
                        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    spec = detect_family(root)
    assert (spec.name, spec.family, spec.preprocess, spec.anyres_flavour) == (
        "llavanext-original", "llavanext", "anyres", "original")
    assert spec.grid_pinpoints[:2] == ((672, 336), (336, 672))  # stored [w, h], kept as (h, w)
    assert type(family_for(spec)).__name__ == "LlavaNextFamily"  # its family is supported


def test_original_mistral_and_chatml_recipes(tmp_path):
    mistral = original_dir(tmp_path / "m", architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral",
                           image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                           image_grid_pinpoints="[(336, 672), (672, 336)]")
    assert detect_family(mistral).prompt_recipe == "mistral_instruct"
    yi = original_dir(tmp_path / "y")
    (yi / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"6": {"content": "<|im_start|>"}, "7": {"content": "<|im_end|>"}}}))
    assert detect_family(yi).prompt_recipe == "chatml_direct"


def test_hf_next_directory(tmp_path):
    next_proc = {**CLIP_336, "image_processor_type": "LlavaNextImageProcessor",
                 "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}
    cfg = {**HF_LLAVA_CONFIG, "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next"}
    spec = detect_family(llava_hf_dir(tmp_path / "next", **{"config.json": cfg,
                                                            "preprocessor_config.json": next_proc}))
    assert (spec.name, spec.preprocess, spec.prompt_recipe, spec.anyres_flavour) == (
        "llavanext-hf", "anyres", "hf_template", "hf")
    assert spec.grid_pinpoints[3] == (1008, 336)
    assert type(family_for(spec)).__name__ == "LlavaNextFamily"  # its family is supported


def test_converted_directory_keeps_the_original_recipe(tmp_path):
    original = detect_family(original_dir(tmp_path / "orig"))
    proc = {"image_processor": image_processor_config(original), "image_token": "<image>",
            "processor_class": "LlavaProcessor"}
    cfg = {**HF_LLAVA_CONFIG, "m3cli": m3cli_block(original, "mucai/llava-v1.5-7b-m3")}
    root = llava_hf_dir(tmp_path / "converted", **{"config.json": cfg, "processor_config.json": proc,
                                                   "chat_template.json": None,
                                                   "chat_template.jinja": vicuna_v1_template()})
    spec = detect_family(root)
    assert (spec.name, spec.preprocess, spec.prompt_recipe, spec.converted) == ("llava15-hf", "pad", "vicuna_v1",
                                                                                 True)
    assert spec.image == original.image and family_for(spec).recipe.name == "vicuna_v1"
    # without the block, the LlavaImageProcessor's do_pad alone still means pad (plain transformers pads too)
    cfg.pop("m3cli")
    (root / "config.json").write_text(json.dumps(cfg))
    spec = detect_family(root)
    assert (spec.preprocess, spec.prompt_recipe, spec.converted) == ("pad", "vicuna_v1", False)
    assert recipe_of_template(spec.chat_template) == "vicuna_v1"


def test_newer_m3cli_block_is_refused(tmp_path):
    cfg = {**HF_LLAVA_CONFIG, "m3cli": {"format": 99}}
    with pytest.raises(ModelError, match="newer"):
        detect_family(llava_hf_dir(tmp_path / "m", **{"config.json": cfg}))


REFUSALS = {
    "qwen2-vl": ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
                  "vision_config": {}}, "Qwen2-VL"),
    "onevision-hf": ({"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
                      "vision_config": {}}, "LLaVA-OneVision"),
    "onevision-original": ({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
                            "mm_vision_tower": "google/siglip-so400m-patch14-384",
                            "image_aspect_ratio": "anyres_max_9"}, "LLaVA-OneVision"),
    "paligemma": ({"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
                   "vision_config": {}}, "vision-language model other than LLaVA"),
    "llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "a text-only model"),
    "bert": ({"architectures": ["BertModel"], "model_type": "bert"}, "not a LLaVA model"),
    "mpt-original": ({"architectures": ["LlavaMptForCausalLM"], "model_type": "llava_mpt",
                      "mm_vision_tower": "x"}, "original-layout LlavaMptForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_what_is_supported(tmp_path, case):
    cfg, what = REFUSALS[case]
    root = _write(tmp_path / case, {"config.json": cfg})
    with pytest.raises(UnsupportedModelError) as err:
        detect_family(root)
    msg = str(err.value)
    assert what in msg and SUPPORTED in msg and "\n" not in msg
    assert isinstance(err.value, ModelError) and err.value.exit_code == 2


def test_refusals_without_config_or_template(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json") as err:
        detect_family(_write(tmp_path / "empty", {"README.md": "hi"}))
    assert SUPPORTED in str(err.value)
    with pytest.raises(ModelError, match="not a model directory"):
        detect_family(tmp_path / "missing")
    bare = llava_hf_dir(tmp_path / "bare", **{"chat_template.json": None})
    with pytest.raises(TemplateError, match="no chat template") as err:
        detect_family(bare)
    assert "\n" not in str(err.value) and isinstance(err.value, ModelError)
    assert detect_family(bare, fallback_recipe="vicuna_v1").prompt_recipe == "vicuna_v1"
    with pytest.raises(ModelError, match="unknown prompt recipe"):
        detect_family(bare, fallback_recipe="alpaca")


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="mm_use_im_start_end"):
        detect_family(original_dir(tmp_path / "a", mm_use_im_start_end=True))
    with pytest.raises(UnsupportedModelError, match="mm_patch_merge_type flat"):
        detect_family(original_dir(tmp_path / "b", image_aspect_ratio="anyres"))
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 336, "width": 336}}
    with pytest.raises(ModelError, match="SiglipImageProcessor"):
        detect_family(llava_hf_dir(tmp_path / "c", **{"preprocessor_config.json": siglip}))
    wrong = {**CLIP_336, "crop_size": {"height": 224, "width": 224}}
    with pytest.raises(ModelError, match="expects 336x336"):
        detect_family(llava_hf_dir(tmp_path / "d", **{"preprocessor_config.json": wrong}))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        detect_family(tmp_path / "e")


# -- preprocessing ---------------------------------------------------------------------------------------
SIZES = [(1, 1), (300, 480), (480, 300), (1008, 336), (336, 1008), (17, 1000), (1000, 17), (336, 336),
         (335, 337), (641, 479), (5, 7), (2, 1)]


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _processor(cls_name: str, size: int, **kw):
    if cls_name == "clip":
        from transformers.models.clip import CLIPImageProcessorPil as cls
    else:
        from transformers.models.llava import LlavaImageProcessorPil as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
               image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), **kw)


def test_resize_truncates_like_transformers():
    assert resize_size(300, 480, 336) == (336, 537)  # 537.6: int(), not round() (538)
    assert resize_size(480, 300, 336) == (537, 336)
    assert resize_size(17, 1000, 336) == (336, 19764)


@pytest.mark.parametrize("w,h", SIZES)
def test_crop_equals_clip_image_processor(w, h):
    spec = ImageSpec(size=336, shortest_edge=336)
    image = _noise(w, h, seed=w * 7 + h)
    ours = tower_image(image, spec, "crop")
    assert ours.size == (336, 336) and ours.mode == "RGB"
    raw = _processor("clip", 336, do_rescale=False, do_normalize=False)(image, return_tensors="np")
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), raw["pixel_values"][0].astype(np.uint8))
    full = _processor("clip", 336)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(pixel_array(ours, spec), full)  # bit-for-bit after rescale + normalise


@pytest.mark.parametrize("w,h", SIZES)
def test_pad_equals_llava_image_processor_and_original(w, h):
    spec = ImageSpec(size=336, shortest_edge=336)
    image = _noise(w, h, seed=w + 3 * h)
    ours = tower_image(image, spec, "pad")
    raw = _processor("llava", 336, do_pad=True, do_rescale=False, do_normalize=False)(image, return_tensors="np")
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), raw["pixel_values"][0].astype(np.uint8))
    # the original: expand2square (written here from its description), then CLIP's processor
    side = max(w, h)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = ((w - h) // 2, 0) if w > h else (0, (h - w) // 2)
    canvas[top:top + h, left:left + w] = np.asarray(image)
    ref = _processor("clip", 336, do_rescale=False, do_normalize=False)(Image.fromarray(canvas),
                                                                        return_tensors="np")
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), ref["pixel_values"][0].astype(np.uint8))


def test_pad_keeps_a_wide_photo_whole():
    """A 1008x336 photo, outer thirds red and blue: padded it keeps both colours, cropped it loses them."""
    arr = np.full((336, 1008, 3), 128, dtype=np.uint8)
    arr[:, :336] = (255, 0, 0)
    arr[:, 672:] = (0, 0, 255)
    image = Image.fromarray(arr)
    spec = ImageSpec(size=336, shortest_edge=336)
    padded = np.asarray(tower_image(image, spec, "pad")).astype(int)
    assert tuple(padded[5, 168]) == (122, 116, 104) and tuple(padded[-5, 168]) == (122, 116, 104)
    assert tuple(padded[168, 20]) == (255, 0, 0) and tuple(padded[168, -20]) == (0, 0, 255)
    cropped = np.asarray(tower_image(image, spec, "crop")).astype(int)
    assert (cropped == 128).all()


def test_expand_to_square_offsets_and_small_tower():
    image = Image.new("RGB", (5, 2), (255, 255, 255))
    out = np.asarray(expand_to_square(image, (1, 2, 3)))
    assert out.shape == (5, 5, 3)
    assert (out[1:3] == 255).all() and (out[0] == (1, 2, 3)).all() and (out[3:] == (1, 2, 3)).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (2, 5), (255, 255, 255)), (0, 0, 0)))
    assert (tall[:, 1:3] == 255).all() and (tall[:, 0] == 0).all()
    spec = detect_family(SHIPPED)
    crop = family_for(spec).crops(_noise(300, 480, 1))
    assert len(crop) == 1 and crop[0].size == (48, 48)
    with pytest.raises(ValueError, match="RGB"):
        tower_image(Image.new("L", (4, 4)), spec)


def test_crop_smaller_than_the_crop_size_pads_like_transformers():
    spec = ImageSpec(size=48, shortest_edge=40)
    image = _noise(50, 41, seed=3)
    ours = tower_image(image, spec, "crop")
    from transformers.models.clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 48, "width": 48},
                                 do_rescale=False, do_normalize=False)
    ref = proc(image, return_tensors="np")["pixel_values"][0].astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), ref)


# -- prompt recipes: SentencePiece ---------------------------------------------------------------------------
@pytest.mark.parametrize("question", QUESTIONS)
def test_vicuna_v1_equals_the_original_per_piece_tokenisation(hf_spm, sp, question):
    tok = HFTokenizerAdapter(hf_spm)
    image_id = hf_spm.convert_tokens_to_ids("<image>")
    parts = recipe_named("vicuna_v1").parts(question, tok)
    prompt = f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    assert recipe_named("vicuna_v1").text(question) == prompt
    assert parts.ids(1) == original_ids(sp, prompt, image_id)
    # the piece after the image starts with SentencePiece's dummy prefix, then the newline byte
    assert parts.after[:2] == [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]
    assert parts.before[0] == sp.bos_id() and parts.before.count(sp.bos_id()) == 1
    ids = parts.ids(9)
    assert ids.count(image_id) == 9 and ids[len(parts.before):len(parts.before) + 9] == [image_id] * 9


def test_special_token_text_in_a_question_is_the_token(hf_spm):
    """As transformers (and the original code, through transformers' tokenizer) do: "</s>" is EOS, not text."""
    parts = recipe_named("vicuna_v1").parts("a </s> b", HFTokenizerAdapter(hf_spm))
    assert parts.after.count(hf_spm.eos_token_id) == 1


def test_whole_string_hf_tokenisation_drops_the_prefix(hf_spm, sp):
    """Why the recipe exists: transformers tokenises the rendered prompt without the ▁ after <image>."""
    prompt = f"{VICUNA_SYSTEM} USER: <image>\nWhat colours are there? ASSISTANT:"
    image_id = hf_spm.convert_tokens_to_ids("<image>")
    whole = hf_spm(prompt).input_ids
    at = whole.index(image_id)
    assert whole[at + 1] == sp.piece_to_id("<0x0A>")
    assert whole != original_ids(sp, prompt, image_id)


@pytest.mark.parametrize("name,text", [
    ("mistral_instruct", "[INST] <image>\n{q} [/INST]"),
    ("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n{q}"
                      "<|im_end|><|im_start|>assistant\n"),
])
def test_other_conversations(hf_spm, sp, name, text):
    recipe = recipe_named(name)
    q = "What is it?"
    assert recipe.text(q) == text.format(q=q)
    parts = recipe.parts(q, HFTokenizerAdapter(hf_spm))
    if name == "mistral_instruct":
        assert parts.ids(1) == original_ids(sp, text.format(q=q), hf_spm.convert_tokens_to_ids("<image>"))


@pytest.mark.parametrize("question", QUESTIONS)
def test_hf_template_equals_the_processor_tokenisation(hf_spm, hf_spm_legacy, question):
    recipe = recipe_for_template(LLAVA_HF_TEMPLATE)
    assert recipe.name == "hf_template"
    text = recipe.text(question)
    assert text == f"USER: <image>\n{question} ASSISTANT:"
    for tok, legacy in ((hf_spm, False), (hf_spm_legacy, True)):
        adapter = HFTokenizerAdapter(tok)
        parts = recipe_named("hf_template", template=LLAVA_HF_TEMPLATE, prefix_after_special=legacy).parts(
            question, adapter)
        assert parts.ids(1) == adapter.processor_ids(text)


def test_hf_template_through_the_real_processor(hf_spm):
    """transformers' own LlavaProcessor.apply_chat_template gives the recipe's ids (with its 256 image tokens)."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=hf_spm, patch_size=14,
                          num_additional_image_tokens=1, vision_feature_select_strategy="default",
                          chat_template=LLAVA_HF_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == recipe_for_template(LLAVA_HF_TEMPLATE).text("What is it?")
    ids = proc(text=text, images=Image.new("RGB", (224, 224)), return_tensors="np")["input_ids"][0].tolist()
    parts = recipe_for_template(LLAVA_HF_TEMPLATE).parts("What is it?", HFTokenizerAdapter(hf_spm))
    n = ids.count(parts.image_token_id)
    assert n == 256 and ids == parts.ids(n)


def test_bos_in_template_is_not_doubled(hf_spm):
    template = "{{ bos_token }}" + LLAVA_HF_TEMPLATE
    adapter = HFTokenizerAdapter(hf_spm)
    parts = recipe_for_template(template).parts("Hi there", adapter)
    text = recipe_for_template(template).text("Hi there", bos_token="<s>")
    assert parts.ids(1) == adapter.processor_ids(text) and parts.before.count(hf_spm.bos_token_id) == 1


def test_converted_template_gives_plain_transformers_the_original_ids(hf_spm, sp):
    template = vicuna_v1_template(spm=True)
    adapter = HFTokenizerAdapter(hf_spm)
    image_id = hf_spm.convert_tokens_to_ids("<image>")
    for question in QUESTIONS:
        text = render_chat_template(template, question)
        prompt = f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"
        assert text == prompt.replace("<image>\n", "<image> \n")
        assert adapter.processor_ids(text) == original_ids(sp, prompt, image_id)
    assert recipe_for_template(template).name == "vicuna_v1"
    assert render_chat_template(vicuna_v1_template(spm=False), "Q").endswith("USER: <image>\nQ ASSISTANT:")


def test_converted_template_multi_turn_is_separator_style_two():
    from m3cli.families.templates import _compiled

    def turn(role, text, image=False):
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return {"role": role, "content": content}

    messages = [turn("user", "Q1", image=True), turn("assistant", "A1"), turn("user", "Q2")]
    out = _compiled(vicuna_v1_template(spm=False)).render(messages=messages, add_generation_prompt=True)
    # conv_vicuna_v1.get_prompt(): system, " ", "USER: " + m + " ", "ASSISTANT: " + m + "</s>", ..., "ASSISTANT:"
    assert out == f"{VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    system = [{"role": "system", "content": "Be brief."}, turn("user", "Q", image=True)]
    out = _compiled(vicuna_v1_template(spm=False)).render(messages=system, add_generation_prompt=True)
    assert out == "Be brief. USER: <image>\nQ ASSISTANT:"


def test_legacy_tokenizer_flag_is_read(tmp_path):
    root = llava_hf_dir(tmp_path / "m", **{"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizerFast",
                                                                     "legacy": True}})
    spec = detect_family(root)
    assert spec.prefix_after_special and family_for(spec).recipe.prefix_after_special


# -- prompt recipes: byte-level BPE ---------------------------------------------------------------------------
@pytest.mark.parametrize("question", QUESTIONS)
def test_bpe_recipes(hf_bpe, question):
    adapter = HFTokenizerAdapter(hf_bpe)
    enc = PieceEncoder(adapter)
    assert not enc.has_dummy_prefix and adapter.add_bos and not adapter.add_eos
    recipe = recipe_for_template(LLAVA_HF_TEMPLATE)
    assert recipe.parts(question, adapter).ids(1) == adapter.processor_ids(recipe.text(question))
    # the original per-piece tokenisation with a tokenizer without dummy prefix: pieces as they are
    prompt = recipe_named("vicuna_v1").text(question)
    before, after = prompt.split("<image>")
    vic = recipe_named("vicuna_v1").parts(question, adapter)
    assert vic.before == hf_bpe(before).input_ids
    assert vic.after == hf_bpe(after, add_special_tokens=False).input_ids


def test_shipped_model_prompt_equals_its_processor():
    from transformers import AutoTokenizer

    fam = open_family(SHIPPED)
    adapter = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(SHIPPED)))
    for q in QUESTIONS:
        text = fam.recipe.text(q, bos_token="<s>")
        assert fam.prompt_ids(q, 1, adapter) == adapter.processor_ids(text)
        assert len(fam.prompt_ids(q, 36, adapter)) == len(fam.prompt_ids(q, 1, adapter)) + 35


# -- prompt recipes: errors, templates, GGUF ---------------------------------------------------------------------
def test_question_with_the_placeholder_and_bad_templates(hf_spm):
    adapter = HFTokenizerAdapter(hf_spm)
    with pytest.raises(QuestionError, match="placeholder"):
        recipe_named("vicuna_v1").parts("look at <image> here", adapter)
    assert issubclass(QuestionError, UsageError)
    with pytest.raises(TemplateError, match="exactly one"):
        recipe_for_template("{{ 'USER: ' + messages[0]['content'][1]['text'] }}").parts("q", adapter)
    with pytest.raises(TemplateError, match="2 image tokens"):
        recipe_for_template("<image><image>{{ 'x' }}").parts("q", adapter)
    with pytest.raises(TemplateError, match="not valid jinja") as err:
        recipe_for_template("{% for x in %}")
    assert "\n" not in str(err.value)
    with pytest.raises(TemplateError, match="chat template failed"):
        recipe_for_template("{{ raise_exception('no images here') }}").parts("q", adapter)


def test_generation_tags_render_as_their_body():
    assert render_chat_template("A{% generation %}B{{ 1 + 1 }}{% endgeneration %}C", "q") == "AB2C"
    rendered = render_chat_template(LLAVA_HF_TEMPLATE, "Hi")
    assert rendered == "USER: <image>\nHi ASSISTANT:"


def test_recipe_from_gguf_metadata_and_option(tmp_path):
    recipe, notice = recipe_from_gguf({"tokenizer.chat_template": LLAVA_HF_TEMPLATE})
    assert recipe.name == "hf_template" and notice is None
    recipe, notice = recipe_from_gguf({"m3cli.prompt_recipe": "vicuna_v1",
                                       "tokenizer.chat_template": LLAVA_HF_TEMPLATE})
    assert recipe.name == "vicuna_v1" and notice is None
    recipe, notice = recipe_from_gguf({"tokenizer.chat_template": vicuna_v1_template()})
    assert recipe.name == "vicuna_v1"
    recipe, notice = recipe_from_gguf({}, fallback="vicuna_v1", name="llava-v1.5-7b.gguf")
    assert recipe.name == "vicuna_v1" and "no chat template" in notice and "\n" not in notice
    with pytest.raises(TemplateError, match="--chat-template"):
        recipe_from_gguf({}, name="x.gguf")
    jinja = tmp_path / "t.jinja"
    jinja.write_text(LLAVA_HF_TEMPLATE)
    as_json = tmp_path / "chat_template.json"
    as_json.write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    for value in (str(jinja), str(as_json)):
        recipe, _ = recipe_from_gguf({"tokenizer.chat_template": "{{ 'ignored' }}"}, override=value)
        assert recipe.name == "hf_template" and recipe.template == LLAVA_HF_TEMPLATE
    assert chat_template_option("mistral_instruct").name == "mistral_instruct"
    with pytest.raises(UsageError, match="neither a recipe"):
        chat_template_option(str(tmp_path / "nope.jinja"))


MMPROJ_META = {"clip.projector_type": "mlp", "clip.has_llava_projector": True, "clip.vision.image_size": 336,
               "clip.vision.patch_size": 14, "clip.vision.image_mean": list(OPENAI_CLIP_MEAN),
               "clip.vision.image_std": list(OPENAI_CLIP_STD)}


def test_gguf_pair_spec():
    spec, recipe, notice = gguf_family_spec("/m/llava-v1.5-7b.Q4_K_M.gguf", {}, MMPROJ_META)
    assert (spec.name, spec.layout, spec.preprocess, recipe.name) == ("llava15-gguf", "gguf", "pad", "vicuna_v1")
    assert spec.image == ImageSpec(size=336, shortest_edge=336, patch_size=14) and "no chat template" in notice
    assert family_for(spec, recipe).recipe is recipe
    meta = {"tokenizer.chat_template": LLAVA_HF_TEMPLATE, "m3cli.image_aspect_ratio": "crop"}
    spec, recipe, notice = gguf_family_spec("x.gguf", meta, MMPROJ_META)
    assert (spec.preprocess, recipe.name, notice, spec.chat_template) == ("crop", "hf_template", None,
                                                                          LLAVA_HF_TEMPLATE)
    spec, recipe, _ = gguf_family_spec("x.gguf", meta, MMPROJ_META, override="vicuna_v1")
    assert recipe.name == "vicuna_v1"
    spec, _, _ = gguf_family_spec("x.gguf", meta, {**MMPROJ_META, "clip.vision.image_grid_pinpoints": [336, 672]})
    assert spec.family == "llavanext"


def test_gguf_next_pair_spec_reads_pinpoints_as_llamacpp_does():
    flat = [336, 672, 672, 336, 672, 672, 1008, 336, 336, 1008]      # config_vit.json's pairs, flattened
    spec, recipe, _ = gguf_family_spec("llava-v1.6-vicuna-7b.Q4_K_M.gguf", {},
                                       {**MMPROJ_META, "clip.vision.image_grid_pinpoints": flat,
                                        "clip.vision.mm_patch_merge_type": "spatial_unpad"})
    assert (spec.name, spec.family, spec.preprocess, spec.anyres_flavour) == ("llavanext-gguf", "llavanext",
                                                                              "anyres", "original")
    # clip.cpp reads each pair as (width, height): as (height, width), swapped, in the same order
    assert spec.grid_pinpoints == ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))
    family = family_for(spec, recipe)
    assert family.layout((400, 1200)).tiles_wide == 3 and family.layout((1200, 400)).tiles_high == 3
    assert recipe.name == "vicuna_v1"
    # m3's corrected mmproj copy keeps them under m3cli.anyres.*
    moved, _, _ = gguf_family_spec("x.gguf", {}, {**MMPROJ_META, "m3cli.anyres.image_grid_pinpoints": flat})
    assert moved.grid_pinpoints == spec.grid_pinpoints and moved.family == "llavanext"


@pytest.mark.parametrize("flat", [[336], [336, 672, 672], [336, 0], ["a", "b"]])
def test_gguf_next_pair_with_bad_pinpoints_is_one_line(flat):
    with pytest.raises(ModelError, match="image_grid_pinpoints") as info:
        gguf_family_spec("x.gguf", {}, {**MMPROJ_META, "clip.vision.image_grid_pinpoints": flat})
    assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedModelError, match="qwen2vl_merger"):
        gguf_family_spec("q.gguf", {}, {**MMPROJ_META, "clip.projector_type": "qwen2vl_merger"})


# -- llama.cpp: the adapter contract, on real llama.cpp vocabularies ----------------------------------------------
class LlamaCppAdapter:
    """The llama.cpp side of the contract, as the backend implements it (see m3cli/families/tokenizing.py)."""

    def __init__(self, gguf_path: Path):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), params)
        assert self.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.eos_id = L.llama_vocab_eos(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(L.llama_vocab_get_add_eos(self.vocab))
        wanted = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED | L.LLAMA_TOKEN_ATTR_UNKNOWN
        self.special_tokens = {self.piece(i): i for i in range(L.llama_vocab_n_tokens(self.vocab))
                               if L.llama_vocab_get_attr(self.vocab, i) & wanted}

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[:n].decode("utf-8")

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        arr = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, parse_special)
        assert n >= 0
        return list(arr[:n])

    def raw_encode(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=False, parse_special=False)

    def close(self) -> None:
        self.L.llama_model_free(self.model)


def _gguf_writer(path: Path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    return gguf, w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def spm_gguf(tmp_path_factory, sp, hf_spm) -> Path:
    """The SentencePiece vocabulary as llama.cpp's `llama` tokenizer model, <image>/<pad> user-defined."""
    pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("gguf") / "spm.gguf"
    gguf, w = _gguf_writer(path)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    for text in ("<image>", "<pad>"):
        assert hf_spm.convert_tokens_to_ids(text) == len(tokens)
        tokens.append(text)
        scores.append(-1000.0)
        types.append(gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    _finish(w)
    return path


@pytest.fixture(scope="session")
def bpe_gguf(tmp_path_factory, bpe_json) -> Path:
    """The byte-level BPE as llama.cpp's `gpt2` tokenizer model."""
    pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("gguf") / "bpe.gguf"
    gguf, w = _gguf_writer(path)
    model = json.loads(bpe_json)["model"]
    tokens = [""] * len(model["vocab"])
    for text, i in model["vocab"].items():
        tokens[i] = text
    types = [gguf.TokenType.CONTROL if t in ("<s>", "</s>", "<pad>") else
             gguf.TokenType.USER_DEFINED if t == "<image>" else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    _finish(w)
    return path


def test_llama_cpp_spm_gives_the_same_ids(spm_gguf, hf_spm, sp):
    cpp = LlamaCppAdapter(spm_gguf)
    try:
        hf = HFTokenizerAdapter(hf_spm)
        assert PieceEncoder(cpp).has_dummy_prefix and cpp.special_tokens["<image>"] == hf.special_tokens["<image>"]
        image_id = hf.special_tokens["<image>"]
        for q in QUESTIONS:
            for recipe in (recipe_named("vicuna_v1"), recipe_named("mistral_instruct"),
                           recipe_for_template(LLAVA_HF_TEMPLATE)):
                assert recipe.parts(q, cpp) == recipe.parts(q, hf), (recipe.name, q)
            prompt = recipe_named("vicuna_v1").text(q)
            assert recipe_named("vicuna_v1").parts(q, cpp).ids(1) == original_ids(sp, prompt, image_id)
        # the facts behind the contract: llama.cpp puts a "▁" after <image> when it tokenises the whole prompt,
        # and a second one before a leading space, where transformers' Metaspace does neither
        whole = cpp.tokenize("USER: <image>\nHi", add_special=True, parse_special=True)
        at = whole.index(image_id)
        assert whole[at + 1:at + 3] == [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]
        hf_whole = hf_spm("USER: <image>\nHi").input_ids
        assert hf_whole[hf_whole.index(image_id) + 1] == sp.piece_to_id("<0x0A>")
        assert cpp.raw_encode(" hi") == sp.encode(" hi") != hf.raw_encode(" hi")
    finally:
        cpp.close()


def test_llama_cpp_bpe_gives_the_same_ids(bpe_gguf, hf_bpe):
    cpp = LlamaCppAdapter(bpe_gguf)
    try:
        hf = HFTokenizerAdapter(hf_bpe)
        assert not PieceEncoder(cpp).has_dummy_prefix and cpp.add_bos
        for q in QUESTIONS:
            for recipe in (recipe_named("vicuna_v1"), recipe_for_template(LLAVA_HF_TEMPLATE)):
                assert recipe.parts(q, cpp) == recipe.parts(q, hf), (recipe.name, q)
    finally:
        cpp.close()


# -- visual tokens -------------------------------------------------------------------------------------------
def test_llava15_visual_tokens_are_the_flat_row_major_grid():
    fam = family_for(detect_family(SHIPPED))
    side, dim = 3, 4
    grid = np.arange(side * side * dim, dtype=np.float32).reshape(side, side, dim)
    flat = fam.visual_tokens([grid])
    assert flat.shape == (9, 4)
    for i in range(side):
        for j in range(side):
            np.testing.assert_array_equal(flat[i * side + j], grid[i, j])
    np.testing.assert_array_equal(fam.visual_tokens([flat]), flat)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(grid)
    assert torch.equal(fam.visual_tokens([t]), t.reshape(9, 4))
    assert [fam.n_visual_tokens(s) for s in (576, 144, 36, 9, 1)] == [576, 144, 36, 9, 1]
    with pytest.raises(ValueError, match="one crop"):
        fam.visual_tokens([flat, flat])
