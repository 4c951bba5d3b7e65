"""Our llama.cpp backend at a pooled scale against the stock ``Llava15ChatHandler`` at 576, and our torch backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from m3cli.backends.base import Backend
from m3cli.bench.scenes import BENCH_QUESTION, scene_files
from m3cli.bench.throughput import ThroughputRow, batch_throughput, one_by_one
from m3cli.errors import UsageError


@dataclass
class GgufComparison:
    rows: list[ThroughputRow]  # the stock handler first: the baseline
    gguf_path: str
    mmproj_path: str
    hf_dir: str
    backend: Backend  # the llama.cpp backend that was timed (closed)


def stock_llava15_loop(lm_path: str, mmproj_path: str, paths: Sequence[str], question: str, max_new_tokens: int,
                       threads: int | None = None, n_ctx: int = 2048, flash_attn: bool = False,
                       suppress_eos: bool = False, progress: Callable[[int], None] | None = None) -> ThroughputRow:
    """What a llama-cpp-python user writes today: ``Llava15ChatHandler`` + ``create_chat_completion``, one
    image at a time as a data URI, greedy; the full 576-token grid every time (the handler cannot pool).

    The handler runs its CLIP encoder with flash attention only when the ``Llama`` has ``flash_attn=True``
    (off by default); our backend leaves it on ``auto``, which is on for CPU. ``suppress_eos`` masks EOS
    (random-weight shapes: every answer then runs to ``max_new_tokens``); the row records the mean number
    of new tokens either way, counted by a logits processor (one call per sampled token)."""
    import base64
    import os

    from llama_cpp import Llama, LogitsProcessorList
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm = Llama(model_path=str(lm_path), chat_handler=Llava15ChatHandler(clip_model_path=str(mmproj_path),
                                                                          verbose=False),
                n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, n_gpu_layers=0, verbose=False, seed=0,
                flash_attn=flash_attn)

    eos = int(llm.token_eos())
    sampled = [0]

    def per_token(input_ids, scores):
        # called once per sampled token: the exact count (the reply's usage re-tokenises the text)
        sampled[0] += 1
        if suppress_eos:
            scores[eos] = -float("inf")
        return scores

    def ask(path: str) -> int:
        with open(path, "rb") as fh:
            uri = "data:image/png;base64," + base64.b64encode(fh.read()).decode()
        sampled[0] = 0
        llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": question}]}],
            max_tokens=max_new_tokens, temperature=0.0, top_k=1, logits_processor=LogitsProcessorList([per_token]))
        return sampled[0]

    try:
        ask(paths[0])  # warm-up (first encode allocates the CLIP graph)
        label = "stock `Llava15ChatHandler`, 576 tokens, one by one" + (", flash_attn=True" if flash_attn else "")
        return one_by_one(label, paths, ask, progress)
    finally:
        llm.close()


def gguf_comparison(model: str | None, gguf_path: str | None, mmproj: str | None, outtype: str, count: int,
                    tokens: int, batch_size: int, max_new_tokens: int, threads: int | None,
                    workdir: str, progress: Callable[[str, int], Callable[[int], None]] | None = None
                    ) -> GgufComparison:
    """Time the stock handler (flash attention off and on), our llama.cpp backend at 576 and ``tokens``, and our
    torch backend at ``tokens``, all on the CPU over ``count`` scenes. Without ``gguf_path`` the HF ``model`` is
    converted into ``workdir`` first. ``progress(label, total)`` gives each run its progress counter."""
    from m3cli.backends import open_backend
    from m3cli.models.registry import resolve_model

    hf_dir = resolve_model(model)
    if hf_dir.lower().endswith(".gguf"):
        raise UsageError("--model is the HF model the GGUF pair was converted from; pass the .gguf as --gguf")
    if gguf_path is None:
        from m3cli.convert.gguf_writer import convert_to_gguf

        gguf_path, mmproj = convert_to_gguf(hf_dir, Path(workdir) / f"gguf-{outtype}", outtype)
    cpp = open_backend(str(gguf_path), backend="llamacpp", mmproj=mmproj, threads=threads, device="cpu",
                       n_gpu_layers=0)
    paths = scene_files(Path(workdir) / "scenes", count)
    question = BENCH_QUESTION
    tick = progress or (lambda label, total: None)
    rows = [stock_llava15_loop(gguf_path, cpp.mmproj_path, paths, question, max_new_tokens, threads, flash_attn=fa,
                               progress=tick(f"stock handler{', flash_attn' if fa else ''}", len(paths)))
            for fa in (False, True)]
    for t in (576, tokens):
        batch_throughput(cpp, paths[:batch_size], question, t, batch_size, max_new_tokens)  # warm-up
        rows.append(batch_throughput(cpp, paths, question, t, batch_size, max_new_tokens,
                                     label=f"m3 batch --backend llamacpp --tokens {t}",
                                     progress=tick(f"llamacpp --tokens {t}", len(paths))))
    cpp.close()
    torch_backend = open_backend(hf_dir, backend="torch", device="cpu", threads=threads)
    batch_throughput(torch_backend, paths[:batch_size], question, tokens, batch_size, max_new_tokens)  # warm-up
    rows.append(batch_throughput(torch_backend, paths, question, tokens, batch_size, max_new_tokens,
                                 label=f"m3 batch --backend torch --tokens {tokens}",
                                 progress=tick(f"torch --tokens {tokens}", len(paths))))
    return GgufComparison(rows, str(gguf_path), str(cpp.mmproj_path), hf_dir, cpp)
