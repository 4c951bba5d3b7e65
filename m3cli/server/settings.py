"""What ``m3 serve``'s flags set: where it listens, who may call it, its default policy, its limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from m3cli.answering.chat_request import MAX_REQUEST_BYTES, ChatDefaults, MediaAccess
from m3cli.answering.core import DEFAULT_MAX_QUESTION_CHARS
from m3cli.errors import UsageError

API_KEY_ENV = "M3_API_KEY"   # the key, for m3 serve and for m3 ask --server, when --api-key is not given
MB = 1 << 20


@dataclass
class ServerSettings:
    """Everything a server run needs besides the model (``open_backend``'s keyword arguments)."""

    host: str = "127.0.0.1"
    port: int = 8000                       # 0: any free port (the ready line names it)
    api_key: str | None = None             # requests need "Authorization: Bearer KEY" when set
    served_name: str | None = None         # the model name clients send (default: the model's own name)
    defaults: ChatDefaults = field(default_factory=ChatDefaults)
    media_dirs: tuple[str, ...] = ()       # --allowed-media-dir: local image paths under these only
    remote_media: bool = False             # --allow-remote-media: http(s) image URLs fetched by the server
    remote_max_bytes: int = 20 * MB
    remote_timeout_s: float = 10.0
    max_queue: int = 64                    # requests waiting for the model; one more is a 429
    max_batch: int = 8                     # requests answered together in one model batch
    max_body_bytes: int = MAX_REQUEST_BYTES  # a larger body is a 413
    request_timeout_s: float = 300.0       # a request still unanswered after this is a 504 (its work dropped)
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS

    def check(self) -> None:
        """Raise :class:`UsageError` for settings that cannot work (checked before the model loads)."""
        for folder in self.media_dirs:
            if not os.path.isdir(folder):
                raise UsageError(f"--allowed-media-dir {folder}: not a folder")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError(f"--api-key (or ${API_KEY_ENV}) is empty")

    @property
    def loopback(self) -> bool:
        """Whether the server listens on this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def media_access(self) -> MediaAccess:
        """The parser's :class:`MediaAccess` for these settings."""
        fetch = None
        if self.remote_media:
            from m3cli.server.remote import RemoteFetcher

            fetch = RemoteFetcher(self.remote_max_bytes, self.remote_timeout_s)
        return MediaAccess(local_dirs=tuple(os.path.realpath(d) for d in self.media_dirs), fetch=fetch)
