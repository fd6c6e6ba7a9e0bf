"""Sources: what the user names (Hub repo, folder, file, URL) as a local checkpoint, and its tensors.

Downloads go through huggingface_hub (its cache) and torch hub (its checkpoint cache, as timm's
``url`` loading does). Offline is detected once per host and :class:`Downloader` (``HF_HUB_OFFLINE``,
or the host's own name not resolving) and then no further network attempt is made there: caches only.
"""
import contextlib
import dataclasses
import hashlib
import json
import re
import socket
import urllib.error
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from timm.models import load_state_dict

from .._offline import host_unreachable_reason, hub_host, hub_offline_mode, url_cache_path
from ..pretrained import load_downstream_registry, load_registry
from .errors import ConversionError, DownloadError, log, one_line

__all__ = ['Downloader', 'Source', 'file_sha256', 'read_state_dict', 'resolve_source']

_URL_TIMEOUT_S = 60
_CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors', '.tar')
_HUB_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')
TRANSFORMERS_WEIGHTS = ('pytorch_model.bin', 'model.safetensors')


@dataclasses.dataclass
class Source:
    """A checkpoint on local disk, with what is known about it."""
    name: str  # as shown to people: Hub repo id, URL, or file / folder name
    weights: Path
    config: Optional[Dict[str, Any]] = None  # config.json beside the weights (transformers or timm)
    entry: Optional[Dict[str, Any]] = None  # the registry entry this source names (by id, URL or file name)
    kind: str = 'file'  # 'hub', 'url', 'folder' or 'file'
    # the published location (registry hf_hub_id or url) the file was fetched from; None for local files
    origin: Optional[str] = None

    @property
    def root(self) -> Path:
        """What the user named on disk: the folder of a folder source, else the weights file."""
        return self.weights.parent if self.kind == 'folder' else self.weights


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks (checkpoints reach 800 MB)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's urlopen sets no timeout; without one a silently dropped connection hangs forever."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class Downloader:
    """Fetches Hub files (huggingface_hub's cache) and URLs (torch hub's cache), failing fast offline.

    Before its first network attempt to a host it checks once whether that host is out of reach:
    ``HF_HUB_OFFLINE`` is set (every host: caches only), or the host's own name does not resolve
    (no DNS, no network; a proxy skips this check). Then every later request to it uses the caches
    only and says why, instead of waiting for retries. Hosts that fail once are not tried again either.
    """

    def __init__(self, log: Callable[[str], None] = log):
        self.log = log
        self._offline: Dict[str, Optional[str]] = {}  # host -> why no network attempt is made (None: online)
        self._unreachable: Dict[str, str] = {}  # host -> why its download failed

    @property
    def known_offline(self) -> Optional[str]:
        """Why there is no network, for the hosts a check already found out of reach (checks nothing)."""
        return '; '.join(dict.fromkeys(r for r in self._offline.values() if r)) or None

    def offline_reason(self, host: Optional[str] = None) -> Optional[str]:
        """Why no network attempt is made to ``host`` (default: the Hub's), checked once per host; None when online."""
        host = host or hub_host()
        if host not in self._offline:
            if hub_offline_mode():
                reason = 'offline (HF_HUB_OFFLINE is set)'
                note = 'using the Hub and torch hub caches only, no download is attempted'
            else:
                reason = f"offline ({why})" if (why := host_unreachable_reason(host)) else None
                note = f"using the cache only for files on {host}, no download is attempted from it"
            if reason and reason not in self._offline.values():
                self.log(f"{reason}: {note}")
            self._offline[host] = reason
        return self._offline[host]

    def hub_file(self, repo_id: str, filename: str) -> Path:
        """Local path of ``filename`` of Hub repo ``repo_id`` (downloaded into the Hub cache)."""
        known_down = self.offline_reason() or self._unreachable.get('hub')
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=bool(known_down)))
        except EntryNotFoundError as err:  # includes LocalEntryNotFoundError (offline, not cached)
            if not isinstance(err, LocalEntryNotFoundError):
                raise DownloadError(f"could not download {repo_id}: it has no file {filename}") from err
            if known_down:
                reason = f"{known_down} and not in the Hub cache"
            elif isinstance(_root_cause(err), OfflineModeIsEnabled):
                reason = 'offline (HF_HUB_OFFLINE is set) and not in the Hub cache'
            else:
                reason = self._unreachable['hub'] = f"offline or Hub unreachable ({one_line(_root_cause(err), 200)})"
            raise DownloadError(f"could not download {repo_id}: {reason}") from err
        except (OSError, ValueError) as err:  # repo not found, gated, HTTP errors, invalid id
            raise DownloadError(f"could not download {repo_id}: {type(err).__name__}: {one_line(err, 300)}") from err

    def url_file(self, url: str) -> Path:
        """Local path of ``url`` (downloaded once into torch hub's checkpoint cache, as timm does)."""
        cached = url_cache_path(url)
        if cached.is_file():
            return cached
        host = urlparse(url).hostname or url
        offline = self.offline_reason(host)
        if offline:
            raise DownloadError(f"could not download {url}: {offline} and not in {cached.parent}")
        if host in self._unreachable:
            raise DownloadError(f"could not download {url}: {self._unreachable[host]}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(_URL_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(cached), progress=True)
        except urllib.error.HTTPError as err:
            raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = self._unreachable[host] = f"offline or {host} unreachable ({one_line(_root_cause(err), 200)})"
            raise DownloadError(f"could not download {url}: {reason}") from err
        return cached


def registry_entry(match: Callable[[Dict[str, Any]], bool]) -> Optional[Dict[str, Any]]:
    """A copy of the first registry entry (classification, then detection / segmentation backbones)
    that ``match`` accepts, or None."""
    return next((dict(e) for e in load_registry() + load_downstream_registry() if match(e)), None)


def url_basename(url: str) -> str:
    """The file name at the end of a URL's path."""
    return Path(urlparse(url).path).name


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(('.', '/', '~')) or spec.count('/') != 1 or spec.endswith(_CHECKPOINT_SUFFIXES)


def resolve_source(spec: str, downloader: Optional[Downloader] = None) -> Source:
    """Turn what the user gave (Hub repo id, folder, file, URL) into a local :class:`Source`."""
    downloader = downloader or Downloader()
    if spec.startswith(('http://', 'https://')):
        entry = registry_entry(lambda e: e.get('url') == spec)
        return Source(spec, downloader.url_file(spec), entry=entry, kind='url', origin=spec if entry else None)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file():
        # named like a published .pth: that registry entry's architecture (not a claim that it is the file)
        entry = registry_entry(lambda e: 'url' in e and url_basename(e['url']) == path.name)
        return Source(path.name, path, entry=entry)
    if _looks_like_path(spec) or not _HUB_REPO_ID.fullmatch(spec):
        raise ConversionError(f"no such file or folder: {spec} (the file does not exist; nor is it a Hub repo id "
                              "or an http(s) URL)")
    try:
        return _hub_source(spec, downloader)
    except DownloadError as err:
        if registry_entry(lambda e: e.get('hf_hub_id') == spec):
            raise
        raise DownloadError(f"{err} (no local file or folder {spec} exists either)") from err


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"could not read {path}: {one_line(err, 200)}") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return config


def _weights_names(config: Dict[str, Any]) -> Tuple[str, ...]:
    # a timm folder (e.g. this tool's output) holds model.safetensors; transformers folders mostly the .bin
    return tuple(reversed(TRANSFORMERS_WEIGHTS)) if 'architecture' in config else TRANSFORMERS_WEIGHTS


def _folder_source(folder: Path) -> Source:
    if not (folder / 'config.json').is_file():
        raise ConversionError(
            f"{folder} has no config.json (a model folder needs config.json and {' or '.join(TRANSFORMERS_WEIGHTS)})")
    config = _read_json(folder / 'config.json')
    weights = next((folder / n for n in _weights_names(config) if (folder / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder} has config.json but no weights ({' or '.join(TRANSFORMERS_WEIGHTS)})")
    return Source(folder.name, weights, config=config, kind='folder')


def _hub_source(repo_id: str, downloader: Downloader) -> Source:
    entry = registry_entry(lambda e: e.get('hf_hub_id') == repo_id)
    if entry is not None:  # the registry knows the architecture and the file; no config needed
        weights = downloader.hub_file(repo_id, entry['hf_hub_filename'])
        return Source(repo_id, weights, entry=entry, kind='hub', origin=repo_id)
    config = _read_json(downloader.hub_file(repo_id, 'config.json'))
    names = _weights_names(config)
    for name in names:
        try:
            return Source(repo_id, downloader.hub_file(repo_id, name), config=config, kind='hub')
        except DownloadError as err:
            if name == names[-1] or 'has no file' not in str(err):
                raise
    raise AssertionError('unreachable')


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (torch or safetensors; ``model`` / ``state_dict`` wrappers unwrapped)."""
    if not Path(path).is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        # weights_only: never run code from a downloaded pickle
        state_dict = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many types for corrupt files
        raise ConversionError(
            f"could not read checkpoint {path} (corrupt, truncated or not a torch / safetensors file): "
            f"{type(err).__name__}: {one_line(err, 300)}") from err
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f"checkpoint {path} holds no state dict (got {type(state_dict).__name__})")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"checkpoint {path} is not a state dict of tensors (e.g. {not_tensors[0]!r})")
    return state_dict
