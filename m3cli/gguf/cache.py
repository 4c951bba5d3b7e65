"""Corrected copies of third-party (legacy-layout) mmproj files, made once into a user cache.

llama.cpp's legacy LLaVA converter writes mmproj files whose features are wrong on every build (L-1
blocks, natural position order; see docs/gguf.md). ``m3 convert --fix-mmproj`` rewrites one explicitly;
the llama.cpp backend calls :func:`cached_fixed_mmproj` so that such a file also just works: the first
load writes the corrected pair into the cache, later loads reuse it, and the user's file is only read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import platformdirs

from m3cli.fileio import atomic_dir
from m3cli.gguf.layout import rot180_path
from m3cli.gguf.mmproj import MmprojError, fix_mmproj

log = logging.getLogger(__name__)

CACHE_ENV = "M3_CACHE_DIR"
# Bump when fix_mmproj's output changes, so stale corrected copies are never reused.
FIX_VERSION = 1


def cache_root() -> Path:
    """``$M3_CACHE_DIR``, else the platform's user cache folder for m3cli (on Linux ``$XDG_CACHE_HOME/m3cli``,
    else ``~/.cache/m3cli``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("m3cli", appauthor=False))


def cache_key(src: Path) -> str:
    """Identifies one version of one file: its resolved path, size and modification time."""
    st = src.stat()
    text = f"v{FIX_VERSION}\0{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_fixed_mmproj(src: str | Path, root: str | Path | None = None) -> tuple[Path, bool]:
    """The corrected copy of the legacy mmproj ``src`` (plus its rot180 companion) in the cache.

    Returns ``(path, created)``; ``created`` is False when an earlier load already made it. The copy is
    written into a temporary folder and renamed into place, so an interrupted fix leaves nothing half
    written and two processes racing on the same file both end with a complete copy.
    Raises :class:`MmprojError` (one line) when the cache cannot be written.
    """
    src = Path(src).expanduser()
    stem = src.name[: -len(".gguf")] if src.name.endswith(".gguf") else src.name
    base = Path(root).expanduser() if root is not None else cache_root()
    folder = base / "mmproj" / cache_key(src)
    main = folder / f"{stem}-fixed.gguf"
    if main.is_file() and rot180_path(main).is_file():
        return main, False
    try:
        with atomic_dir(folder, prefix=".partial-") as tmp:
            log.warning("%s has the legacy LLaVA layout (wrong features); writing a corrected copy once into %s",
                        src, folder)
            fix_mmproj(src, tmp)
            if folder.exists() and not main.is_file():  # a damaged earlier copy: replace it
                shutil.rmtree(folder, ignore_errors=True)
    except OSError as exc:
        raise MmprojError(f"cannot write a corrected copy of {src} into the cache {base} ({exc.strerror or exc}); "
                          f"set {CACHE_ENV} to a writable folder or run `m3 convert --fix-mmproj`") from None
    return main, True
