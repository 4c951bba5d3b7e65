"""Corrected copies of third-party (legacy-layout) mmproj files, made once into the m3 cache.

llama.cpp's legacy LLaVA converter writes mmproj files whose features are wrong on every build (L-1
blocks, natural position order; see docs/gguf.md). ``m3 convert --fix-mmproj`` rewrites one explicitly;
the llama.cpp backend calls :func:`cached_fixed_mmproj` so that such a file also just works: the first
load writes the corrected pair into the cache, later loads reuse it, and the user's file is only read.

The cache is :mod:`m3cli.cache` (owner-only root, entries keyed by the SHA-256 of the source's bytes and
verified file by file before use, symbolic links refused, a damaged entry rebuilt once with a notice); this
module only says how an entry is made.
"""

from __future__ import annotations

import logging
from pathlib import Path

from m3cli.cache import CACHE_ENV, CacheError, cache_root, cached_entry, file_sha256, private_root, source_sha256
from m3cli.gguf.layout import rot180_path
from m3cli.gguf.mmproj import MmprojError, fix_mmproj

log = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "FIX_VERSION", "cache_key", "cache_root", "cached_fixed_mmproj", "file_sha256"]

# Bump when fix_mmproj's output changes, so stale corrected copies are never reused.
FIX_VERSION = 2             # 2: LLaVA-1.6 anyres keys moved under m3cli.anyres.*
_HINT = f"set {CACHE_ENV} to a writable folder of your own or run `m3 convert --fix-mmproj`"


def cache_key(digest: str) -> str:
    """An entry's folder name: the source's content hash and the fix version."""
    return f"{digest[:32]}-v{FIX_VERSION}"


def cached_fixed_mmproj(src: str | Path, root: str | Path | None = None) -> tuple[Path, bool]:
    """The corrected copy of the legacy mmproj ``src`` (plus its rot180 companion) in the cache.

    Returns ``(path, created)``; ``created`` is False when an earlier load already made it and it checked out.
    Raises :class:`MmprojError` (one line) when the cache cannot be used or written.
    """
    src = Path(src).expanduser()
    stem = src.name[: -len(".gguf")] if src.name.endswith(".gguf") else src.name
    main = f"{stem}-fixed.gguf"
    try:
        base = private_root(root, _HINT)
        try:
            digest = source_sha256(src, base)
        except OSError as exc:
            raise MmprojError(f"cannot read {src} ({exc.strerror or exc})") from None

        def build(folder: Path) -> None:
            log.warning("%s has the legacy LLaVA layout (wrong features); writing a corrected copy once into the "
                        "cache %s", src, base)
            fixed = fix_mmproj(src, folder)
            if fixed.name != main or not rot180_path(fixed).is_file():
                raise OSError(f"the fix wrote {fixed.name}, not {main} and its rot180 companion")

        folder, created = cached_entry("mmproj", cache_key(digest), build, root=base, hint=_HINT,
                                       meta={"source_sha256": digest, "fix_version": FIX_VERSION, "main": main},
                                       what=f"corrected copy of {src}")
    except CacheError as exc:
        raise MmprojError(str(exc)) from None
    return folder / main, created
