"""The weight files of an original-LLaVA checkpoint (or a CLIP tower directory) and their key mapping.

Safetensors shards are read lazily (headers first, tensors one file at a time); pytorch ``.bin`` shards
are memory-mapped where the format allows, one kept at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from m3cli.errors import ConvertError, describe

# Source key prefixes (original LLaVA layout).
SRC_TOWER = "model.vision_tower.vision_tower."
SRC_PROJECTOR = "model.mm_projector."
SRC_PROJECTOR_KEYS = tuple(f"{SRC_PROJECTOR}{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))


def tower_rest(key: str) -> str | None:
    """A CLIP checkpoint key's part inside the vision model, or None for non-vision keys."""
    if key.startswith("vision_model."):
        return key
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return key  # a CLIPVisionModel saved by transformers 5 (no vision_model prefix)
    return None


class KeyMapper:
    """Original-LLaVA key -> this transformers version's LlavaForConditionalGeneration key."""

    def __init__(self, expected: dict):
        self.expected = expected

        def prefix_of(suffix: str, must: str = "") -> str:
            hits = [k for k in expected if k.endswith(suffix) and must in k]
            if len(hits) != 1:
                raise ConvertError(f"internal: cannot locate {suffix} in LlavaForConditionalGeneration")
            return hits[0][: -len(suffix)]

        self.lm_prefix = prefix_of("embed_tokens.weight")
        self.proj_prefix = prefix_of("linear_1.weight", "multi_modal_projector")
        self.tower_prefix = prefix_of("embeddings.patch_embedding.weight")
        self.lm_head = prefix_of("lm_head.weight") + "lm_head.weight"
        # LLaVA-NeXT's learned newline (absent from a LLaVA-1.5 target, where the source's is dropped)
        newline = [k for k in expected if k.split(".")[-1] == "image_newline"]
        self.newline = newline[0] if len(newline) == 1 else None

    def checkpoint_key(self, key: str) -> str | None:
        if key.startswith(SRC_PROJECTOR):
            rest = key[len(SRC_PROJECTOR):]
            index, _, param = rest.partition(".")
            linear = {"0": "linear_1", "2": "linear_2"}.get(index)
            return self._known(f"{self.proj_prefix}{linear}.{param}") if linear else None
        if key.startswith(SRC_TOWER):
            return self.tower_key(key[len(SRC_TOWER):])
        if key == "lm_head.weight":
            return self.lm_head
        if key == "model.image_newline":
            return self.newline
        if key.startswith("model."):
            return self._known(self.lm_prefix + key[len("model."):])
        return None

    def tower_key(self, rest: str) -> str | None:
        rest = rest.removeprefix("vision_model.")
        for candidate in (self.tower_prefix + rest, self.tower_prefix + "vision_model." + rest):
            if candidate in self.expected:
                return candidate
        return None

    def _known(self, key: str) -> str | None:
        return key if key in self.expected else None


def droppable(key: str) -> bool:
    """Source keys with no HF counterpart that are safe to leave behind."""
    return (key.endswith(("rotary_emb.inv_freq", "position_ids"))
            or key == "model.image_newline")


def resize_rows(tensor, rows: int, new_rows: list[int], dtype):
    """Embedding / LM-head matrix with ``rows`` rows; ``new_rows`` set to the mean of the old rows."""
    import torch

    old = tensor.shape[0]
    mean = tensor.float().mean(dim=0).to(dtype)
    out = torch.empty((rows, tensor.shape[1]), dtype=dtype)
    out[:old] = tensor.to(dtype)
    for i in new_rows:
        out[i] = mean
    return out


class WeightFiles:
    """The weight files of a checkpoint directory: safetensors preferred, else pytorch .bin shards."""

    def __init__(self, folder: Path, what: str, allow_empty: bool = False):
        self.folder = folder
        self.kind, self.files, self._keys = self._discover(folder)
        if not self.files and not allow_empty:
            raise ConvertError(f"{folder}: no {what} weights (*.safetensors or pytorch_model*.bin)")
        if self.kind == "safetensors":
            from m3cli.models.weights import WeightFileError, check_safetensors

            for path in self.files:  # an empty or truncated shard is named now, not a traceback mid-conversion
                try:
                    check_safetensors(path)
                except WeightFileError as exc:
                    raise ConvertError(str(exc)) from None
        self._bin_cache: tuple[Path, dict] | None = None

    @staticmethod
    def _discover(folder: Path):
        for kind, index_name, pattern in (("safetensors", "model.safetensors.index.json", "*.safetensors"),
                                          ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")):
            index = folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ConvertError(f"{index}: unreadable index: {describe(exc)}") from exc
                files = sorted({folder / f for f in weight_map.values()})
                lost = [f.name for f in files if not f.is_file()]
                if lost:
                    raise ConvertError(f"{folder}: shard {lost[0]} listed in {index_name} is missing")
                return kind, files, {k: folder / f for k, f in weight_map.items()}
            files = sorted(folder.glob(pattern))
            if files:
                return kind, files, None
        return None, [], {}

    def keys(self) -> dict:
        """Every tensor name -> its file (reads safetensors headers; maps unindexed .bin files)."""
        if self._keys is None:
            keys = {}
            for path in self.files:
                for key in self._names(path):
                    keys[key] = path
            self._keys = keys
        return self._keys

    def _names(self, path: Path) -> list[str]:
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as f:
                    return list(f.keys())
            except Exception as exc:  # noqa: BLE001
                raise ConvertError(f"{path}: unreadable safetensors file: {describe(exc)}") from exc
        return list(self._load_bin(path))

    def _meta(self, key: str):
        path = self.keys()[key]
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                piece = f.get_slice(key)
                return tuple(piece.get_shape()), piece.get_dtype()
        tensor = self._load_bin(path)[key]
        return tuple(tensor.shape), tensor.dtype

    def shape(self, key: str) -> tuple:
        return self._meta(key)[0]

    def dtype(self, key: str):
        import torch

        found = self._meta(key)[1]
        if isinstance(found, torch.dtype):
            return found
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        if found not in names:
            raise ConvertError(f"{key}: unsupported source dtype {found}")
        return names[found]

    def _load_bin(self, path: Path) -> dict:
        """A .bin shard, memory-mapped where the format allows (one kept at a time)."""
        import torch

        if self._bin_cache is not None and self._bin_cache[0] == path:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(f"{path}: unreadable weights file: {describe(exc)}") from exc
        if not isinstance(data, dict):
            raise ConvertError(f"{path}: not a state dict")
        self._bin_cache = (path, data)
        return data

    def iter_files(self, select: Callable[[str], bool] | None = None) -> Iterator[tuple[Path, Iterator]]:
        """(file, iterator of (key, tensor)) per file; tensors own their memory."""
        keys = self.keys()
        for path in self.files:
            wanted = [k for k, p in keys.items() if p == path and (select is None or select(k))]
            if not wanted:
                continue
            yield path, self._tensors(path, wanted)
            self._bin_cache = None

    def _tensors(self, path: Path, wanted: list[str]):
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                for key in wanted:
                    yield key, f.get_tensor(key)
        else:
            data = self._load_bin(path)
            for key in wanted:
                yield key, data[key].clone()
