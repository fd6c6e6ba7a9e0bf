"""Is the host of the weights (the Hugging Face Hub, or a URL's own host) reachable? Decided fast
and once per host and process.

Offline, huggingface_hub retries each failed request with back-off (about 25 s per file, and timm
asks for two files), so an offline ``pretrained=True`` took about a minute to say the weights are
missing, and a cached file was only used after the same wait. One name look-up with a short
timeout tells us up front; then a cached file (Hub cache, or torch hub's checkpoint cache for
URLs) is used directly and a missing one fails at once.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

__all__ = [
    "hub_offline_mode", "hub_host", "host_unreachable_reason", "hub_unreachable_reason", "url_unreachable_reason",
    "cached_hub_file", "url_cache_path",
]

LOOKUP_TIMEOUT_S = 2.0
# with a proxy, names are resolved by the proxy: a local look-up failure proves nothing
_PROXY_ENV_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_offline_mode() -> bool:
    """True when huggingface_hub runs in offline mode (``HF_HUB_OFFLINE=1`` at its import)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_host() -> str:
    """Host name of the Hugging Face Hub endpoint (``HF_ENDPOINT``, by default huggingface.co)."""
    from huggingface_hub import constants

    return urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@functools.lru_cache(maxsize=None)
def _lookup_failure(host: str) -> Optional[str]:
    """Why ``host`` does not resolve within LOOKUP_TIMEOUT_S, or None when it does (cached)."""
    outcome = {}

    def lookup():
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err

    # getaddrinfo has no timeout of its own; a daemon thread never blocks interpreter exit
    worker = threading.Thread(target=lookup, name="timm-nat-hub-lookup", daemon=True)
    worker.start()
    worker.join(LOOKUP_TIMEOUT_S)
    if outcome.get("ok"):
        return None
    if "error" in outcome:
        return f"{host} does not resolve ({outcome['error']})"
    return f"{host} did not resolve within {LOOKUP_TIMEOUT_S:g} s"


def host_unreachable_reason(host: str) -> Optional[str]:
    """Why this process has no network path to ``host``, or None when it may have one.

    Only a failed name look-up counts (checked once per host and process). Offline mode set by
    the user is not a reason here: callers then read their caches without network requests.
    """
    if hub_offline_mode() or any(os.environ.get(v) for v in _PROXY_ENV_VARS):
        return None
    return _lookup_failure(host)


def hub_unreachable_reason() -> Optional[str]:
    """Why this process has no network path to the Hub, or None when it may have one."""
    return host_unreachable_reason(hub_host())


def url_unreachable_reason(url: str) -> Optional[str]:
    """Why this process has no network path to ``url``'s own host, or None when it may have one."""
    return host_unreachable_reason(urlparse(url).hostname or url)


def url_cache_path(url: str, model_dir: Optional[str] = None) -> Path:
    """Where torch hub (and so timm's ``url`` loading) caches ``url``: ``<torch hub dir>/checkpoints/<file name>``,
    or ``model_dir/<file name>`` when given."""
    import torch

    folder = Path(model_dir) if model_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / Path(urlparse(url).path).name


def cached_hub_file(hf_hub_id: str, filenames) -> Optional[str]:
    """Path of the first of ``filenames`` present in the local Hub cache for ``hf_hub_id``
    (``repo`` or ``repo@revision``), or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(path, str):  # None: unknown; a sentinel object: known to be absent
            return path
    return None
