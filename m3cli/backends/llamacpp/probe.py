"""The start-up probe: how does the linked llama.cpp build order LLaVA encoder rows?

llama.cpp's stock LLaVA encoder appends CLS after the patches and keeps output rows 1..N, so with our
mmproj (positions ``[1..N, 0]``) it returns HF's patches 1..N-1 and then CLS. A throwaway 2x2-patch
mmproj whose rows report which patch, which position and how many layers they saw tells that build
(``SIG_BUGGY``) from a fixed one (``SIG_FIXED``); anything else is refused.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3cli.backends.base import ModelLoadError
from m3cli.backends.llamacpp import native
from m3cli.gguf.layout import LAYOUT_NATURAL, VARIANT_MAIN, mmproj_kv, mmproj_tensor_list
from m3cli.gguf.writer import write_gguf

SIG_BUGGY = "cls-last"      # rows [(p1,1), (p2,2), (p3,3), (CLS,4)] with natural positions
SIG_FIXED = "fixed"         # rows [(p0,1), (p1,2), (p2,3), (p3,4)]

_CACHE: dict = {"probe": None}   # one probe per process


@dataclass
class ProbeResult:
    signature: str            # SIG_BUGGY, SIG_FIXED or "unknown"
    rows: list                # [(token, position)] per output row; token 'p<j>' or 'cls'
    layers: int               # encoder layers that ran (file: 3 blocks, feature_layer [2])
    ms: float

    def describe(self) -> str:
        return f"rows={self.rows} layers={self.layers}"


def _probe_file(dirpath: Path) -> Path:
    """A 2x2-patch mmproj whose output rows report (patch, position, layers run)."""
    h, ff, blocks = 8, 16, 3
    t: dict[str, np.ndarray] = {}
    patch = np.zeros((h, 3, 1, 1), np.float32)
    patch[0, 0, 0, 0] = 5.0                       # dim 0 = 5 * red = patch id + 1
    t["v.patch_embd.weight"] = patch
    cls = np.zeros(h, np.float32)
    cls[1] = 1.0                                  # dim 1 marks CLS
    t["v.class_embd"] = cls
    pos = np.zeros((5, h), np.float32)
    pos[:, 2] = np.arange(1, 6)                   # dim 2 = position row + 1
    t["v.position_embd.weight"] = pos
    for i in range(blocks):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[f"v.blk.{i}.{name}.weight"] = np.zeros((h, h), np.float32)
            t[f"v.blk.{i}.{name}.bias"] = np.zeros(h, np.float32)
        t[f"v.blk.{i}.attn_out.bias"][3] = 1.0    # dim 3 counts layers
        for name in ("ln1", "ln2"):
            t[f"v.blk.{i}.{name}.weight"] = np.ones(h, np.float32)
            t[f"v.blk.{i}.{name}.bias"] = np.zeros(h, np.float32)
        t[f"v.blk.{i}.ffn_up.weight"] = np.zeros((ff, h), np.float32)
        t[f"v.blk.{i}.ffn_up.bias"] = np.zeros(ff, np.float32)
        t[f"v.blk.{i}.ffn_down.weight"] = np.zeros((h, ff), np.float32)
        t[f"v.blk.{i}.ffn_down.bias"] = np.zeros(h, np.float32)
    t["mm.0.weight"] = np.eye(h, dtype=np.float32)
    t["mm.0.bias"] = np.full(h, 100.0, np.float32)    # GELU(x + 100) == x + 100 exactly
    t["mm.2.weight"] = np.eye(h, dtype=np.float32)
    t["mm.2.bias"] = np.full(h, -100.0, np.float32)
    kv = mmproj_kv(name="m3cli-probe", image_size=2, patch_size=1, hidden=h, ff=ff, n_blocks=blocks, n_heads=1,
                   eps=1e-5, proj_dim=h, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], use_gelu=False, file_type=0,
                   layout=LAYOUT_NATURAL, variant=VARIANT_MAIN)
    return write_gguf(dirpath / "probe-mmproj.gguf", "clip", kv, mmproj_tensor_list(t, "f32"))


def probe_llamacpp(force: bool = False) -> ProbeResult:
    """Find how the linked llama.cpp builds LLaVA encoder rows (cached per process, ~100 ms)."""
    if _CACHE["probe"] is not None and not force:
        return _CACHE["probe"]
    llama_cpp, mtmd = native.libs()
    native.backend_init(llama_cpp)
    if not native.logging_set():
        native.set_logging(llama_cpp, mtmd, verbose=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m3-probe-") as tmp:
        path = _probe_file(Path(tmp))
        mctx = mtmd.mtmd_init_from_file(str(path).encode(), None, native.mtmd_params(mtmd, False, 1))
        if not mctx:
            raise ModelLoadError("llama.cpp rejected the LLaVA probe mmproj (unsupported llama.cpp build)")
        try:
            rgb = np.zeros((2, 2, 3), np.uint8)
            rgb[..., 0] = (np.arange(4).reshape(2, 2) + 1) * 51   # patch j -> red 0.2 (j + 1)
            out = native.encode_rgb(mtmd, mctx, rgb, 8)
        finally:
            mtmd.mtmd_free(mctx)
    rows = []
    for r in out:
        token = "cls" if r[1] > 0.5 else f"p{int(round(r[0])) - 1}"
        rows.append((token, int(round(r[2])) - 1))
    layers = int(round(float(np.median(out[:, 3]))))
    if rows == [("p1", 1), ("p2", 2), ("p3", 3), ("cls", 4)]:
        sig = SIG_BUGGY
    elif rows == [("p0", 1), ("p1", 2), ("p2", 3), ("p3", 4)]:
        sig = SIG_FIXED
    else:
        sig = "unknown"
    if layers != 2:
        sig = "unknown"
    result = ProbeResult(sig, rows, layers, (time.perf_counter() - start) * 1000)
    _CACHE["probe"] = result
    return result
