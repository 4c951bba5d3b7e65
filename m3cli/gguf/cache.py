"""Corrected copies of third-party (legacy-layout) mmproj files, made once into a user cache.

llama.cpp's legacy LLaVA converter writes mmproj files whose features are wrong on every build (L-1
blocks, natural position order; see docs/gguf.md). ``m3 convert --fix-mmproj`` rewrites one explicitly;
the llama.cpp backend calls :func:`cached_fixed_mmproj` so that such a file also just works: the first
load writes the corrected pair into the cache, later loads reuse it, and the user's file is only read.

What is loaded from the cache is trusted no more than the user's own file:

* the cache root is the user's alone: created 0700; an existing root that other users may write is made
  0700 (one warning line), and one owned by another user is refused;
* an entry is keyed by the CONTENT of the source file (SHA-256 of its bytes), so nobody can compute the key
  of a file they cannot read; the hash is computed once per file version and remembered in a small index
  by (path, size, mtime, inode, ctime);
* each entry records the SHA-256 of the source it was made from and of every file it holds, and is checked
  against them before use: a damaged or planted entry is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import platformdirs

from m3cli.fileio import atomic_dir, atomic_write_text
from m3cli.gguf.layout import rot180_path
from m3cli.gguf.mmproj import MmprojError, fix_mmproj

log = logging.getLogger(__name__)

CACHE_ENV = "M3_CACHE_DIR"
# Bump when fix_mmproj's output changes, so stale corrected copies are never reused.
FIX_VERSION = 2             # 2: LLaVA-1.6 anyres keys moved under m3cli.anyres.*
MANIFEST = "entry.json"
INDEX = "source-hashes.json"  # beside the mmproj/ folder, whose only members are entries
MAX_INDEX = 256               # remembered file versions; the oldest are forgotten first
_CHUNK = 1 << 20


def cache_root() -> Path:
    """``$M3_CACHE_DIR``, else the platform's user cache folder for m3cli (on Linux ``$XDG_CACHE_HOME/m3cli``,
    else ``~/.cache/m3cli``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("m3cli", appauthor=False))


def private_root(root: Path) -> Path:
    """``root``, created owner-only (0700) if missing; refused (MmprojError) when another user owns it, and
    made 0700 (with one warning) when other users could write into it."""
    hint = f"set {CACHE_ENV} to a folder of your own or run `m3 convert --fix-mmproj`"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.stat()
    except OSError as exc:
        raise MmprojError(f"cannot use the cache folder {root} ({exc.strerror or exc}); {hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MmprojError(f"the cache {root} is not a folder; {hint}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise MmprojError(f"the cache folder {root} belongs to another user (uid {st.st_uid}), who could plant "
                          f"files in it; {hint}")
    if st.st_mode & 0o077:
        try:
            os.chmod(root, 0o700)
        except OSError as exc:
            raise MmprojError(f"cannot make the cache folder {root} private ({exc.strerror or exc}); {hint}") from None
        log.warning("the cache folder %s was open to other users (mode %03o): made it private (0700)",
                    root, stat.S_IMODE(st.st_mode))
    return root


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _version(src: Path) -> str:
    """What identifies one version of a file without reading it (the index's key)."""
    st = src.stat()
    return f"{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def source_sha256(src: Path, root: Path) -> str:
    """SHA-256 of ``src``: from the root's index when this version of the file was hashed before, else read
    once and remembered."""
    index_path = root / INDEX
    version = _version(src)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    known = index.get(version)
    if isinstance(known, str) and len(known) == 64:
        return known
    digest = file_sha256(src)
    index.pop(version, None)
    index[version] = digest
    while len(index) > MAX_INDEX:
        index.pop(next(iter(index)))
    try:
        atomic_write_text(index_path, json.dumps(index))
    except OSError as exc:  # only a speed-up: the hash is computed again next time
        log.debug("cannot update the cache index %s: %s", index_path, exc)
    return digest


def cache_key(digest: str) -> str:
    """An entry's folder name: the source's content hash and the fix version."""
    return f"{digest[:32]}-v{FIX_VERSION}"


def _entry_ok(folder: Path, main: Path, digest: str) -> bool:
    """Whether ``folder`` is a complete entry made from the source with hash ``digest``, its files intact."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("source_sha256") != digest or manifest.get("fix_version") != FIX_VERSION:
            return False
        names = {main.name, rot180_path(main).name}
        if set(files) != names:
            return False
        return all(file_sha256(folder / name) == files[name] for name in names)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_fixed_mmproj(src: str | Path, root: str | Path | None = None) -> tuple[Path, bool]:
    """The corrected copy of the legacy mmproj ``src`` (plus its rot180 companion) in the cache.

    Returns ``(path, created)``; ``created`` is False when an earlier load already made it and it checked out.
    The copy is written into a temporary folder and renamed into place, so an interrupted fix leaves nothing
    half written and two processes racing on the same file both end with a complete copy.
    Raises :class:`MmprojError` (one line) when the cache cannot be used or written.
    """
    src = Path(src).expanduser()
    stem = src.name[: -len(".gguf")] if src.name.endswith(".gguf") else src.name
    base = private_root(Path(root).expanduser() if root is not None else cache_root())
    try:
        digest = source_sha256(src, base)
    except OSError as exc:
        raise MmprojError(f"cannot read {src} ({exc.strerror or exc})") from None
    folder = base / "mmproj" / cache_key(digest)
    main = folder / f"{stem}-fixed.gguf"
    if _entry_ok(folder, main, digest):
        return main, False
    if folder.exists():
        log.warning("the cached copy in %s does not match %s (damaged or not made by m3): rebuilding it", folder, src)
    try:
        with atomic_dir(folder, prefix=".partial-") as tmp:
            log.warning("%s has the legacy LLaVA layout (wrong features); writing a corrected copy once into %s",
                        src, folder)
            fixed = fix_mmproj(src, tmp)
            names = [fixed.name, rot180_path(fixed).name]
            manifest = {"source": str(src.resolve()), "source_sha256": digest, "fix_version": FIX_VERSION,
                        "files": {name: file_sha256(tmp / name) for name in names}}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if folder.exists():  # a damaged or foreign entry: replace it, never load it
                shutil.rmtree(folder, ignore_errors=True)
    except OSError as exc:
        raise MmprojError(f"cannot write a corrected copy of {src} into the cache {base} ({exc.strerror or exc}); "
                          f"set {CACHE_ENV} to a writable folder or run `m3 convert --fix-mmproj`") from None
    if not _entry_ok(folder, main, digest):  # a racing process left something else there
        raise MmprojError(f"the cache entry {folder} for {src} could not be verified after writing it; "
                          f"set {CACHE_ENV} to another folder or run `m3 convert --fix-mmproj`")
    return main, True
