"""A bounded cache of image encodings by file identity, so an image asked several questions is encoded once.

Shared by ``m3 batch`` (several ``-q``, stdin rows about the same image) and ``m3 eval --data`` (several
questions per image). An encoding is backend-owned storage (the projected grid, on the model's device), so
the cache holds the ``capacity`` most recently used ones and drops the oldest. Keys are whatever the caller
says names the pixels: for a file, :func:`file_identity` (a changed file is a new image).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cache only stores encodings; it never needs the backend layer at run time
    from m3cli.backends.base import Encoded

DEFAULT_CACHE = 64  # encodings kept across batches (LLaVA-7B fp16: ~4.7 MB each)


def file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """A file's identity: (resolved path, size, mtime in ns); None when it cannot be stat'ed (loading says why).

    Symlinks and ``..`` are followed, so two names of one file share an encoding; a file rewritten in place
    gets a new identity.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        return None
    return os.path.realpath(os.fspath(path)), st.st_size, st.st_mtime_ns


class EncodeCache:
    """The ``capacity`` most recently used encodings by image key (0: nothing is kept).

    ``hits`` counts lookups served from the cache and ``encodes`` the images the caller encoded (it adds to
    it), so a run can report how many encodes sharing saved. Used from one thread.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE) -> None:
        self.capacity = max(0, capacity)
        self._items: OrderedDict[Hashable, Encoded] = OrderedDict()
        self.hits = 0
        self.encodes = 0  # images encoded by the backend

    def get(self, key: Hashable | None) -> Encoded | None:
        """The encoding cached under ``key`` (now the most recently used), or None."""
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key]

    def put(self, key: Hashable | None, encoded: Encoded) -> None:
        """Keep ``encoded`` under ``key`` (a None key or a zero capacity keeps nothing)."""
        if key is None or not self.capacity:
            return
        self._items[key] = encoded
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
