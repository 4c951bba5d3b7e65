"""The GGUF pairs of the tiny real-layout LLaVA-1.5 models, for ``test_real_gguf`` and ``agreement_gguf``.

One seed, one set of weights (``real_layouts``): the original ``llava_llama`` checkpoint, its llava-hf
conversion (SentencePiece tokenizer, the official template with ``{% generation %}``; bf16 like the
original's shards, so both hold the same numbers), the same without a chat template, and a byte-level BPE
llava-hf directory. From them the pairs users have:

* ``llamacpp``: llama.cpp's own ``convert_hf_to_gguf.py`` on the llava-hf directory (its template copied in)
  plus the legacy mmproj (``convert_image_encoder_to_gguf.py`` on the CLIP tower + ``llava.projector``; F16,
  L-1 blocks, natural positions);
* ``llamacpp_nt``: the same from the directory without a template (as the liuhaotian-style GGUFs are);
* ``m3_spm`` / ``m3_bpe`` / ``m3_original``: ``m3 convert --to gguf`` of the llava-hf directory, of the BPE
  one and of the original checkpoint's conversion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import real_layouts as rl


class LlamaCppSourcesMissing(RuntimeError):
    """llama.cpp's converter scripts are not on this machine."""


def require_llamacpp(cache_dir: str | Path) -> Path:
    """llama.cpp's source tree (see :func:`real_layouts.find_llamacpp`), or an error saying how to get it."""
    root = rl.find_llamacpp(cache_dir)
    if root is None:
        raise LlamaCppSourcesMissing(f"llama.cpp's converters are needed for the real-layout GGUF pairs: "
                                     f"{rl.LLAMACPP_HOWTO}")
    return root


@dataclass
class Dirs:
    """The tiny model directories (one seed)."""

    original: rl.OriginalLayout
    hf: Path          # llava-hf, SentencePiece, official template
    hf_nt: Path       # the same without a chat template
    bpe: Path         # llava-hf layout, byte-level BPE, ChatML template


def build_dirs(root: str | Path, seed: int = 0) -> Dirs:
    """The model directories under ``root``."""
    root = Path(root)
    original = rl.build_original_llava(root / "original", seed=seed)
    hf = rl.build_llava_hf(root / "llava-1.5-tiny-hf", seed=seed, dtype="bfloat16")
    hf_nt = rl.build_llava_hf(root / "llava-1.5-tiny-hf-no-template", seed=seed, dtype="bfloat16",
                              template_file="none")
    bpe = rl.build_llava_hf_bpe(root / "llava-bpe-tiny-hf", seed=seed)
    return Dirs(original, hf, hf_nt, bpe)


def llamacpp_pairs(root: str | Path, llamacpp: Path, dirs: Dirs) -> tuple[rl.GgufPair, rl.GgufPair]:
    """(with template, without) from llama.cpp's converters; both share the legacy mmproj."""
    root = Path(root)
    pair = rl.build_llamacpp_pair(root / "llamacpp", llamacpp, dirs.hf, dirs.original.tower_dir)
    out = root / "llamacpp-no-template"
    out.mkdir(parents=True, exist_ok=True)
    lm = rl.llamacpp_convert_lm(llamacpp, dirs.hf_nt, out / "ggml-model-f32.gguf")
    mmproj = out / pair.mmproj.name
    mmproj.write_bytes(pair.mmproj.read_bytes())
    return pair, rl.GgufPair(lm=lm, mmproj=mmproj)


def m3_pair(src: str | Path, out: str | Path, name: str) -> rl.GgufPair:
    """``m3 convert --to gguf`` of a HF LLaVA directory (F32 language model and mmproj, rot180 companion)."""
    from m3cli.convert.gguf_writer import convert_to_gguf

    lm, mmproj = convert_to_gguf(src, out, "f32", name=name)
    return rl.GgufPair(lm=lm, mmproj=mmproj)


# --------------------------------------------------------------------------- images and questions

QUESTIONS = [
    "What colours are there?",
    "How many shapes are there?",
    "Is there a circle?\nAnswer the question using a single word or phrase.",
    "What is in the top right corner of the image?",
    "Describe the image in detail.",
]


def scene(width: int, height: int, seed: int):
    """An RGB image of ``width`` x ``height``: a coloured background and a few random shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)

    def colour() -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    img = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(2, max(3, width // 2)), y0 + rng.randint(2, max(3, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour())
    return img


def aspect_sizes(n: int, seed: int = 0, short: tuple[int, int] = (20, 140)) -> list[tuple[int, int]]:
    """``n`` (width, height) pairs: square, wide and tall, from 1:4 to 4:1, odd sizes included."""
    rng = random.Random(seed)
    sizes = [(48, 48), (96, 96), (144, 48), (48, 144), (300, 480), (480, 300), (1008, 336), (336, 1008)]
    while len(sizes) < n:
        s = rng.randint(*short)
        ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0, 4.0, rng.uniform(1, 4)])
        long = max(s, int(s * ratio))
        sizes.append((long, s) if rng.random() < 0.5 else (s, long))
    return sizes[:n]


def wide_image():
    """3:1 like a 1008x336 photo: red left third, grey middle, blue right third (cropping keeps only grey)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (144, 48), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 47, 47), fill=(220, 20, 20))
    draw.rectangle((96, 0, 143, 47), fill=(20, 20, 220))
    draw.ellipse((60, 10, 84, 34), fill=(240, 230, 20))
    return img


# --------------------------------------------------------------------------- comparing answers

TIE = 0.05


def first_difference(a, b) -> int | None:
    """The index of the first differing answer token of two generations (None: equal ids)."""
    n = 0
    while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
        n += 1
    return None if n == len(a.token_ids) == len(b.token_ids) else n


def same_up_to_near_tie(a, b, tie: float = TIE) -> bool:
    """Equal ids, or equal up to a token where each backend's pick has a log-probability within ``tie`` of the
    other's: with flat random weights such a step is a coin flip that float rounding (ggml's fp16 steps) decides.
    """
    n = first_difference(a, b)
    if n is None:
        return True
    if n >= len(a.token_ids) or n >= len(b.token_ids):
        return False      # one stopped where the other went on
    return abs(a.logprobs[n] - b.logprobs[n]) < tie
