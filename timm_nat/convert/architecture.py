"""Which registered architecture (and kwargs) a checkpoint is.

Each model family module owns its checkpoint layouts (``remap_checkpoint``: original and
transformers names -> timm names); this module maps family -> those functions explicitly
(:data:`FAMILIES`), remaps first and reads hyper-parameters from timm-named keys only. Kwargs
from untrusted places (a folder's ``config.json``, ``--model-args``) pass an allow-list of
architecture hyper-parameters per family: nothing that makes timm fetch, read or trust a file.
"""
import dataclasses
import functools
import json
import re
import warnings
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import timm
import torch

from ..models import dinat_s, isotropic, nat
from ..models._helpers import state_dict_problems
from ..pretrained import registry_entry_name
from .errors import ConversionError, one_line

__all__ = ['Architecture', 'FAMILIES', 'Family', 'family_of', 'infer_architecture', 'timm_nat_architectures']

StateDict = Dict[str, torch.Tensor]
Kwargs = Dict[str, Any]
# transformers model_type -> the registered architecture that carries that family's conventions
_TRANSFORMERS_MODEL_TYPES = {'nat': 'nat_mini', 'dinat': 'dinat_mini'}
_HEAD_KWARGS = frozenset({'num_classes', 'in_chans', 'global_pool'})  # timm's save_for_hf writes these


class _Misfit(Exception):
    """A checkpoint does not fit one candidate architecture (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What the converter knows about one model family."""
    name: str
    architectures: Tuple[str, ...]
    filter_fn: Callable[[StateDict, torch.nn.Module], StateDict]  # remap + strict check (the module's)
    remap: Callable[[StateDict], StateDict]  # source layouts -> timm names (the module's remap_checkpoint)
    model_kwargs: FrozenSet[str]  # architecture hyper-parameters a config.json / --model-args may set
    infer: Callable[[StateDict, Optional[str]], Optional[Kwargs]]  # (timm-named dict, arch) -> kwargs
    # candidates(kwargs) -> [(architecture, what choosing it assumes)]; one needing nothing = unique
    candidates: Callable[[Kwargs], List[Tuple[str, str]]]


def _blocks(state_dict: StateDict, pattern: str) -> Dict[int, Dict[int, StateDict]]:
    """``{stage: {block: {rest of key: tensor}}}`` for timm keys matching ``pattern`` (stage, block, rest)."""
    stages: Dict[int, Dict[int, StateDict]] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(pattern, key):
            stages.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = value
    return stages


def _any(blocks: Dict[int, StateDict], name: str) -> Optional[torch.Tensor]:
    """``name`` of the first block holding it: one missing key must not hide a stage's sizes."""
    return next((blocks[j][name] for j in sorted(blocks) if name in blocks[j]), None)


def _hierarchical_kwargs(state_dict: StateDict, stem_ok: Callable[[StateDict], bool]) -> Optional[Kwargs]:
    """NAT / DiNAT / DiNAT_s sizes from timm names (``stages.i.blocks.j``); None if not this layout."""
    stages = _blocks(state_dict, r'stages\.(\d+)\.blocks\.(\d+)\.(.+)')
    if not stages or sorted(stages) != list(range(len(stages))) or not stem_ok(state_dict):
        return None
    rpbs = {i: r for i in sorted(stages) if (r := _any(stages[i], 'attn.rpb')) is not None}
    dim, fc1 = _any(stages[0], 'norm1.weight'), _any(stages[0], 'mlp.fc1.weight')
    if dim is None or fc1 is None or not rpbs:
        return None
    # heads double per stage in every published size: a stage whose RPB is missing altogether
    # follows that rule, so the strict check names the missing key instead of every key
    known, rpb = next(iter(rpbs.items()))
    kwargs = dict(
        embed_dim=dim.shape[0],
        depths=tuple(max(stages[i]) + 1 for i in sorted(stages)),
        num_heads=tuple(rpbs[i].shape[0] if i in rpbs else max(1, int(rpb.shape[0] * 2.0 ** (i - known)))
                        for i in sorted(stages)),
        kernel_size=(rpb.shape[-1] + 1) // 2,  # rpb is [heads, 2k-1, 2k-1]
        mlp_ratio=fc1.shape[0] / dim.shape[0],
    )
    if _any(stages[0], 'ls1.gamma') is not None:
        kwargs['ls_init_value'] = 1e-5  # the published init; loaded weights replace it
    return kwargs


def _downsample_dims(state_dict: StateDict) -> set:
    return {v.dim() for k, v in state_dict.items() if re.fullmatch(r'stages\.\d+\.downsample\.reduction\.weight', k)}


def _nat_kwargs(state_dict: StateDict, arch: Optional[str] = None) -> Optional[Kwargs]:
    """NAT / DiNAT: two-conv stem (``patch_embed.proj.0/1``), conv downsamplers."""
    return _hierarchical_kwargs(state_dict, lambda sd: (
        'patch_embed.proj.1.weight' in sd or 'patch_embed.proj.0.weight' in sd or _downsample_dims(sd) == {4}))


def _dinat_s_kwargs(state_dict: StateDict, arch: Optional[str] = None) -> Optional[Kwargs]:
    """DiNAT_s: Swin's 4x4 patch embedding (``patch_embed.proj``) and linear patch merging."""
    return _hierarchical_kwargs(state_dict, lambda sd: (
        getattr(sd.get('patch_embed.proj.weight'), 'ndim', 0) == 4 or _downsample_dims(sd) == {2}))


_GLOBAL_ATTENTION = ('vitrpb_small', 'vitrpb_base')  # isotropic architectures with a global RPB table


def _isotropic_kwargs(state_dict: StateDict, arch: Optional[str] = None) -> Optional[Kwargs]:
    """Isotropic NAT / DiNAT / ViT-RPB from timm names (``blocks.i``).

    Neighborhood and global attention share a layout; the RPB table spans ``2k-1`` (kernel k) or
    ``2H-1`` (map H). Legacy NATTEN, which trained every published model, took odd kernels only,
    so an even extent is a global table; for an odd one ``arch`` decides (None: a kernel).
    """
    layers: Dict[int, StateDict] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r'blocks\.(\d+)\.(.+)', key):
            layers.setdefault(int(m[1]), {})[m[2]] = value
    stem = state_dict.get('patch_embed.proj.weight')
    rpb, fc1 = _any(layers, 'attn.rpb'), _any(layers, 'mlp.fc1.weight')
    if stem is None or stem.dim() != 4 or rpb is None or fc1 is None:
        return None
    embed_dim, patch_size, extent = stem.shape[0], stem.shape[-1], (rpb.shape[-1] + 1) // 2
    kwargs = dict(patch_size=patch_size, embed_dim=embed_dim, depth=max(layers) + 1, num_heads=rpb.shape[0],
                  mlp_ratio=fc1.shape[0] / embed_dim)
    if arch in _GLOBAL_ATTENTION or (arch is None and extent % 2 == 0):
        kwargs['img_size'] = extent * patch_size
    else:
        kwargs['kernel_size'] = extent
    return kwargs


def _dilations_hint(depths: Sequence[int]) -> str:
    return f"""'{{"dilations": [[...], ...]}}' (per stage, one per block: {', '.join(map(str, depths))})"""


def _isotropic_candidates(kwargs: Kwargs) -> List[Tuple[str, str]]:
    if 'img_size' in kwargs:
        return [('vitrpb_small', '')]
    return [('nat_isotropic_small', 'NAT: dilation 1'), ('dinat_isotropic_small', 'DiNAT: dilation 2 on odd blocks'),
            ('vitrpb_small', f"ViT-RPB: global attention over a {kwargs['kernel_size']}x{kwargs['kernel_size']} map")]


_ARCH_KWARGS = frozenset({'embed_dim', 'num_heads', 'kernel_size', 'mlp_ratio', 'qkv_bias'}) | _HEAD_KWARGS
FAMILIES: Dict[str, Family] = {
    'nat': Family(
        'nat', tuple(nat.default_cfgs), nat.checkpoint_filter_fn, nat.remap_checkpoint,
        _ARCH_KWARGS | {'depths', 'dilations', 'ls_init_value'}, _nat_kwargs, lambda kw: [
            ('nat_mini', 'NAT: dilation 1 in every block'),
            ('dinat_mini', f"DiNAT: also pass --model-args {_dilations_hint(kw['depths'])}")]),
    'dinat_s': Family(
        'dinat_s', tuple(dinat_s.default_cfgs), dinat_s.checkpoint_filter_fn, dinat_s.remap_checkpoint,
        _ARCH_KWARGS | {'depths', 'dilations'}, _dinat_s_kwargs, lambda kw: [
            ('dinat_s_tiny', f"also pass --model-args {_dilations_hint(kw['depths'])}")]),
    'isotropic': Family(
        'isotropic', tuple(isotropic.default_cfgs), isotropic.checkpoint_filter_fn, isotropic.remap_checkpoint,
        _ARCH_KWARGS | {'img_size', 'patch_size', 'depth', 'dilation'}, _isotropic_kwargs, _isotropic_candidates),
}
_FAMILY_OF = {arch: family for family in FAMILIES.values() for arch in family.architectures}


def timm_nat_architectures() -> List[str]:
    """Every architecture of the timm-nat families, in family order."""
    return list(_FAMILY_OF)


def family_of(arch: str) -> Family:
    """The :class:`Family` of a registered timm-nat architecture."""
    if arch not in _FAMILY_OF:
        raise ConversionError(f"unknown model {arch!r}; timm-nat registers: {', '.join(_FAMILY_OF)}")
    return _FAMILY_OF[arch]


def _plain_value(value: Any, allow_str: bool) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v, False) for v in value)
    return value is None or isinstance(value, (bool, int, float)) or (allow_str and isinstance(value, str))


def checked_model_args(arch: str, model_args: Any, where: str) -> Kwargs:
    """``model_args`` if it only sets architecture hyper-parameters of ``arch``'s family, else refuse.

    ``where`` names the untrusted origin (a folder's config.json, --model-args) for the message.
    Keys such as ``pretrained_cfg_overlay``, ``checkpoint_path`` or ``pretrained`` would make timm
    fetch or read files; values must be numbers, booleans, null or lists of them (``global_pool``
    a string).
    """
    if not isinstance(model_args, dict):
        raise ConversionError(f"{where}: model_args must be a JSON object, got {type(model_args).__name__}")
    family = family_of(arch)
    refused = sorted(k for k in model_args if k not in family.model_kwargs)
    if refused:
        raise ConversionError(
            f"{where} sets {', '.join(map(repr, refused))}, which is not an architecture hyper-parameter of "
            f"{arch}; refused (only {', '.join(sorted(family.model_kwargs))} may be set)")
    bad = sorted(k for k, v in model_args.items() if not _plain_value(v, k == 'global_pool'))
    if bad:
        raise ConversionError(f"{where}: {', '.join(f'{k}={json.dumps(model_args[k])}' for k in bad)} is not a "
                              "number, boolean or list of numbers; refused")
    return dict(model_args)


@dataclasses.dataclass
class Architecture:
    """A registered architecture, the non-default kwargs it needs, and the checkpoint's classes."""
    model: str
    model_args: Kwargs
    num_classes: int
    entry: Optional[Dict[str, Any]] = None  # the registry entry the source names, when it names one

    @property
    def name(self) -> str:
        """``arch.tag`` for a registry entry, else the architecture."""
        return registry_entry_name(self.entry) if self.entry else self.model

    def describe(self) -> str:
        """One line for people."""
        text = self.model + (f" with model_args {json.dumps(self.model_args)}" if self.model_args else '')
        text += f", {self.num_classes} classes"
        return text + (f" (registry entry {self.name})" if self.entry else '')


@functools.lru_cache(maxsize=256)
def _meta_model_cached(arch: str, kwargs_json: str) -> torch.nn.Module:
    return timm.create_model(arch, device='meta', **json.loads(kwargs_json))


def _meta_model(arch: str, **kwargs) -> torch.nn.Module:
    """The architecture with no storage (cheap): for layouts, shapes and parameter counts."""
    try:
        return _meta_model_cached(arch, json.dumps(kwargs, sort_keys=True))
    except (ValueError, TypeError, AssertionError, KeyError, RuntimeError, NotImplementedError) as err:
        raise _Misfit(f"{arch} cannot be built with {json.dumps(kwargs)}: {one_line(err, 300)}") from err


def _fit(arch: str, kwargs: Kwargs, state_dict: StateDict) -> int:
    """Number of classes if ``state_dict`` loads strictly into ``arch(**kwargs)``; raises _Misfit otherwise."""
    model = _meta_model(arch, **kwargs)
    try:
        with warnings.catch_warnings():  # misfitting candidates may warn while resizing tables they then reject
            warnings.simplefilter('ignore')
            converted = family_of(arch).filter_fn(dict(state_dict), model)
    except (RuntimeError, KeyError, ValueError) as err:
        raise _Misfit(f"{arch}: {one_line(err, 400)}") from err
    classifier = model.pretrained_cfg.get('classifier') or 'head.fc'
    head = converted.get(f'{classifier}.weight')
    num_classes = head.shape[0] if head is not None else 0
    problems = state_dict_problems(converted, _meta_model(arch, **dict(kwargs, num_classes=num_classes)), skip_keys=())
    if problems:
        raise _Misfit(f"{arch}: checkpoint does not match the model: {'. '.join(problems)}")
    return num_classes


def _signature(arch: str, kwargs: Kwargs, num_classes: int) -> Tuple[str, Tuple]:
    """What makes two configurations the same network: module tree (kernel sizes, dilations) and shapes."""
    model = _meta_model(arch, **dict(kwargs, num_classes=num_classes))
    return repr(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _canonical(arch: str, kwargs: Kwargs, num_classes: int, entry) -> Architecture:
    """Drop kwargs that only restate the architecture's defaults (model_args then stays empty)."""
    if kwargs and _signature(arch, kwargs, num_classes) == _signature(arch, {}, num_classes):
        kwargs = {}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    entry = entry if entry and entry['model'] == arch else None
    return Architecture(arch, kwargs, num_classes, entry)


def _shape_kwargs(state_dict: StateDict, arch: Optional[str] = None) -> Tuple[Optional[Family], Kwargs]:
    """Kwargs read from the timm names of the first family (or ``arch``'s) whose layout this is."""
    families = [family_of(arch)] if arch else FAMILIES.values()
    for family in families:
        try:
            remapped = family.remap(dict(state_dict))
        except (RuntimeError, KeyError, ValueError):  # e.g. incomplete query/key/value: the strict check says so
            continue
        if kwargs := family.infer(remapped, arch):
            return family, kwargs
    return None, {}


def _kwargs_from_transformers_config(config: Dict[str, Any]) -> Kwargs:
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
    return checked_model_args(_TRANSFORMERS_MODEL_TYPES[config['model_type']], kwargs, 'config.json')


def infer_architecture(
        state_dict: StateDict,
        model: Optional[str] = None,
        model_args: Optional[Kwargs] = None,
        config: Optional[Dict[str, Any]] = None,
        entry: Optional[Dict[str, Any]] = None,
) -> Architecture:
    """The registered architecture (and non-default kwargs) whose layout ``state_dict`` fits exactly.

    In order: ``model`` (+ ``model_args``) as requested; the registry ``entry`` the source is; a
    timm ``config.json`` (its architecture and allowed model_args) or a transformers one
    (``model_type``, sizes, kernel and dilations pick e.g. dinat_large vs dinat_large_384, which
    share a layout); else the shapes: one fitting registered model, or kwargs read from the shapes.
    Dilations are not in any checkpoint, so layouts that fit several architectures are refused with
    the candidates listed. ``model_args`` and config kwargs may only set architecture
    hyper-parameters (see :func:`checked_model_args`).
    """
    model_args = dict(model_args or {})
    if config and 'architecture' in config:  # a timm folder: its config names everything
        saved = config['architecture']
        if not isinstance(saved, str):
            raise ConversionError(f"config.json: architecture must be a string, got {json.dumps(saved)}")
        saved_args = checked_model_args(model or saved, config.get('model_args', {}), 'config.json')
        saved_args.pop('num_classes', None)
        model, model_args, config = model or saved, {**saved_args, **model_args}, None
    if model:
        model_args = checked_model_args(model, model_args, '--model-args')
        return _requested_architecture(state_dict, model, model_args, config, entry)
    if entry:
        return _requested_architecture(state_dict, entry['model'], {}, None, entry)
    if config:
        return _architecture_from_config(state_dict, config)
    return _architecture_from_shapes(state_dict)


def _requested_architecture(state_dict, arch, user_args, config, entry) -> Architecture:
    family_of(arch)  # unknown architectures are refused first
    if config:
        inferred = _kwargs_from_transformers_config(_checked_transformers_config(config))
    else:
        inferred = _shape_kwargs(state_dict, arch)[1]
    attempts = [user_args] + ([{**inferred, **user_args}] if inferred else [])
    misfit = None
    for kwargs in attempts:
        try:
            num_classes = _fit(arch, kwargs, state_dict)
        except _Misfit as err:
            misfit = err  # the last attempt (sizes read from this checkpoint) explains best
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
    for arch in family_of(base).architectures:
        if _signature(arch, {}, num_classes) == target:
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
    family, kwargs = _shape_kwargs(state_dict)
    if family is None:
        closest = min(misfits, key=len)  # the shortest complaint lists the fewest wrong keys
        raise ConversionError(
            f"checkpoint fits no registered timm-nat model (tried {len(misfits)} architectures; "
            f"{len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:3])}); closest: {closest}")
    candidates = family.candidates(kwargs)
    if len(candidates) == 1 and not candidates[0][1]:
        return _requested_architecture(state_dict, candidates[0][0], kwargs, None, None)
    shown = ', '.join(f"{k}={v}" for k, v in kwargs.items())
    options = ' | '.join(f"--model {arch}" + (f" ({why})" if why else '') for arch, why in candidates)
    raise ConversionError(
        f"ambiguous architecture: {family.name} family layout of no registered size ({shown}); what the shapes "
        f"cannot tell (dilations) must be given, kwargs are then read from the shapes: {options}")
