"""The one cache of m3: every cached file (corrected mmproj copies, converted original checkpoints, anything new)
is made, found and trusted through :func:`cached_entry`.

What is loaded from the cache is trusted no more than the user's own files:

* **The root is the user's alone.** ``$M3_CACHE_DIR``, else the platform's user cache folder
  (:func:`cache_root`). A missing root is created owner-only (0700). An existing folder is never chmodded:
  one that belongs to another user is refused; one that others may write into (a shared group folder such as
  a setgid 2775, or a world-writable one) keeps its mode and m3 keeps its entries in an owner-only subfolder
  ``m3cli-<uid>`` inside it, said once in a warning (:func:`private_root`).
* **Entries are keyed by content.** An entry is the folder ``<root>/<kind>/<key>``; callers make the key from
  the SHA-256 of what the entry is made from (:func:`source_sha256`, remembered per file version in a small
  index), never from names, sizes or times, so nobody can compute the key of a file they cannot read.
* **Entries are verified before use.** Each records (``entry.json``) what it was made from and the SHA-256
  of every file it holds. Before an entry is used, a file whose size, inode, modification or change time
  differs from what was recorded is hashed again; a missing, extra or changed file, a symbolic link
  anywhere in it (the entry itself included), or a foreign owner makes the entry damaged: it is rebuilt once,
  with a one-line notice, and never loaded. A file hashed within two seconds of its last change is not
  remembered by its times (a change in the same timestamp tick would go unseen): it is hashed again next time.
* **Entries appear whole.** Each is built in a temporary folder beside it and renamed into place, so an
  interrupted build leaves nothing half written and two processes racing on one entry both end with a
  complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3cli.errors import ModelError, describe, escape_controls
from m3cli.fileio import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "CacheError", "cache_root", "cached_entry", "entries_root", "file_sha256", "private_root",
           "source_sha256", "verify_entry"]

CACHE_ENV = "M3_CACHE_DIR"
MANIFEST = "entry.json"
MANIFEST_FORMAT = 1
INDEX = "source-hashes.json"  # beside the kind folders, whose only members are entries
MAX_INDEX = 256               # remembered file versions; the oldest are forgotten first
RACY_NS = 2_000_000_000       # a file changed this recently may change again unseen in the same timestamp tick
_CHUNK = 1 << 20
_warned: set[str] = set()


class CacheError(ModelError):
    """The cache cannot be used or written (one line, exit code 2); the message says what to do instead."""


def cache_root() -> Path:
    """``$M3_CACHE_DIR``, else the platform's user cache folder for m3cli (on Linux ``$XDG_CACHE_HOME/m3cli``,
    else ``~/.cache/m3cli``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("m3cli", appauthor=False))


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _own_private_folder(folder: Path, hint: str) -> None:
    """``folder`` (which must exist) is a real folder of this user that nobody else may write into."""
    st = folder.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"the cache folder {folder} is not a folder of its own (a link or a file); {hint}")
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise CacheError(f"the cache folder {folder} belongs to another user (uid {st.st_uid}), who could plant "
                         f"files in it; {hint}")
    if st.st_mode & 0o022:
        raise CacheError(f"the cache folder {folder} is writable by other users (mode {stat.S_IMODE(st.st_mode):03o}); "
                         f"{hint}")


def private_root(root: str | Path | None = None, hint: str = f"set {CACHE_ENV} to a folder of your own") -> Path:
    """The folder m3's entries go in under ``root`` (default :func:`cache_root`), made or checked as the module
    doc says; :class:`CacheError` (one line, ending with ``hint``) when it cannot be used."""
    root = Path(root).expanduser() if root is not None else cache_root()
    try:
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # a racing process made it first: checked below
                root.mkdir(mode=0o700)
            os.chmod(root, 0o700)  # ours, just made: owner-only whatever the umask
        st = root.stat()
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(f"cannot use the cache folder {root} ({describe(exc)}); {hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"the cache {root} is not a folder; {hint}")
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise CacheError(f"the cache folder {root} belongs to another user (uid {st.st_uid}), who could plant "
                         f"files in it; {hint}")
    if not st.st_mode & 0o022:
        return root
    # Shared with a group (2775) or the world: its mode is its owner's choice, never changed here; m3's
    # entries go in a folder of this user's inside it, which nobody else can write into.
    mine = _mine(root)
    try:
        with contextlib.suppress(FileExistsError):
            mine.mkdir(mode=0o700)
            os.chmod(mine, 0o700)
        _own_private_folder(mine, hint)
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(f"cannot use the cache folder {mine} ({describe(exc)}); {hint}") from None
    if str(root) not in _warned:
        _warned.add(str(root))
        log.warning("the cache folder %s is writable by other users (mode %03o, left as it is): keeping m3's "
                    "entries in %s, which only you can write", root, stat.S_IMODE(st.st_mode), mine)
    return mine


def _mine(root: Path) -> Path:
    """This user's owner-only folder inside a shared cache root."""
    uid = _uid()
    return root / f"m3cli-{uid if uid is not None else 'user'}"


def entries_root(root: str | Path | None = None) -> Path | None:
    """Where :func:`private_root` keeps m3's entries under ``root`` (default :func:`cache_root`), when that
    folder exists; None otherwise. It creates, checks and warns nothing: for listings (``m3 models``), never
    for loading an entry (that goes through :func:`cached_entry`)."""
    root = Path(root).expanduser() if root is not None else cache_root()
    try:
        st = root.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if not st.st_mode & 0o022:
        return root
    mine = _mine(root)
    return mine if mine.is_dir() else None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes do (ctime cannot be set back by any user)."""
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _settled(st: os.stat_result) -> bool:
    """Whether a file last changed long enough ago that a later change would show in its times."""
    return time.time_ns() - st.st_ctime_ns > RACY_NS


def source_sha256(src: str | Path, root: Path) -> str:
    """SHA-256 of ``src``: from the root's index when this version of the file (path, size, inode, times) was
    hashed before, else read once and remembered (unless it changed a moment ago)."""
    src = Path(src)
    st = src.stat()
    version = "\0".join([str(src.resolve()), *map(str, _fingerprint(st))])
    index_path = root / INDEX
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
    if not _settled(st):
        return digest
    index.pop(version, None)
    index[version] = digest
    while len(index) > MAX_INDEX:
        index.pop(next(iter(index)))
    try:
        atomic_write_text(index_path, json.dumps(index))
    except OSError as exc:  # only a speed-up: the hash is computed again next time
        log.debug("cannot update the cache index %s: %s", index_path, exc)
    return digest


def _files(folder: Path) -> dict[str, Path] | str:
    """Every file under ``folder`` by its relative name, or why the folder is not a clean entry."""
    out: dict[str, Path] = {}
    for top, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(top) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                return f"{path.relative_to(folder)} is a symbolic link"
            if name in names:
                if not stat.S_ISREG(st.st_mode):
                    return f"{path.relative_to(folder)} is not a regular file"
                out[path.relative_to(folder).as_posix()] = path
    return out


def _record(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a freshly built entry: ``meta`` and each file's SHA-256 (and times, when settled)."""
    files = _files(folder)
    if isinstance(files, str):
        raise OSError(f"the built entry is not clean: {files}")
    entries = {}
    for name, path in sorted(files.items()):
        if name == MANIFEST:
            continue
        st = path.stat()
        entries[name] = {"sha256": file_sha256(path), "seen": _fingerprint(st) if _settled(st) else None}
    return {"format": MANIFEST_FORMAT, "meta": meta, "files": entries}


def verify_entry(folder: Path, meta: dict[str, Any]) -> str | None:
    """Why the entry ``folder`` cannot be used (missing, a link, another owner, made from something else than
    ``meta``, a file missing, extra or changed); None when it checks out. Files that were hashed again and
    matched are remembered in the manifest, so the next check is quick."""
    try:
        st = folder.lstat()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({describe(exc)})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"it belongs to another user (uid {st.st_uid})"
    try:
        files = _files(folder)
        if isinstance(files, str):
            return files
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if MANIFEST in files else None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return "it has no manifest of this m3 version"
        if manifest.get("meta") != meta:
            return "it was made from something else"
        recorded = manifest["files"]
        if set(recorded) != set(files) - {MANIFEST}:
            return "its files are not the ones it recorded"
        changed = False
        for name, info in recorded.items():
            st = files[name].stat()
            if info.get("seen") == _fingerprint(st):
                continue
            if file_sha256(files[name]) != info["sha256"]:
                return f"{name} changed"
            if _settled(st):
                info["seen"] = _fingerprint(st)
                changed = True
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable ({describe(exc)})"
    if changed:
        with contextlib.suppress(OSError):
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return None


def _discard(folder: Path) -> None:
    """Move a damaged entry (or a link in its place) out of the way and delete it; never follows a link."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink()
        return
    trash = Path(tempfile.mkdtemp(prefix=".damaged-", dir=folder.parent))
    os.replace(folder, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def cached_entry(kind: str, key: str, build: Callable[[Path], None], *, meta: dict[str, Any], what: str,
                 root: str | Path | None = None, hint: str = f"set {CACHE_ENV} to a writable folder of your own"
                 ) -> tuple[Path, bool]:
    """The verified cache entry ``<root>/<kind>/<key>``: ``(folder, created)``.

    ``meta`` is what the entry is made from (content hashes, versions; compared on every use), ``build(folder)``
    fills an empty folder with the entry's files, ``what`` names it in messages ("converted copy of X").
    A missing entry is built; a damaged one is rebuilt once, with a one-line notice. Raises
    :class:`CacheError` (one line, ending with ``hint``) when the cache cannot be used or written, or the
    rebuilt entry does not verify.
    """
    base = private_root(root, hint)
    folder = base / kind / key
    why = verify_entry(folder, meta)
    if why is None:
        return folder, False
    if why != "missing":
        log.warning("the cached %s in %s cannot be used (%s): rebuilding it once", what, escape_controls(str(folder)),
                    why)
    try:
        (base / kind).mkdir(mode=0o700, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=base / kind))
        try:
            build(tmp)
            manifest = _record(tmp, meta)
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            _discard(folder)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not folder.is_dir():  # not a racing process's finished entry
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise CacheError(f"cannot write the {what} into the cache {base} ({describe(exc)}); {hint}") from None
    why = verify_entry(folder, meta)
    if why is not None:
        raise CacheError(f"the cache entry {folder} for the {what} does not verify after writing it ({why}); {hint}")
    return folder, True
