"""Convert published NAT / DiNAT / DiNAT_s / isotropic checkpoints into verified timm model folders.

A source is a Hugging Face Hub repo id (transformers layout, e.g. ``shi-labs/dinat-mini-in1k-224``),
a local folder (``config.json`` + ``pytorch_model.bin`` / ``model.safetensors``), or an original
``.pth`` (path or URL). The output folder holds what timm's ``local-dir:`` / ``hf-hub:`` loading reads:
timm-named ``model.safetensors``, timm's ``config.json`` (written by ``timm.models.save_for_hf``) and a
model card. Every conversion is verified: the source through the model family's
``checkpoint_filter_fn`` and the converted folder through timm's public loading paths must give
identical outputs (max abs diff exactly 0.0), or the command fails.

    timm-nat-convert shi-labs/dinat-mini-in1k-224 -o out/dinat_mini.in1k
    timm-nat-convert nat_tiny_custom.pth -o out/nat --model nat_mini --model-args '{"depths": [2, 2, 6, 2]}'
    timm-nat-convert --all --output-dir out          # every registry entry (exit 3: some only checked offline)

Model families are found through timm's registry (any architecture registered from ``timm_nat.models``
and its module's ``checkpoint_filter_fn``), so a new family is covered once it is registered.
"""
import argparse
import contextlib
import dataclasses
import fnmatch
import functools
import json
import os
import re
import shutil
import socket
import sys
import urllib.error
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import HfApi, hf_hub_download, is_offline_mode
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from timm.models import get_pretrained_cfg, load_state_dict, model_entrypoint, save_for_hf

from . import models as _models  # noqa: F401  (registers the architectures)
from .pretrained import load_registry, published_summary, registry_entry_name

__all__ = [
    'Architecture', 'Conversion', 'ConversionError', 'DownloadError', 'Downloader', 'Source',
    'convert', 'convert_all', 'convert_source', 'infer_architecture', 'main', 'push_to_hub',
    'read_state_dict', 'resolve_source', 'timm_nat_architectures',
]

PROG = 'timm-nat-convert'
WEIGHTS_NAME = 'model.safetensors'
DEFAULT_VERIFY_SIZE = 96  # small input: identical weights give identical outputs at any size
ALL_VERIFY_SIZE = 64  # --all: 25 models, some 200M parameters, on a CPU
_URL_TIMEOUT_S = 60
_CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors', '.tar')
_HUB_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')
_TRANSFORMERS_WEIGHTS = ('pytorch_model.bin', 'model.safetensors')
# transformers model_type -> the registered architecture that carries that family's conventions
_TRANSFORMERS_MODEL_TYPES = {'nat': 'nat_mini', 'dinat': 'dinat_mini'}
_PAPERS = {
    '2204.07143': 'Neighborhood Attention Transformer',
    '2209.15001': 'Dilated Neighborhood Attention Transformer',
}
# Published parameter counts are whole millions, to 2-3 significant figures and not always rounded
# (200M for 200.9M and 201.1M, 86M for 86.6M, 28M for 28.3M): allow 1M or 1%, whichever is larger.
PARAMS_TOL_M, PARAMS_RTOL = 1.0, 0.01


class ConversionError(Exception):
    """An expected failure; the command line prints its message on one line and exits non-zero."""


class DownloadError(ConversionError):
    """A source that could not be downloaded (offline, unreachable, not found)."""


class _Misfit(Exception):
    """A checkpoint does not fit one candidate architecture (the message says why)."""


def _log(message: str) -> None:
    print(message, flush=True)


def _one_line(text: str, limit: int = 600) -> str:
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


# ----------------------------------------------------------------------------------------------
# Sources: Hub repo, local folder, local file, URL
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """A checkpoint on local disk, with what is known about it."""
    name: str  # as shown to people: Hub repo id, URL, or file / folder name
    weights: Path
    config: Optional[Dict[str, Any]] = None  # config.json beside the weights (transformers or timm)
    entry: Optional[Dict[str, Any]] = None  # the registry entry this file is, when the source says so
    kind: str = 'file'  # 'hub', 'url', 'folder' or 'file'


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


class Downloader:
    """Fetches Hub files (huggingface_hub's cache and progress bars) and URLs (torch hub cache,
    progress bar). Remembers unreachable hosts, so a batch fails fast offline; cached files are
    still used then."""

    def __init__(self):
        self._unreachable: Dict[str, str] = {}  # host -> why

    def hub_file(self, repo_id: str, filename: str) -> Path:
        """Local path of ``filename`` of Hub repo ``repo_id`` (downloaded into the Hub cache)."""
        known_down = self._unreachable.get('hub')
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=bool(known_down)))
        except EntryNotFoundError as err:  # includes LocalEntryNotFoundError (offline, not cached)
            if not isinstance(err, LocalEntryNotFoundError):
                raise DownloadError(f"could not download {repo_id}: it has no file {filename}") from err
            if known_down:
                reason = known_down
            elif isinstance(_root_cause(err), OfflineModeIsEnabled):
                reason = 'offline (HF_HUB_OFFLINE=1) and not in the Hub cache'
            else:
                reason = self._unreachable['hub'] = f"offline or Hub unreachable ({_one_line(_root_cause(err), 200)})"
            raise DownloadError(f"could not download {repo_id}: {reason}") from err
        except (OSError, ValueError) as err:  # repo not found, gated, HTTP errors, invalid id
            raise DownloadError(f"could not download {repo_id}: {type(err).__name__}: {_one_line(err, 300)}") from err

    def url_file(self, url: str) -> Path:
        """Local path of ``url`` (downloaded once into torch hub's checkpoint cache, as timm does)."""
        cached = Path(torch.hub.get_dir()) / 'checkpoints' / Path(urlparse(url).path).name
        if cached.is_file():
            return cached
        host = urlparse(url).netloc
        if is_offline_mode():  # HF_HUB_OFFLINE=1: caches only, for URLs too
            raise DownloadError(f"could not download {url}: offline (HF_HUB_OFFLINE=1) and not in {cached.parent}")
        if host in self._unreachable:
            raise DownloadError(f"could not download {url}: {self._unreachable[host]}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(_URL_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(cached), progress=True)
        except urllib.error.HTTPError as err:
            raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            reason = self._unreachable[host] = f"offline or {host} unreachable ({_one_line(_root_cause(err), 200)})"
            raise DownloadError(f"could not download {url}: {reason}") from err
        return cached


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's urlopen sets no timeout; without one a silently dropped connection hangs forever."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _registry_entry(match: Callable[[Dict[str, Any]], bool]) -> Optional[Dict[str, Any]]:
    return next((dict(e) for e in load_registry() if match(e)), None)


def _url_basename(url: str) -> str:
    return Path(urlparse(url).path).name


def resolve_source(spec: str, downloader: Optional[Downloader] = None) -> Source:
    """Turn what the user gave (Hub repo id, folder, file, URL) into a local :class:`Source`."""
    downloader = downloader or Downloader()
    if spec.startswith(('http://', 'https://')):
        entry = _registry_entry(lambda e: e.get('url') == spec)
        return Source(spec, downloader.url_file(spec), entry=entry, kind='url')
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file():
        # a published .pth under its published name is that registry entry
        entry = _registry_entry(lambda e: 'url' in e and _url_basename(e['url']) == path.name)
        return Source(path.name, path, entry=entry)
    if _HUB_REPO_ID.fullmatch(spec) and not spec.endswith(_CHECKPOINT_SUFFIXES):
        return _hub_source(spec, downloader)
    raise ConversionError(f"no such file or folder: {spec} (nor a Hub repo id or an http(s) URL)")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"could not read {path}: {_one_line(err, 200)}") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return config


def _weights_names(config: Dict[str, Any]) -> Tuple[str, ...]:
    # a timm folder (e.g. this tool's output) holds model.safetensors; transformers folders mostly the .bin
    return tuple(reversed(_TRANSFORMERS_WEIGHTS)) if 'architecture' in config else _TRANSFORMERS_WEIGHTS


def _folder_source(folder: Path) -> Source:
    if not (folder / 'config.json').is_file():
        raise ConversionError(
            f"{folder} has no config.json (a model folder needs config.json and {' or '.join(_TRANSFORMERS_WEIGHTS)})")
    config = _read_json(folder / 'config.json')
    weights = next((folder / n for n in _weights_names(config) if (folder / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder} has config.json but no weights ({' or '.join(_TRANSFORMERS_WEIGHTS)})")
    return Source(folder.name, weights, config=config, kind='folder')


def _hub_source(repo_id: str, downloader: Downloader) -> Source:
    entry = _registry_entry(lambda e: e.get('hf_hub_id') == repo_id)
    if entry is not None:  # the registry knows the architecture and the file; no config needed
        weights = downloader.hub_file(repo_id, entry['hf_hub_filename'])
        return Source(repo_id, weights, entry=entry, kind='hub')
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
    try:
        # weights_only: never run code from a downloaded pickle
        state_dict = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many types for corrupt files
        raise ConversionError(
            f"could not read checkpoint {path} (corrupt, truncated or not a torch / safetensors file): "
            f"{type(err).__name__}: {_one_line(err, 300)}") from err
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f"checkpoint {path} holds no state dict (got {type(state_dict).__name__})")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"checkpoint {path} is not a state dict of tensors (e.g. {not_tensors[0]!r})")
    return state_dict


# ----------------------------------------------------------------------------------------------
# Architectures: which registered model (and kwargs) a checkpoint is
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Architecture:
    """A registered architecture, the non-default kwargs it needs, and the checkpoint's classes."""
    model: str
    model_args: Dict[str, Any]
    num_classes: int
    entry: Optional[Dict[str, Any]] = None  # registry entry (published facts), when known

    @property
    def name(self) -> str:
        """``arch.tag`` for a registry entry, else the architecture."""
        return registry_entry_name(self.entry) if self.entry else self.model

    def describe(self) -> str:
        """One line for people."""
        text = self.model + (f" with model_args {json.dumps(self.model_args)}" if self.model_args else '')
        text += f", {self.num_classes} classes"
        return text + (f" (registry entry {self.name})" if self.entry else '')


def timm_nat_architectures() -> List[str]:
    """Every architecture registered with timm by a ``timm_nat.models`` module."""
    return [m for m in timm.list_models() if model_entrypoint(m).__module__.startswith('timm_nat.models.')]


def _family_module(arch: str):
    return sys.modules[model_entrypoint(arch).__module__]


def _family(arch: str) -> str:
    return model_entrypoint(arch).__module__.rsplit('.', 1)[-1]


@functools.lru_cache(maxsize=256)
def _meta_model_cached(arch: str, kwargs_json: str) -> torch.nn.Module:
    return timm.create_model(arch, device='meta', **json.loads(kwargs_json))


def _meta_model(arch: str, **kwargs) -> torch.nn.Module:
    """The architecture with no storage (cheap): for layouts, shapes and parameter counts."""
    try:
        return _meta_model_cached(arch, json.dumps(kwargs, sort_keys=True))
    except (ValueError, TypeError, AssertionError, KeyError, RuntimeError, NotImplementedError) as err:
        raise _Misfit(f"{arch} cannot be built with {json.dumps(kwargs)}: {_one_line(err, 300)}") from err


def _shape_problems(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> List[str]:
    expected = model.state_dict()
    problems = [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"missing {k}" for k in expected if k not in state_dict]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    return problems


def _fit(arch: str, kwargs: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> int:
    """Number of classes if ``state_dict`` loads strictly into ``arch(**kwargs)``; raises _Misfit otherwise."""
    model = _meta_model(arch, **kwargs)
    try:
        with warnings.catch_warnings():  # misfitting candidates may warn while resizing tables they then reject
            warnings.simplefilter('ignore')
            converted = _family_module(arch).checkpoint_filter_fn(dict(state_dict), model)
    except (RuntimeError, KeyError, ValueError) as err:
        raise _Misfit(f"{arch}: {_one_line(err, 400)}") from err
    classifier = model.pretrained_cfg.get('classifier') or 'head.fc'
    head = converted.get(f'{classifier}.weight')
    num_classes = head.shape[0] if head is not None else 0
    problems = _shape_problems(converted, _meta_model(arch, **dict(kwargs, num_classes=num_classes)))
    if problems:
        raise _Misfit(f"{arch}: {len(problems)} problem(s): {'; '.join(problems)}")
    return num_classes


def _signature(arch: str, kwargs: Dict[str, Any], num_classes: int) -> Tuple[str, Tuple]:
    """What makes two configurations the same network: module tree (kernel sizes, dilations) and shapes."""
    model = _meta_model(arch, **dict(kwargs, num_classes=num_classes))
    return repr(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _canonical(arch: str, kwargs: Dict[str, Any], num_classes: int, entry) -> Architecture:
    """Drop kwargs that only restate the architecture's defaults (model_args then stays empty)."""
    if kwargs and _signature(arch, kwargs, num_classes) == _signature(arch, {}, num_classes):
        kwargs = {}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    entry = entry if entry and entry['model'] == arch else None
    return Architecture(arch, kwargs, num_classes, entry)


# --- hyper-parameters read from shapes, per family (checkpoints of sizes no registered model has) ---

_RPB = ('attn.rpb', 'attention.self.rpb')
_FC1 = ('mlp.fc1.weight', 'intermediate.dense.weight')
_LAYER_SCALE = ('gamma1', 'ls1.gamma', 'layer_scale_parameters')


def _pick(tensors: Dict[str, torch.Tensor], names: Sequence[str]) -> Optional[torch.Tensor]:
    return next((tensors[n] for n in names if n in tensors), None)


def _blocks(state_dict, pattern: str) -> Dict[int, Dict[int, Dict[str, torch.Tensor]]]:
    """``{stage: {block: {rest of key: tensor}}}`` for keys matching ``pattern`` (stage, block, rest)."""
    stages: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(pattern, key):
            stages.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = value
    return stages


def _hierarchical_kwargs(stages, embed_dim: int) -> Optional[Dict[str, Any]]:
    first_blocks = [stages[i][0] for i in sorted(stages) if 0 in stages[i]]
    rpbs = [_pick(b, _RPB) for b in first_blocks]
    fc1 = _pick(first_blocks[0], _FC1) if first_blocks else None
    if len(first_blocks) != len(stages) or fc1 is None or any(r is None for r in rpbs):
        return None
    return dict(
        embed_dim=embed_dim,
        depths=tuple(len(stages[i]) for i in sorted(stages)),
        num_heads=tuple(r.shape[0] for r in rpbs),
        kernel_size=(rpbs[0].shape[-1] + 1) // 2,  # rpb is [heads, 2k-1, 2k-1]
        mlp_ratio=fc1.shape[0] / embed_dim,
    )


def _nat_kwargs(state_dict) -> Optional[Dict[str, Any]]:
    """NAT / DiNAT in any of its namings (original, transformers, timm)."""
    renamed = {re.sub(r'^(?:(?:di)?nat\.)?(?:encoder\.)?', '', k): v for k, v in state_dict.items()}
    stem = _pick(renamed, ('patch_embed.proj.1.weight', 'embeddings.patch_embeddings.projection.1.weight'))
    stages = _blocks(renamed, r'(?:levels|stages)\.(\d+)\.(?:blocks|layers)\.(\d+)\.(.+)')
    kwargs = _hierarchical_kwargs(stages, stem.shape[0]) if stem is not None and stages else None
    if kwargs and _pick(stages[0][0], _LAYER_SCALE) is not None:
        kwargs['ls_init_value'] = 1e-5  # the published init; loaded weights replace it
    return kwargs


def _dinat_s_kwargs(state_dict) -> Optional[Dict[str, Any]]:
    """DiNAT_s (Swin's 4x4 patch embedding and patch merging), original or timm naming."""
    stem = state_dict.get('patch_embed.proj.weight')
    stages = _blocks(state_dict, r'(?:layers|stages)\.(\d+)\.blocks\.(\d+)\.(.+)')
    if stem is None or stem.dim() != 4 or not stages:
        return None
    return _hierarchical_kwargs(stages, stem.shape[0])


def _isotropic_kwargs(state_dict) -> Optional[Dict[str, Any]]:
    """Isotropic NAT / DiNAT / ViT-RPB, original or timm naming."""
    stem = state_dict.get('patch_embed.proj.weight')
    blocks: Dict[int, Dict[str, torch.Tensor]] = {}
    pattern = r'(?:layers|blocks)\.(\d+)\.(attn\.rpb|attn\.relative_position_index|mlp\.fc1\.weight)'
    for key, value in state_dict.items():
        if m := re.fullmatch(pattern, key):
            blocks.setdefault(int(m[1]), {})[m[2]] = value
    first = blocks.get(0, {})
    if stem is None or stem.dim() != 4 or 'attn.rpb' not in first or 'mlp.fc1.weight' not in first:
        return None
    embed_dim, patch_size, rpb = stem.shape[0], stem.shape[-1], first['attn.rpb']
    kwargs = dict(
        patch_size=patch_size, embed_dim=embed_dim, depth=len(blocks), num_heads=rpb.shape[0],
        mlp_ratio=first['mlp.fc1.weight'].shape[0] / embed_dim)
    if 'attn.relative_position_index' in first:  # ViT-RPB: a global table spanning the whole feature map
        kwargs['img_size'] = (rpb.shape[-1] + 1) // 2 * patch_size
    else:
        kwargs['kernel_size'] = (rpb.shape[-1] + 1) // 2
    return kwargs


def _dilations_hint(depths: Sequence[int]) -> str:
    return f"""'{{"dilations": [[...], ...]}}' (per stage, one per block: {', '.join(map(str, depths))})"""


@dataclasses.dataclass(frozen=True)
class _ShapeLayout:
    """How to read one family's hyper-parameters from a checkpoint, and what shapes cannot tell."""
    family: str  # module name under timm_nat.models
    infer: Callable[[Dict[str, torch.Tensor]], Optional[Dict[str, Any]]]
    # candidates(kwargs) -> [(architecture, what choosing it assumes)]; one candidate needing nothing = unique
    candidates: Callable[[Dict[str, Any]], List[Tuple[str, str]]]


_SHAPE_LAYOUTS = (
    _ShapeLayout('nat', _nat_kwargs, lambda kw: [
        ('nat_mini', 'NAT: dilation 1 in every block'),
        ('dinat_mini', f"DiNAT: also pass --model-args {_dilations_hint(kw['depths'])}")]),
    _ShapeLayout('dinat_s', _dinat_s_kwargs, lambda kw: [
        ('dinat_s_tiny', f"also pass --model-args {_dilations_hint(kw['depths'])}")]),
    _ShapeLayout('isotropic', _isotropic_kwargs, lambda kw: [('vitrpb_small', '')] if 'img_size' in kw else [
        ('nat_isotropic_small', 'NAT: dilation 1'), ('dinat_isotropic_small', 'DiNAT: dilation 2 on odd blocks')]),
)


def _shape_kwargs(state_dict, family: Optional[str] = None) -> Tuple[Optional[_ShapeLayout], Dict[str, Any]]:
    for layout in _SHAPE_LAYOUTS:
        if family in (None, layout.family) and (kwargs := layout.infer(state_dict)):
            return layout, kwargs
    return None, {}


def _kwargs_from_transformers_config(config: Dict[str, Any]) -> Dict[str, Any]:
    try:
        kwargs = dict(
            embed_dim=config['embed_dim'],
            depths=tuple(config['depths']),
            num_heads=tuple(config['num_heads']),
            kernel_size=config['kernel_size'],
            mlp_ratio=config['mlp_ratio'],
        )
        if config.get('layer_scale_init_value'):  # transformers: 0.0 means no layer scale
            kwargs['ls_init_value'] = config['layer_scale_init_value']
        if config['model_type'] == 'dinat':
            kwargs['dilations'] = tuple(tuple(d) for d in config['dilations'])
    except (KeyError, TypeError) as err:
        raise ConversionError(f"config.json of a {config['model_type']} model lacks or mangles {err}") from err
    return kwargs


def infer_architecture(
        state_dict: Dict[str, torch.Tensor],
        model: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        config: Optional[Dict[str, Any]] = None,
        entry: Optional[Dict[str, Any]] = None,
) -> Architecture:
    """The registered architecture (and non-default kwargs) whose layout ``state_dict`` fits exactly.

    In order: ``model`` (+ ``model_args``) as requested; the registry ``entry`` the source is; a
    transformers ``config.json`` (``model_type``, sizes, kernel and dilations pick e.g. dinat_large vs
    dinat_large_384, which share a layout); else the shapes: one fitting registered model, or kwargs
    read from the shapes. Dilations are not in any checkpoint, so layouts that fit several
    architectures are refused with the candidates listed.
    """
    model_args = dict(model_args or {})
    if config and 'architecture' in config:  # a timm folder: its config names everything
        saved_args = {k: v for k, v in config.get('model_args', {}).items() if k != 'num_classes'}
        model, model_args, config = model or config['architecture'], {**saved_args, **model_args}, None
    if model:
        return _requested_architecture(state_dict, model, model_args, config, entry)
    if entry:
        return _requested_architecture(state_dict, entry['model'], {}, None, entry)
    if config:
        return _architecture_from_config(state_dict, config)
    return _architecture_from_shapes(state_dict)


def _requested_architecture(state_dict, arch, user_args, config, entry) -> Architecture:
    known = timm_nat_architectures()
    if arch not in known:
        raise ConversionError(f"unknown model {arch!r}; timm-nat registers: {', '.join(known)}")
    if config:
        inferred = _kwargs_from_transformers_config(_checked_transformers_config(config))
    else:
        inferred = _shape_kwargs(state_dict, _family(arch))[1]
    attempts = [user_args] + ([{**inferred, **user_args}] if inferred else [])
    misfit = None
    for kwargs in attempts:
        try:
            num_classes = _fit(arch, kwargs, state_dict)
        except _Misfit as err:
            misfit = err
            continue
        if 'num_classes' in kwargs and kwargs.pop('num_classes') != num_classes:
            raise ConversionError(f"--model-args num_classes disagrees with the checkpoint's {num_classes} classes")
        return _canonical(arch, kwargs, num_classes, entry)
    what = f"registry entry {registry_entry_name(entry)}" if entry and entry['model'] == arch else arch
    raise ConversionError(f"checkpoint does not fit {what}: {misfit}")


def _checked_transformers_config(config: Dict[str, Any]) -> Dict[str, Any]:
    model_type = config.get('model_type')
    if model_type not in _TRANSFORMERS_MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}; only NAT/DiNAT transformers configs "
            f"({', '.join(_TRANSFORMERS_MODEL_TYPES)}) or timm configs (with 'architecture') are understood")
    return config


def _architecture_from_config(state_dict, config) -> Architecture:
    base = _TRANSFORMERS_MODEL_TYPES[_checked_transformers_config(config)['model_type']]
    kwargs = _kwargs_from_transformers_config(config)
    try:
        num_classes = _fit(base, kwargs, state_dict)
    except _Misfit as err:
        raise ConversionError(f"checkpoint does not match its config.json: {err}") from err
    # a registered architecture that is exactly this configuration needs no model_args
    target = _signature(base, kwargs, num_classes)
    for arch in timm_nat_architectures():
        if _family(arch) == _family(base) and _signature(arch, {}, num_classes) == target:
            return Architecture(arch, {}, num_classes)
    return _canonical(base, kwargs, num_classes, None)


def _architecture_from_shapes(state_dict) -> Architecture:
    fits, misfits = [], []
    for arch in timm_nat_architectures():
        try:
            fits.append((arch, _fit(arch, {}, state_dict)))
        except _Misfit as err:
            misfits.append(str(err))
    if len(fits) == 1:
        return Architecture(fits[0][0], {}, fits[0][1])
    if fits:
        raise ConversionError(
            f"ambiguous architecture: the checkpoint fits {', '.join(a for a, _ in fits)} alike (same keys and "
            "shapes; they differ in dilations or input size, which checkpoints do not record); pick one with --model")
    layout, kwargs = _shape_kwargs(state_dict)
    if layout is None:
        closest = min(misfits, key=len)  # the shortest complaint lists the fewest wrong keys
        raise ConversionError(
            f"checkpoint fits no registered timm-nat model (tried {len(misfits)} architectures; "
            f"{len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:3])}); closest: {closest}")
    candidates = layout.candidates(kwargs)
    if len(candidates) == 1 and not candidates[0][1]:
        return _requested_architecture(state_dict, candidates[0][0], kwargs, None, None)
    shown = ', '.join(f"{k}={v}" for k, v in kwargs.items())
    options = ' | '.join(f"--model {arch}" + (f" ({why})" if why else '') for arch, why in candidates)
    raise ConversionError(
        f"ambiguous architecture: {layout.family} family layout of no registered size ({shown}); what the shapes "
        f"cannot tell (dilations) must be given, kwargs are then read from the shapes: {options}")


# ----------------------------------------------------------------------------------------------
# Conversion, verification, model card
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Conversion:
    """What one conversion wrote and measured."""
    source: Source
    architecture: Architecture
    output_dir: Path
    num_params: int
    max_abs_diff: Dict[str, float]  # loading path -> max abs diff against the reference remapping


def _pretrained_cfg(arch: Architecture) -> Dict[str, Any]:
    """timm pretrained cfg of the converted weights: the registry's for a published file, else the
    architecture's conventions without any claim about weights we know nothing of."""
    if arch.entry:
        cfg = get_pretrained_cfg(arch.name).to_dict()
    else:
        cfg = get_pretrained_cfg(arch.model).to_dict()
        for key in ('url', 'hf_hub_id', 'hf_hub_filename', 'tag', 'license', 'description', 'notes'):
            cfg.pop(key, None)
    cfg['num_classes'] = arch.num_classes
    return cfg


def _uninitialized_model(name: str, **kwargs) -> torch.nn.Module:
    """The model with allocated but uninitialised tensors, for a strict load to fill: timm's init takes
    seconds per 100M parameters. Non-persistent buffers hold computed state a load would not restore,
    so a model with any is built the normal way."""
    model = timm.create_model(name, device='meta', **kwargs)
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        return timm.create_model(name, **kwargs)
    return model.to_empty(device='cpu')


def _reference_model(state_dict, arch: Architecture) -> torch.nn.Module:
    """The source through the reference remapping: build, ``checkpoint_filter_fn``, strict load."""
    model = _uninitialized_model(
        arch.model, pretrained_cfg=_pretrained_cfg(arch), num_classes=arch.num_classes, **arch.model_args)
    try:
        model.load_state_dict(_family_module(arch.model).checkpoint_filter_fn(dict(state_dict), model), strict=True)
    except RuntimeError as err:
        raise ConversionError(f"checkpoint does not load into {arch.describe()}: {_one_line(err)}") from err
    return model.eval()


def _verify(reference: torch.nn.Module, folder: Path, size: int) -> Dict[str, float]:
    """Max abs diff between the reference and the folder loaded through timm's public paths (must be 0.0)."""
    config = json.loads((folder / 'config.json').read_text())
    loaded = {
        'pretrained_cfg_overlay file': timm.create_model(
            config['architecture'], pretrained=True,
            pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME), num_classes=config['num_classes']),
            **config.get('model_args', {})),
        'local-dir': timm.create_model(f'local-dir:{folder}', pretrained=True),
    }
    inputs = torch.randn(1, reference.pretrained_cfg['input_size'][0], size, size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(inputs)
        diffs = {path: (model.eval()(inputs) - expected).abs().max().item() for path, model in loaded.items()}
    wrong = {path: diff for path, diff in diffs.items() if diff != 0.0}
    if wrong:
        raise ConversionError(
            "verification failed: the converted folder does not reproduce the source "
            + ', '.join(f"(max abs diff {d:.3g} via {p})" for p, d in wrong.items()))
    return diffs


def _card_details(conversion: Conversion) -> List[str]:
    arch, source, entry = conversion.architecture, conversion.source, conversion.architecture.entry
    where = {'hub': 'Hugging Face Hub, transformers layout', 'url': 'original .pth',
             'folder': 'local folder', 'file': 'local file'}[source.kind]
    model_args = f", model_args `{json.dumps(arch.model_args)}`" if arch.model_args else ''
    lines = [
        f"- **Architecture:** `{arch.model}`{model_args}",
        f"- **Classes:** {arch.num_classes}",
        f"- **Parameters:** {conversion.num_params:,}",
        f"- **Source:** `{source.name}` ({where})",
    ]
    if entry:
        original = f", original weights {entry['url']}" if 'url' in entry else ''
        lines += [f"- **Registry entry:** `{arch.name}`{original}", f"- **Published:** {published_summary(entry)}"]
    else:
        lines += ["- **Published:** not a checkpoint of the timm-nat registry; no published numbers"]
    paper_id = (get_pretrained_cfg(arch.name).paper_ids or '').replace('arXiv:', '')
    if paper_id:
        lines += [f"- **Paper:** {_PAPERS.get(paper_id, 'arXiv')} (arXiv:{paper_id}, https://arxiv.org/abs/{paper_id})"]
    diffs = ', '.join(f"{d} via {p}" for p, d in conversion.max_abs_diff.items())
    return lines + [
        f"- **License:** {entry['license'] if entry else 'not known to the converter; see the source'}",
        f"- **Verified:** identical outputs to the source loaded through timm-nat's remapping "
        f"(max abs diff {diffs}; random input).",
    ]


def _card_usage(arch: Architecture, hub_repo_id: Optional[str]) -> List[str]:
    load_name = f'hf-hub:{hub_repo_id}' if hub_repo_id else 'local-dir:/path/to/this/folder'
    model_args = f"\n    **{json.dumps(arch.model_args)}," if arch.model_args else ''
    return [
        '```python',
        'import timm',
        'import timm_nat  # registers the architecture (automatic once installed)',
        '',
        f'model = timm.create_model("{load_name}", pretrained=True).eval()',
        '',
        '# or name the architecture and give the weights file',
        f'model = timm.create_model(\n    "{arch.model}",\n    pretrained=True,\n'
        f'    pretrained_cfg_overlay=dict(file="model.safetensors", num_classes={arch.num_classes}),'
        f'\n    num_classes={arch.num_classes},{model_args}\n).eval()',
        '```',
    ]


def model_card(conversion: Conversion, hub_repo_id: Optional[str] = None) -> str:
    """README.md of a converted folder: what it is, where it came from, published numbers, how to load it."""
    arch = conversion.architecture
    front_matter = ['---', 'library_name: timm', 'tags:', '- image-classification', '- timm', '- timm-nat']
    front_matter += [f"license: {arch.entry['license']}"] if arch.entry else []
    summary = (
        f"{(model_entrypoint(arch.model).__doc__ or arch.model).strip()} Weights converted to timm naming by "
        "timm-nat's converter (`timm-nat-convert`); the architecture and its exact neighborhood attention "
        "with relative positional bias come from the timm-nat package, which must be installed.")
    lines = front_matter + ['---', '', f'# {arch.name}', '', summary, '', '## Details', '']
    lines += _card_details(conversion) + ['', '## Usage', ''] + _card_usage(arch, hub_repo_id)
    return '\n'.join(lines) + '\n'


def _chmod_like_new_file(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _check_output(output_dir: Path, force: bool) -> None:
    """Refuse to overwrite without --force, and to delete anything that is not a converter output."""
    if not output_dir.exists() and not output_dir.is_symlink():
        return
    if not force:
        raise ConversionError(f"output {output_dir} already exists; pass --force to overwrite it")
    if not output_dir.is_dir() or (any(output_dir.iterdir()) and not (output_dir / 'config.json').is_file()):
        raise ConversionError(
            f"output {output_dir} exists and is not a converted model folder (no config.json); not deleting it")


def convert_source(
        source: Source,
        output_dir: Path,
        model: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        force: bool = False,
        verify_size: int = DEFAULT_VERIFY_SIZE,
        hub_repo_id: Optional[str] = None,
        log: Callable[[str], None] = _log,
) -> Conversion:
    """Convert and verify a local :class:`Source` into ``output_dir`` (written only once verified)."""
    output_dir = Path(output_dir)
    _check_output(output_dir, force)
    state_dict = read_state_dict(source.weights)
    arch = infer_architecture(state_dict, model=model, model_args=model_args, config=source.config, entry=source.entry)
    log(f"{source.name}: {arch.describe()}")
    reference = _reference_model(state_dict, arch)
    # written beside the output and renamed into place once verified: no half-written output on failure
    staging = output_dir.parent / f'.{output_dir.name}.partial-{os.getpid()}'
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_for_hf(reference, staging, safe_serialization=True)
        _chmod_like_new_file(staging / WEIGHTS_NAME)  # safetensors writes 0600; outputs are meant to be shared
        diffs = _verify(reference, staging, verify_size)
        conversion = Conversion(
            source, arch, output_dir, sum(p.numel() for p in reference.parameters()), diffs)
        (staging / 'README.md').write_text(model_card(conversion, hub_repo_id))
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        elif output_dir.exists() or output_dir.is_symlink():
            output_dir.unlink()
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"verified: max abs diff {', '.join(f'{d} via {p}' for p, d in diffs.items())}")
    log(f"wrote {output_dir}/ ({WEIGHTS_NAME}, config.json, README.md)")
    return conversion


def convert(
        source: str,
        output_dir: Path,
        model: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        force: bool = False,
        verify_size: int = DEFAULT_VERIFY_SIZE,
        hub_repo_id: Optional[str] = None,
        downloader: Optional[Downloader] = None,
        log: Callable[[str], None] = _log,
) -> Conversion:
    """Convert ``source`` (Hub repo id, folder, file or URL) into a verified timm folder ``output_dir``."""
    _check_output(Path(output_dir), force)  # before any download
    return convert_source(
        resolve_source(source, downloader), output_dir, model=model, model_args=model_args, force=force,
        verify_size=verify_size, hub_repo_id=hub_repo_id, log=log)


def push_to_hub(folder: Path, repo_id: str, private: Optional[bool] = None, log: Callable[[str], None] = _log) -> None:
    """Upload a converted folder to the Hub repo ``repo_id`` (created if needed)."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder),
            commit_message=f"Add timm weights converted by {PROG}")
    except (OSError, ValueError) as err:  # HTTP errors, auth, offline
        raise ConversionError(
            f"could not push {folder} to {repo_id}: {type(err).__name__}: {_one_line(err, 300)}") from err
    log(f"pushed {folder}/ to https://huggingface.co/{repo_id}")


# ----------------------------------------------------------------------------------------------
# --all: every registry entry
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Row:
    entry: str
    source: str
    status: str  # converted | offline-checked | FAILED
    params: str
    max_diff: str
    problem: bool = False


def _params_check(num_params: int, num_classes: int, entry: Dict[str, Any]) -> Tuple[str, bool]:
    """Parameter count against the published one (see PARAMS_TOL_M) and classes against the registry."""
    ok, text = True, f"{num_params / 1e6:.2f}M"
    if 'params_m' in entry:
        matches = abs(num_params / 1e6 - entry['params_m']) <= max(PARAMS_TOL_M, PARAMS_RTOL * entry['params_m'])
        ok &= matches
        text += f" {'~' if matches else '!='} {entry['params_m']:g}M published"
    else:
        text += ' (none published)'
    if num_classes != entry['num_classes']:
        ok, text = False, text + f", {num_classes} classes != registry {entry['num_classes']}"
    return ('yes ' if ok else 'NO ') + text, ok


def _random_model(name: str, num_classes: int) -> torch.nn.Module:
    """The architecture with random N(0, 0.02) weights (a smoke test needs no good init)."""
    model = _uninitialized_model(name, num_classes=num_classes)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    return model.eval()


def _offline_check(entry: Dict[str, Any], size: int) -> Tuple[str, bool, str]:
    """What can be checked without the weights: build, parameter count, classes, one random forward."""
    model = _random_model(registry_entry_name(entry), entry['num_classes'])
    num_classes = model.pretrained_cfg['num_classes']  # what timm will load for this tag
    params, ok = _params_check(sum(p.numel() for p in model.parameters()), num_classes, entry)
    inputs = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(inputs)
    forward_ok = tuple(output.shape) == (1, entry['num_classes']) and bool(torch.isfinite(output).all())
    forward = f"forward 1x3x{size}x{size} -> {tuple(output.shape)} {'ok' if forward_ok else 'WRONG'}"
    return params, ok and forward_ok, forward


def _convert_entry(entry, output_dir: Path, force: bool, size: int, downloader: Downloader, log) -> _Row:
    name = registry_entry_name(entry)
    target = output_dir / name
    sources = [entry[k] for k in ('hf_hub_id', 'url') if k in entry]
    try:
        _check_output(target, force)
    except ConversionError as err:
        log(f"  FAILED: {err}")
        return _Row(name, _short(sources[0]), 'FAILED', '-', '-', problem=True)
    for spec in sources:
        try:
            source = resolve_source(spec, downloader)
        except DownloadError as err:
            log(f"  {err}")
            continue
        try:
            conversion = convert_source(source, target, force=force, verify_size=size, log=lambda m: log(f"  {m}"))
        except ConversionError as err:
            log(f"  FAILED: {_one_line(err)}")
            return _Row(name, _short(spec), 'FAILED', '-', '-', problem=True)
        params, ok = _params_check(conversion.num_params, conversion.architecture.num_classes, entry)
        log(f"  params: {params}")
        return _Row(name, _short(spec), 'converted', params, f"{max(conversion.max_abs_diff.values()):g}",
                    problem=not ok)
    params, ok, forward = _offline_check(entry, size)
    log(f"  offline checks: params {params}; {forward}")
    return _Row(name, _short(sources[0]) + ' (not downloaded)', 'offline-checked' if ok else 'FAILED', params, '-',
                problem=not ok)


def _short(spec: str) -> str:
    """A Hub repo id as is, a URL by its file name (the full URL is in the per-entry lines)."""
    return _url_basename(spec) if spec.startswith(('http://', 'https://')) else spec


def _summary(rows: List[_Row]) -> str:
    header = _Row('entry', 'source', 'status', 'params ok', 'max diff')
    widths = [max(len(getattr(r, f)) for r in [header] + rows) for f in ('entry', 'source', 'status', 'params')]
    lines = [
        '  '.join(getattr(r, f).ljust(w) for f, w in zip(('entry', 'source', 'status', 'params'), widths))
        + '  ' + r.max_diff
        for r in [header] + rows]
    return '\n'.join(lines)


def convert_all(
        output_dir: Path,
        only: Optional[Sequence[str]] = None,
        force: bool = False,
        verify_size: int = ALL_VERIFY_SIZE,
        log: Callable[[str], None] = _log,
) -> int:
    """Convert and verify every registry entry into ``output_dir/<model>.<tag>/``.

    Entries whose downloads fail are still checked offline (build, parameter count, classes, one
    forward with random weights). Returns 0 if every entry was converted and verified, 3 if some
    could only be checked offline, 1 if anything was wrong.
    """
    entries = [e for e in load_registry() if not only or any(fnmatch.fnmatch(registry_entry_name(e), p) for p in only)]
    if not entries:
        raise ConversionError(f"--only {' '.join(only)} matches no registry entry")
    downloader, rows = Downloader(), []
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {registry_entry_name(entry)}")
        rows.append(_convert_entry(entry, Path(output_dir), force, verify_size, downloader, log))
    converted = sum(r.status == 'converted' for r in rows)
    offline = sum(r.status == 'offline-checked' for r in rows)
    failed = sum(r.problem for r in rows)
    log('\n' + _summary(rows))
    log(f"\n{len(rows)} entries: {converted} converted and verified, {offline} checked offline only "
        f"(downloads failed), {failed} wrong")
    if failed:
        return 1
    return 3 if offline else 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert NAT/DiNAT/DiNAT_s/isotropic checkpoints (Hub repo id, transformers folder, original '
                    '.pth path or URL) into verified timm folders (model.safetensors, config.json, README.md).',
        epilog='Exit status: 0 converted and verified; 1 failure; 2 usage; 3 (--all) some entries only checked '
               'offline because their downloads failed.')
    parser.add_argument('source', nargs='?', help='Hub repo id, local folder, .pth/.bin/.safetensors file or URL')
    parser.add_argument('--all', action='store_true', help='convert every entry of weights/checkpoints.toml')
    parser.add_argument('-o', '--output-dir', type=Path, required=True,
                        help='output folder (with --all: parent of one <model>.<tag>/ folder per entry)')
    parser.add_argument('--model', help='registered architecture (default: inferred from the checkpoint)')
    parser.add_argument('--model-args', type=_json_object, default=None, metavar='JSON',
                        help='architecture kwargs as a JSON object, e.g. \'{"dilations": [[1, 8], [1, 4]]}\'')
    parser.add_argument('--force', action='store_true', help='overwrite existing output folders')
    parser.add_argument('--push-to-hub', metavar='REPO_ID', help='upload the converted folder to this Hub repo')
    parser.add_argument('--private', action='store_true', default=None, help='create the Hub repo private')
    parser.add_argument('--only', nargs='+', metavar='PATTERN', help='with --all: entries matching these globs')
    parser.add_argument('--verify-size', type=int, default=None, metavar='PX',
                        help=f'input size of the verification / offline forward (default {DEFAULT_VERIFY_SIZE}; '
                             f'--all {ALL_VERIFY_SIZE})')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``timm-nat-convert``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.all == bool(args.source):
        parser.error('give either a SOURCE or --all')
    if args.all and (args.model or args.model_args or args.push_to_hub):
        parser.error('--model, --model-args and --push-to-hub convert one SOURCE; not with --all')
    if args.only and not args.all:
        parser.error('--only selects registry entries for --all')
    try:
        if args.all:
            return convert_all(args.output_dir, only=args.only, force=args.force, verify_size=args.verify_size or ALL_VERIFY_SIZE)
        conversion = convert(
            args.source, args.output_dir, model=args.model, model_args=args.model_args, force=args.force,
            verify_size=args.verify_size or DEFAULT_VERIFY_SIZE, hub_repo_id=args.push_to_hub)
        if args.push_to_hub:
            push_to_hub(conversion.output_dir, args.push_to_hub, private=args.private)
        return 0
    except ConversionError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
