"""Hugging Face hub ids (``owner/name``): the local cache first, then a download that fails fast.

A model or vision tower named by hub id is looked up in the local Hugging Face cache without any network
access. Only when it is not there is the hub contacted, and first with a short TCP probe of the endpoint
(``M3_HUB_PROBE_TIMEOUT`` seconds, default 3), so an unreachable hub is one line within seconds instead of
huggingface_hub's minutes of retries. Downloads come in two steps: the small files first (configs, tokenizer,
chat template), so a model m3 cannot run is refused before its weights are fetched, then the weights.

huggingface_hub's own log lines (retries, warnings) are shown only with ``-v`` and only once: its library
logger's private handler is removed so that they go through m3's logging alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from m3cli.errors import ModelError, describe

log = logging.getLogger(__name__)

PROBE_TIMEOUT_ENV = "M3_HUB_PROBE_TIMEOUT"
DEFAULT_PROBE_TIMEOUT = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# What a model needs besides its weights (configs, tokenizer, template, processor).
META_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class HubError(ModelError):
    """A hub id that cannot be found in the cache or fetched (one line, with what to do)."""


def looks_like_hub_id(value: str) -> bool:
    """``owner/name`` that is not an existing path (a relative path like ``models/x`` that exists is local)."""
    text = str(value)
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        return False
    try:
        return not Path(text).exists()
    except OSError:
        return True


def offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value (read now, not at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true"):
            return True
    return False


def endpoint() -> str:
    """The hub endpoint: ``HF_ENDPOINT`` (read now), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE`` (or ``$HF_HOME/hub``) read now; None: huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot folder of ``repo_id`` (its ``main`` revision), or None. No network."""
    with quiet_hub():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache_dir()))
        except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or an unusable cache entry
            return None


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds complete weights: every shard its index lists, or a single weights file."""
    import json

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if path.is_file():
            try:
                shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def probe(url: str | None = None, timeout: float | None = None) -> None:
    """A TCP connect to the endpoint's host and port within ``timeout`` seconds; :class:`HubError` if it fails."""
    url = url or endpoint()
    if timeout is None:
        try:
            timeout = float(os.environ.get(PROBE_TIMEOUT_ENV) or DEFAULT_PROBE_TIMEOUT)
        except ValueError:
            timeout = DEFAULT_PROBE_TIMEOUT
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise HubError(f"HF_ENDPOINT {url!r} is not a URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else describe(exc)
        raise HubError(f"cannot reach the Hugging Face hub at {url} ({reason})") from None


def fetch(repo_id: str, *, what: str = "model", weights: bool = True, allow_download: bool = True) -> Path:
    """A local folder holding ``repo_id``: the cached snapshot, or one downloaded now.

    ``weights=False`` fetches only the small files (enough to detect the model's family); a later call with
    ``weights=True`` completes the same snapshot. Raises :class:`HubError` in one line: not cached and
    offline, hub unreachable (within a few seconds), repository missing or gated.
    """
    cached = cached_snapshot(repo_id)
    if cached is not None and (not weights or has_weights(cached)):
        return cached
    state = "not in the local Hugging Face cache" if cached is None else "only partly in the local Hugging Face cache"
    if not allow_download:
        raise HubError(f"{what} {repo_id} is {state}")
    if offline():
        raise HubError(f"{what} {repo_id} is {state} and HF_HUB_OFFLINE is set; download it first "
                       "(huggingface-cli download) or pass a local directory")
    try:
        probe()
    except HubError as exc:
        raise HubError(f"{what} {repo_id} is {state} and {exc}; set HF_HUB_OFFLINE=1 to use only cached "
                       "models, or pass a local directory") from None
    return _download(repo_id, what=what, weights=weights)


def _download(repo_id: str, *, what: str, weights: bool) -> Path:
    patterns = list(META_PATTERNS)
    with quiet_hub():
        from huggingface_hub import HfApi, snapshot_download

        try:
            if weights:
                files = HfApi(endpoint=endpoint()).list_repo_files(repo_id)
                safetensors = any(f.endswith(".safetensors") for f in files)
                patterns += WEIGHT_PATTERNS if safetensors else BIN_PATTERNS
            log.warning("downloading %s %s from %s%s", what, repo_id, endpoint(),
                        "" if weights else " (configuration files first)")
            return Path(snapshot_download(repo_id, allow_patterns=patterns, endpoint=endpoint(), etag_timeout=10,
                                          cache_dir=hub_cache_dir()))
        except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
            raise HubError(f"cannot download {what} {repo_id}: {_hub_reason(exc)}") from None


def _hub_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "RepositoryNotFoundError":
        return "no such repository (or it is private: log in with `huggingface-cli login`)"
    if name == "GatedRepoError":
        return "the repository is gated: accept its terms on the hub and log in with `huggingface-cli login`"
    if name == "RevisionNotFoundError":
        return "no such revision"
    return f"{name}: {describe(exc)}"


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's log lines through m3's logging only, and at ERROR unless ``-v``."""
    tame_hub_logging()
    yield


def tame_hub_logging() -> None:
    """Remove huggingface_hub's private stderr handler (its lines would print twice) and apply m3's level.

    huggingface_hub adds that handler, and sets its level, when it is first imported, which can be after
    ``m3cli.logs.configure`` ran; so this is applied again right before each hub call.
    """
    import huggingface_hub  # noqa: F401 - importing it installs the handler this removes

    from m3cli import logs

    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)
    level = {0: logging.ERROR, 1: logging.WARNING}.get(logs.verbosity(), logging.DEBUG)
    hub_logger.setLevel(level)
