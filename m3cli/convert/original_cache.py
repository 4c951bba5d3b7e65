"""Original-layout checkpoints converted once into the user cache, so ``--model ORIGINAL`` just works.

The first load of an original (haotian-liu/LLaVA) checkpoint converts it with
:func:`~m3cli.convert.original_llava.convert_original_to_hf` into
``<cache root>/converted/<name>-<key>`` (the cache root of :func:`m3cli.gguf.cache.cache_root`:
``$M3_CACHE_DIR`` or the platform's user cache folder), written into a temporary folder and renamed into
place; later loads find it there. The key covers everything the conversion reads, so a changed source (or
tower, or converter) converts again instead of reusing a stale copy: the converter version, the dtype, the
source's config.json, weight indexes and tokenizer configs by content, and every file's name, size and
modification time (the vision tower directory's too, when the tower comes from there).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from m3cli.errors import ConvertError
from m3cli.families.spec import FamilySpec

log = logging.getLogger(__name__)

# Bump when convert_original_to_hf's output changes, so stale conversions are never reused.
# 2: LLaVA-NeXT checkpoints convert to LlavaNextForConditionalGeneration (anyres and the newline kept).
CONVERT_VERSION = 2
_HASHED_BY_CONTENT = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                      "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "preprocessor_config.json")
_COMPLETE = "config.json"


def conversion_key(src: Path, tower_dir: Path | None, dtype: str = "auto") -> str:
    """A short hash identifying one version of ``src`` (and its tower directory) as the converter sees it."""
    digest = hashlib.sha256(f"m3cli-convert-v{CONVERT_VERSION}\0dtype={dtype}\0".encode())
    for label, folder in (("src", src), ("tower", tower_dir)):
        if folder is None:
            continue
        digest.update(f"\0{label}\0".encode())
        for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            try:
                st = path.stat()  # follows the hub cache's symlinks to the blobs
            except OSError:
                continue
            if not path.is_file():
                continue
            digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if path.name in _HASHED_BY_CONTENT:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _folder_name(label: str) -> str:
    """The readable part of a conversion's folder name: the hub id or path the user gave, made file-safe."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.strip("/")).strip("-.")[-60:] or "model"


def cache_folder(spec: FamilySpec, label: str, dtype: str = "auto", root: Path | None = None) -> Path:
    """Where the conversion of the original-layout ``spec`` lives in the cache (it may not exist yet)."""
    from m3cli.gguf.cache import cache_root

    tower_dir = spec.source.vision_tower_dir if spec.source else None
    base = Path(root).expanduser() if root is not None else cache_root()
    return base / "converted" / f"{_folder_name(label)}-{conversion_key(spec.model_dir, tower_dir, dtype)}"


def cached_conversions(label: str, root: Path | None = None) -> list[Path]:
    """The finished conversions of ``label`` (a hub id or path as given to ``--model``) in the cache, newest
    first; reading only folder names (``m3 models``)."""
    from m3cli.gguf.cache import cache_root

    base = (Path(root).expanduser() if root is not None else cache_root()) / "converted"
    pattern = re.compile(re.escape(_folder_name(label)) + r"-[0-9a-f]{16}")
    try:
        found = [p for p in base.iterdir() if p.is_dir() and pattern.fullmatch(p.name)]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def cached_conversion(spec: FamilySpec, label: str, *, dtype: str = "auto",
                      root: Path | None = None) -> tuple[Path, bool]:
    """The HF directory converted from the original-layout ``spec``: ``(path, created)``.

    ``label`` (the hub id or path the user gave) names the folder and the converted ``m3cli`` block's source.
    Converts on the first call (a progress line on stderr), reuses the folder afterwards. A racing process
    converting the same checkpoint is harmless: the first complete folder wins. Raises :class:`ConvertError`.
    """
    from m3cli.convert.original_llava import convert_original_to_hf

    if not spec.needs_conversion:
        raise ConvertError(f"{spec.model_dir}: not an original-layout checkpoint ({spec.name})")
    folder = cache_folder(spec, label, dtype, root)
    if (folder / _COMPLETE).is_file():
        log.info("using the converted copy of %s in %s", label, folder)
        return folder, False
    tower = spec.source.vision_tower_dir if spec.source else None
    from m3cli.models.weights import WeightFileError, check_weight_files

    try:
        check_weight_files(spec.model_dir)  # a damaged shard is one line before the progress line, not after
    except WeightFileError as exc:
        raise ConvertError(str(exc)) from None
    log.warning("%s is an original LLaVA checkpoint: converting it once into %s (later runs reuse it)", label, folder)
    try:
        convert_original_to_hf(spec.model_dir, folder, dtype=dtype, vision_tower=tower, source=label)
    except ConvertError:
        if (folder / _COMPLETE).is_file():  # a racing process finished first
            return folder, False
        raise
    except OSError as exc:
        raise ConvertError(f"cannot write the converted copy of {label} into {folder.parent} "
                           f"({exc.strerror or exc}); set M3_CACHE_DIR to a writable folder or run "
                           "`m3 convert SRC --to hf OUT` and pass --model OUT") from None
    log.warning("converted %s into %s", label, folder)
    return folder, True
