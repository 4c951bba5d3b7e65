"""Original-layout checkpoints converted once into the m3 cache, so ``--model ORIGINAL`` just works.

The first load of an original (haotian-liu/LLaVA) checkpoint converts it with
:func:`~m3cli.convert.original_llava.convert_original_to_hf` into the cache entry
``converted/<name>-<key>`` of :mod:`m3cli.cache` (owner-only root, built aside and renamed into place, every
file verified before use, a damaged entry rebuilt once with a notice); later loads find it there. The key is
a hash of everything the conversion reads, BY CONTENT: the converter version, the dtype, the name the
converted files record, and the SHA-256 of every file of the source (and of the vision tower directory, when
the tower comes from there). A file's hash is computed once per version of the file (the cache's index), so
later loads cost a few ``stat`` calls; a changed source converts again instead of reusing a stale copy.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from m3cli.cache import CACHE_ENV, CacheError, cached_entry, entries_root, private_root, source_sha256
from m3cli.errors import ConvertError
from m3cli.families.spec import FamilySpec

log = logging.getLogger(__name__)

# Bump when convert_original_to_hf's output changes, so stale conversions are never reused.
# 2: LLaVA-NeXT checkpoints convert to LlavaNextForConditionalGeneration (anyres and the newline kept).
CONVERT_VERSION = 2
KIND = "converted"
_HINT = (f"set {CACHE_ENV} to a writable folder of your own or run `m3 convert SRC --to hf OUT` and pass "
         "--model OUT")


def conversion_key(src: Path, tower_dir: Path | None, dtype: str = "auto", label: str = "",
                   root: Path | None = None) -> str:
    """A hash of everything the conversion of ``src`` (and its tower directory) reads, by content."""
    base = private_root(root, _HINT)
    digest = hashlib.sha256(f"m3cli-convert-v{CONVERT_VERSION}\0dtype={dtype}\0source={label}\0".encode())
    for tag, folder in (("src", src), ("tower", tower_dir)):
        if folder is None:
            continue
        digest.update(f"\0{tag}\0".encode())
        for path in sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")):
            if not path.is_file():  # follows the hub cache's symlinks to the blobs
                continue
            try:
                content = source_sha256(path, base)
            except OSError as exc:
                raise ConvertError(f"cannot read {path} ({exc.strerror or exc})") from None
            digest.update(f"{path.name}\0{content}\0".encode())
    return digest.hexdigest()


def _name(label: str) -> str:
    """The readable part of a conversion's folder name: the hub id or path the user gave, made file-safe."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.strip("/")).strip("-.")[-60:] or "model"


def cache_folder(spec: FamilySpec, label: str, dtype: str = "auto", root: Path | None = None) -> Path:
    """Where the conversion of the original-layout ``spec`` lives in the cache (it may not exist yet)."""
    tower_dir = spec.source.vision_tower_dir if spec.source else None
    try:
        base = private_root(root, _HINT)
        key = conversion_key(spec.model_dir, tower_dir, dtype, label, base)
    except CacheError as exc:
        raise ConvertError(str(exc)) from None
    return base / KIND / f"{_name(label)}-{key[:16]}"


def cached_conversions(label: str, root: Path | None = None) -> list[Path]:
    """The finished conversions of ``label`` (a hub id or path as given to ``--model``) in the cache, newest
    first; reading only folder names, creating nothing (``m3 models``)."""
    base = entries_root(root)
    if base is None:
        return []
    pattern = re.compile(re.escape(_name(label)) + r"-[0-9a-f]{16}")
    try:
        found = [p for p in (base / KIND).iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []


def cached_conversion(spec: FamilySpec, label: str, *, dtype: str = "auto",
                      root: Path | None = None) -> tuple[Path, bool]:
    """The HF directory converted from the original-layout ``spec``: ``(path, created)``.

    ``label`` (the hub id or path the user gave) names the folder and the converted ``m3cli`` block's source.
    Converts on the first call (a progress line on stderr), reuses the verified entry afterwards. A racing
    process converting the same checkpoint is harmless: the first complete entry wins. Raises
    :class:`ConvertError` (one line).
    """
    from m3cli.convert.original_llava import convert_original_to_hf

    if not spec.needs_conversion:
        raise ConvertError(f"{spec.model_dir}: not an original-layout checkpoint ({spec.name})")
    folder = cache_folder(spec, label, dtype, root)
    tower = spec.source.vision_tower_dir if spec.source else None

    def build(out: Path) -> None:
        from m3cli.models.weights import WeightFileError, check_weight_files

        try:
            check_weight_files(spec.model_dir)  # a damaged shard is one line before the progress line, not after
        except WeightFileError as exc:
            raise ConvertError(str(exc)) from None
        log.warning("%s is an original LLaVA checkpoint: converting it once into %s (later runs reuse it)", label,
                    folder)
        convert_original_to_hf(spec.model_dir, out, dtype=dtype, vision_tower=tower, source=label)

    meta = {"convert_version": CONVERT_VERSION, "dtype": dtype, "source": label, "key": folder.name}
    try:
        out, created = cached_entry(KIND, folder.name, build, meta=meta, root=folder.parent.parent, hint=_HINT,
                                    what=f"converted copy of {label}")
    except CacheError as exc:
        raise ConvertError(str(exc)) from None
    if created:
        log.warning("converted %s into %s", label, out)
    else:
        log.info("using the converted copy of %s in %s", label, out)
    return out, created
