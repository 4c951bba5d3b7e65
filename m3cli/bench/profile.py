"""Where the time of a small prefill goes (``m3 bench profile --shape NAME --layers N``).

Three views, each on the torch backend's own forward: the matmul rate of the LM's largest projection at a
given number of rows (few rows stream the weights once for little arithmetic), the decoder layers timed
one by one by forward hooks (prefill at several scales and batch sizes, with ``sdpa`` and ``eager``
attention), and a decode step per layer against the memory bandwidth its weights need.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from m3cli.backends.base import AnswerRequest
from m3cli.bench.scenes import BENCH_QUESTION, bench_image


@dataclass
class MatmulRate:
    rows: int
    dtype: str
    ms: float
    gflops: float


@dataclass
class LayerTiming:
    label: str
    rows: int  # LM rows of the whole forward (batch x prompt)
    total_ms: float  # the backend's prefill (or one decode step)
    layers_ms: float  # the decoder layers together
    layer_ms: float  # one decoder layer, mean
    gflops: float  # decoder-layer arithmetic / their time
    gbps: float  # decoder-layer weight bytes / their time


def matmul_rates(rows: Sequence[int], hidden: int, ff: int, dtypes: Sequence, repeat: int = 3) -> list[MatmulRate]:
    """Best-of-``repeat`` ``F.linear`` of (rows, hidden) x (ff, hidden)^T, the LM's up/gate projection."""
    import torch

    out = []
    for dtype in dtypes:
        w = torch.randn(ff, hidden).to(dtype)
        for m in rows:
            x = torch.randn(m, hidden).to(dtype)
            torch.nn.functional.linear(x, w)  # kernel selection, first-touch
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - start)
            out.append(MatmulRate(m, str(dtype).replace("torch.", ""), best * 1000, 2 * m * hidden * ff / best / 1e9))
    return out


class LayerClock:
    """Forward hooks on every decoder layer: the wall time of each call, in call order."""

    def __init__(self, layers) -> None:
        self.calls: list[float] = []
        self._start = 0.0
        self._handles = []
        for layer in layers:
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.calls.append(time.perf_counter() - self._start)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _layer_cost(backend, rows: int, context: int) -> tuple[float, float]:
    """(FLOPs, weight bytes) of all decoder layers for ``rows`` new rows attending to ``context`` positions."""
    cfg = backend.model.config.text_config
    h, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    params = 2 * h * h + 2 * h * kv + 3 * h * ff
    flops = n * (2 * rows * params + 4 * rows * context * h)
    return flops, n * params * backend.model.dtype.itemsize


def layer_timings(backend, scales: Sequence[int], batches: Sequence[int], attention: Sequence[str],
                  repeat: int = 2, decode_tokens: int = 3) -> list[LayerTiming]:
    """Prefill (and one decode step) at each scale x batch x attention implementation, layers timed apart."""
    image = bench_image()
    enc = backend.encode([image])[0]
    layers = backend.model.model.language_model.layers
    out = []
    for attn in attention:
        backend.model.set_attn_implementation(attn)
        backend.answer([AnswerRequest(enc, min(scales), BENCH_QUESTION, 2)])  # warm-up
        for scale in scales:
            prompt = len(backend.prompt_ids(BENCH_QUESTION, scale))
            for batch in batches:
                pre, dec, lay_pre, lay_dec = [], [], [], []
                for _ in range(repeat):
                    clock = LayerClock(layers)
                    try:
                        gen = backend.answer([AnswerRequest(enc, scale, BENCH_QUESTION, decode_tokens)] * batch)[0]
                    finally:
                        clock.close()
                    n = len(layers)  # the first n layer calls are the prefill, the rest the decode steps
                    pre.append(gen.prefill_ms * batch)
                    dec.append(gen.decode_ms * batch / (decode_tokens - 1))
                    lay_pre.append(1000 * sum(clock.calls[:n]))
                    lay_dec.append(1000 * sum(clock.calls[n:]) / (decode_tokens - 1))
                n_layers = len(layers)
                flops, weights = _layer_cost(backend, batch * prompt, prompt)
                lp = statistics.median(lay_pre)
                out.append(LayerTiming(f"prefill {scale} tokens, batch {batch}, {attn}", batch * prompt,
                                       statistics.median(pre), lp, lp / n_layers, flops / lp / 1e6, weights / lp / 1e6))
                flops, weights = _layer_cost(backend, batch, prompt)
                ld = statistics.median(lay_dec)
                out.append(LayerTiming(f"decode step after {scale}, batch {batch}, {attn}", batch,
                                       statistics.median(dec), ld, ld / n_layers, flops / ld / 1e6 if ld else 0.0,
                                       weights / ld / 1e6 if ld else 0.0))
    backend.model.set_attn_implementation("sdpa")
    return out


def memcpy_gbps(mib: int = 512) -> float:
    """Best-of-3 copy bandwidth (read + write bytes) of a ``mib`` MiB tensor: the decode's ceiling."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9
