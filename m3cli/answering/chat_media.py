"""Where a chat request's image may come from, and its decoding: ``data:`` URLs, allowed local files, fetched URLs.

The request parser (:mod:`m3cli.answering.chat_request`) calls :func:`load_picture` with the caller's
:class:`MediaAccess`; the pixels come from :func:`m3cli.media.load_image`, the decoder ``m3 batch`` uses
(formats, EXIF, decompression-bomb limit, one-line errors). Every refusal is a
:class:`~m3cli.answering.chat_request.RequestError` (400) naming the image's place in the request.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from m3cli.errors import M3Error, escape_controls
from m3cli.fileio import escape_surrogates, input_problem

if TYPE_CHECKING:
    from m3cli.media.image import ImageOptions, Picture

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _error(message: str, param: str, code: str):
    from m3cli.answering.chat_request import RequestError

    return RequestError(message, 400, param, code)


@dataclass(frozen=True)
class MediaAccess:
    """Where a request's image may come from besides ``data:`` URLs.

    ``local_dirs``: folders a local path must lie in, after every symlink is resolved (None: any path, as
    ``m3 batch`` reads the user's own files; empty: none). A relative path is taken from the first folder
    (None: the working directory). ``fetch``: reads an ``http(s)`` URL into bytes, raising
    :class:`RequestError` (None: remote images are refused). The hints say how to turn either on.
    """

    local_dirs: tuple[str, ...] | None = ()
    fetch: Callable[[str], bytes] | None = None
    local_hint: str = "start m3 serve with --allowed-media-dir DIR"
    remote_hint: str = "start m3 serve with --allow-remote-media"



def load_picture(url: str, access: MediaAccess, param: str = "image_url.url",
                 options: ImageOptions | None = None) -> tuple[Picture, str]:
    """Decode the image ``url`` names: a ``data:`` URL, an ``http(s)`` URL (through ``access.fetch``) or a local
    path (``file://`` or plain, within ``access.local_dirs``), with ``options`` (None: exactly as the model's
    original code opens images). Returns ``(the decoded Picture, source for the row)``."""
    from m3cli.media import open_image

    load_image = functools.partial(open_image, options=options)

    url = url.strip()
    scheme = _SCHEME.match(url)
    kind = scheme.group(1).lower() if scheme else None
    if kind == "data":
        data, source = _data_url(url, param)
        return _decoded(load_image, data, source, param), source
    if kind in ("http", "https"):
        if access.fetch is None:
            raise _error(f"remote image URLs are off ({access.remote_hint}); send the image as a data: URL",
                               param=param, code="remote_media_disabled")
        return _decoded(load_image, access.fetch(url), url, param), url
    if kind == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _error("a file:// URL must name a local file (file:///path)", param=param,
                               code="invalid_image_url")
        path = unquote(parts.path)
    elif kind is not None and len(kind) > 1:  # one letter: a Windows drive
        raise _error(f"unsupported image URL scheme {kind!r} (use data:, a file path or http(s))",
                           param=param, code="invalid_image_url")
    else:
        path = url
    resolved = _allowed_path(path, access, param)
    return _decoded(load_image, resolved, path, param), path


def _decoded(load_image, what, source: str, param: str):
    try:
        return load_image(what)
    except M3Error as exc:  # MediaError: one line naming the file (or <bytes>)
        text = str(exc)
        if text.startswith("<bytes>: "):
            text = text[len("<bytes>: "):]
        raise _error(f"the image cannot be used: {text}", param=param, code="invalid_image") from None


def _data_url(url: str, param: str) -> tuple[bytes, str]:
    head, comma, payload = url.partition(",")
    if not comma:
        raise _error("a data: URL needs a comma before its data", param=param, code="invalid_image_url")
    meta = head[len("data:"):].split(";")
    mime = meta[0].strip().lower()
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise _error("a data: URL image must be base64 (data:image/png;base64,...)", param=param,
                           code="invalid_image_url")
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        raise _error(f"a data: URL of type {mime!r} is not an image", param=param, code="invalid_image")
    text = re.sub(r"\s+", "", payload)
    if "=" not in text:  # padding left out, as some encoders do
        text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _error("the data: URL is not valid base64", param=param, code="invalid_image") from None
    if not data:
        raise _error("the data: URL holds no data", param=param, code="invalid_image")
    return data, f"data:{mime or 'image'};base64 ({len(data)} bytes)"


def _allowed_path(path: str, access: MediaAccess, param: str) -> str:
    """``path`` resolved, when local paths are allowed, it lies in an allowed folder (checked before the file is
    touched, so a refusal says nothing of whether it exists) and it is a readable regular file: checked by its
    type (:func:`m3cli.fileio.input_problem`) before anything opens it, so a FIFO or a device under an allowed
    folder is a 400, never a request that hangs or reads forever."""
    if access.local_dirs is not None and not access.local_dirs:
        raise _error(f"local image paths are off ({access.local_hint}); send the image as a data: URL",
                           param=param, code="local_media_disabled")
    if not path or "\x00" in path:
        raise _error("an empty or invalid image path", param=param, code="invalid_image_url")
    if access.local_dirs is None:
        return _readable(path, path, param)
    roots = [os.path.realpath(d) for d in access.local_dirs]
    full = os.path.realpath(os.path.join(roots[0], os.path.expanduser(path)))
    for root in roots:
        try:
            inside = os.path.commonpath([root, full]) == root
        except ValueError:  # another drive
            inside = False
        if inside:
            return _readable(full, path, param)
    raise _error("the image path is outside the allowed media folders", param=param,
                       code="media_path_not_allowed")


def _readable(full: str, shown: str, param: str) -> str:
    """``full`` when it can be read as an image file; else a 400 naming the path as the request gave it (never
    the resolved path on the server)."""
    problem = input_problem(full, empty_ok=False)
    if problem is not None:
        raise _error(f"the image {escape_controls(escape_surrogates(shown))}: {problem}", param=param,
                     code="invalid_image")
    return full
