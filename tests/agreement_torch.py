"""Torch backend vs the independent reference: answer-token-id agreement per scale on the real layouts.

    python tests/agreement_torch.py [--pairs 200] [--seed 0] [--max-new-tokens 8] [--json out.json]

Builds the tiny random-weight models of ``real_layouts`` (llava-hf with a SentencePiece tokenizer.json in
the transformers-4.36 form and the 5.x form, the original ``llava_llama`` layout converted by m3 on first
load, and llava-hf with a byte-level BPE vocabulary), draws ``--pairs`` (image, question) pairs (random
images of many aspect ratios, questions from templates and words), answers each at every scale with
``TorchBackend`` (batched, as ``m3 batch`` does) and with ``reference_llava15`` (one at a time: the
original recipe for the original layout, the llava-hf recipe otherwise), and prints the share of pairs
whose greedy answer token ids are identical, per model and scale, plus the share of identical prompts.
CPU only; a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import real_layouts as rl  # noqa: E402
import reference_llava15 as ref  # noqa: E402

WORDS = ["red", "blue", "green", "circle", "square", "left", "right", "top", "corner", "background", "cat",
         "sign", "text", "colour", "shape", "person", "car", "tree", "sky", "naïve", "3", "42", "two"]
TEMPLATES = ["What colour is the {0}?", "How many {0}s are there?", "Is there a {0} in the {1}?",
             "What is written on the {0}?", "Describe the {0} and the {1}.", "Where is the {0}?",
             "{0}?", "Answer with one word: is the {0} {1}?", "What colours are there?",
             "Which is larger, the {0} or the {1}?\nAnswer the question using a single word or phrase."]


def random_image(rng: np.random.Generator):
    """A random RGB image with an aspect ratio between 1:4 and 4:1: noise, a gradient and a few shapes."""
    from PIL import Image, ImageDraw

    ratio = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
    short = int(rng.integers(16, 120))
    w, h = (int(short * ratio), short) if ratio >= 1 else (short, int(short / ratio))
    w, h = max(w, 4), max(h, 4)
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    noise = rng.normal(0, rng.uniform(0, 40), (h, w, 3))
    arr = np.clip(base + grad + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, w)), y0 + int(rng.integers(1, h))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return img


def random_question(rng: np.random.Generator) -> str:
    words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), 2)]
    return TEMPLATES[int(rng.integers(0, len(TEMPLATES)))].format(*words)


def build_models(root: Path) -> dict[str, tuple[str, Path]]:
    """name -> (tokenizer kind, directory)."""
    original = rl.build_original_llava(root / "original")
    return {
        "llava-hf, SPM (tokenizer.json of transformers 4.36)": ("SPM", rl.build_llava_hf(root / "hf-v4")),
        "llava-hf, SPM (tokenizer.json of transformers 5)": ("SPM", rl.build_llava_hf(root / "hf-v5",
                                                                                       tokenizer_json="v5")),
        "original llava_llama, SPM (converted by m3)": ("SPM", original.model_dir),
        "llava-hf, byte-level BPE": ("byte-level BPE", rl.build_llava_hf_bpe(root / "bpe")),
    }


def agreement(name: str, path: Path, pairs: list, max_new: int) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from m3cli.backends.base import AnswerRequest
    from m3cli.backends.torch import TorchBackend

    backend = TorchBackend(str(path), device="cpu")
    original = backend.spec.converted
    if original:
        parts = ref.load_original_parts(path)
    else:
        stock = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(path)
    encoded = backend.encode([img for img, _ in pairs])
    same_prompt = 0
    for img, q in pairs:
        if original:
            want = ref.reference_prompt_ids(parts.spm_path, q, 9, backend.image_token_id)
        else:
            ids = ref.hf_inputs(processor, img, q)["input_ids"][0].tolist()
            iid = stock.config.image_token_id
            first, n = ids.index(iid), ids.count(iid)
            want = ids[:first] + [iid] * 9 + ids[first + n:]
        same_prompt += backend.prompt_ids(q, 9) == want
    per_scale = {}
    for scale in ref.SCALES:
        ours = []
        for start in range(0, len(pairs), 16):
            chunk = range(start, min(start + 16, len(pairs)))
            ours += [g.token_ids for g in backend.answer([AnswerRequest(encoded[i], scale, pairs[i][1], max_new)
                                                          for i in chunk])]
        agree = 0
        for (img, q), got in zip(pairs, ours, strict=True):
            want = (ref.reference_answer(parts, img, q, scale, max_new) if original
                    else ref.reference_hf_answer(stock, processor, img, q, scale, max_new))
            agree += got == want
        per_scale[scale] = agree / len(pairs)
        print(f"  {name}: scale {scale}: {agree}/{len(pairs)}", file=sys.stderr, flush=True)
    return {"prompts": same_prompt / len(pairs), "scales": per_scale, "n": len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for these tiny models)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    pairs = [(random_image(rng), random_question(rng)) for _ in range(args.pairs)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="m3-agreement-") as tmp:
        os.environ["M3_CACHE_DIR"] = str(Path(tmp) / "cache")
        start = time.time()
        for name, (kind, path) in build_models(Path(tmp)).items():
            results[name] = {"tokenizer": kind, **agreement(name, path, pairs, args.max_new_tokens)}
    scales = ref.SCALES
    print(f"Torch backend vs reference, {args.pairs} (image, question) pairs, aspect ratios 1:4 to 4:1, "
          f"greedy answers of up to {args.max_new_tokens} tokens, identical token ids "
          f"({time.time() - start:.0f} s)\n")
    print("| model | tokenizer | prompt ids | " + " | ".join(str(s) for s in scales) + " |")
    print("|---|---|---|" + "---|" * len(scales))
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["tokenizer"], reverse=True):
        cells = " | ".join(f"{100 * r['scales'][s]:.1f}%" for s in scales)
        print(f"| {name} | {r['tokenizer']} | {100 * r['prompts']:.1f}% | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({"pairs": args.pairs, "seed": args.seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
