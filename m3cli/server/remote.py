"""``--allow-remote-media``: an ``http(s)`` image URL fetched by the server, within a size and a time limit.

Off by default: a server that fetches URLs its callers name can be steered into the network it sits in.
"""

from __future__ import annotations

import time

from m3cli import __version__
from m3cli.answering.chat_request import RequestError
from m3cli.errors import describe


class RemoteFetcher:
    """``fetch(url) -> bytes``: at most ``max_bytes``, all of it within ``timeout_s`` seconds, or a 400."""

    def __init__(self, max_bytes: int, timeout_s: float, max_redirects: int = 3) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects

    def __call__(self, url: str) -> bytes:
        import httpx

        deadline = time.monotonic() + self.timeout_s
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=True, max_redirects=self.max_redirects,
                              headers={"User-Agent": f"m3cli/{__version__}"}) as client:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise _error(f"the image URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise _error(f"the image URL holds {int(declared)} bytes, over the limit of {self.max_bytes}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > self.max_bytes:
                            raise _error(f"the image URL holds more than the limit of {self.max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise _error(f"the image URL took longer than {self.timeout_s:g} s")
        except httpx.HTTPError as exc:
            raise _error(f"cannot fetch the image URL ({type(exc).__name__}: {describe(exc)})") from None
        if not data:
            raise _error("the image URL returned no data")
        return bytes(data)


def _error(message: str) -> RequestError:
    return RequestError(message, 400, "image_url.url", "remote_media_error")
