"""llama.cpp-vs-torch agreement on greedy answer token ids, per scale, on the tiny real-layout LLaVA-1.5 models.

Run as ``python tests/agreement_gguf.py [--images 60] [--max-new-tokens 8] [--threads 2]``. It builds the tiny
models and their GGUF pairs (``gguf_setup``; llama.cpp's converters come from the llama-cpp-python sdist, see
``real_layouts.find_llamacpp``), answers every (image, question) pair at every scale with both backends (same
model, same recipe, greedy) and prints one markdown table: the share of answers whose token ids are equal,
and the share equal up to a near-tie (the two backends' first differing token is one whose log-probability
differs from the other backend's pick by less than 0.05 in both; with flat random weights that is a coin
flip that float rounding decides). Images have random sizes from 1:4 to 4:1, so padding and cropping matter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gguf_setup as gs  # noqa: E402


def compare(cpp, torch_backend, images, questions, max_new: int) -> dict[int, tuple[int, int, int]]:
    """scale -> (equal, equal up to a near-tie, total)."""
    from m3cli.backends.base import AnswerRequest

    enc_c = cpp.encode(images)
    enc_t = torch_backend.encode(images)
    out = {}
    for scale in cpp.scales:
        reqs_c = [AnswerRequest(e, scale, q, max_new) for e in enc_c for q in questions]
        reqs_t = [AnswerRequest(e, scale, q, max_new) for e in enc_t for q in questions]
        got = cpp.answer(reqs_c)
        ref = []
        for i in range(0, len(reqs_t), 32):
            ref += torch_backend.answer(reqs_t[i:i + 32])
        equal = sum(a.token_ids == b.token_ids for a, b in zip(got, ref, strict=True))
        tie = sum(gs.same_up_to_near_tie(a, b) for a, b in zip(got, ref, strict=True))
        out[scale] = (equal, tie, len(got))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="m3-agreement-"))
    os.environ.setdefault("M3_CACHE_DIR", str(work / "cache"))
    from m3cli import logs

    logs.configure(0)
    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.backends.torch import TorchBackend

    start = time.perf_counter()
    llamacpp = gs.require_llamacpp(work / "llamacpp-src")
    dirs = gs.build_dirs(work / "models")
    _, no_template = gs.llamacpp_pairs(work / "gguf", llamacpp, dirs)
    torch_original = TorchBackend(str(dirs.original.model_dir), device="cpu", dtype="float32",
                                  threads=args.threads)
    torch_hf = TorchBackend(str(dirs.hf), device="cpu", dtype="float32", threads=args.threads)
    torch_bpe = TorchBackend(str(dirs.bpe), device="cpu", dtype="float32", threads=args.threads)
    cases = [
        ("SPM", "llama.cpp's converter + legacy F16 mmproj, no template (vicuna_v1 fallback, pad)",
         no_template, torch_original, "original checkpoint (pad, vicuna_v1)"),
        ("SPM", "m3 convert --to gguf of the original's conversion (vicuna_v1, pad)",
         gs.m3_pair(torch_original.model_dir, work / "gguf" / "m3-original", "original"), torch_original,
         "original checkpoint (pad, vicuna_v1)"),
        ("SPM", "m3 convert --to gguf of the llava-hf directory (its template, crop)",
         gs.m3_pair(dirs.hf, work / "gguf" / "m3-hf", "hf"), torch_hf, "llava-hf directory (crop, its template)"),
        ("byte-level BPE", "m3 convert --to gguf of the BPE llava-hf directory (its ChatML template, crop)",
         gs.m3_pair(dirs.bpe, work / "gguf" / "m3-bpe", "bpe"), torch_bpe, "BPE llava-hf directory"),
    ]
    images = [gs.scene(w, h, seed=i) for i, (w, h) in enumerate(gs.aspect_sizes(args.images, seed=1))]
    questions = gs.QUESTIONS
    n_pairs = len(images) * len(questions)
    rows = []
    for vocab, gguf_desc, pair, torch_backend, torch_desc in cases:
        cpp = LlamaCppBackend(str(pair.lm), mmproj=str(pair.mmproj), threads=args.threads)
        try:
            res = compare(cpp, torch_backend, images, questions, args.max_new_tokens)
        finally:
            cpp.close()
        for scale, (equal, tie, total) in res.items():
            rows.append((vocab, gguf_desc, torch_desc, scale, equal, tie, total))
    print(f"{n_pairs} (image, question) pairs per scale ({len(images)} images of random aspect ratios x "
          f"{len(questions)} questions), greedy, up to {args.max_new_tokens} answer tokens; "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| vocabulary | GGUF pair (llama.cpp backend) | torch backend on | tokens | equal answer ids | "
          "equal up to a near-tie |")
    print("|---|---|---|---:|---:|---:|")
    for vocab, gguf_desc, torch_desc, scale, equal, tie, total in rows:
        print(f"| {vocab} | {gguf_desc} | {torch_desc} | {scale} | {100 * equal / total:.1f}% ({equal}/{total}) | "
              f"{100 * tie / total:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
