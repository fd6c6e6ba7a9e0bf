"""Which registered architecture (and kwargs) a checkpoint is.

Each model family module declares its checkpoint layouts (``remap_checkpoint``: original and
transformers names -> timm names), how its hyper-parameters are read from timm-named keys and its
transformers config mapping (:class:`..models.ModelFamily`); this module collects those
declarations (:data:`FAMILIES`), remaps first and reads hyper-parameters from timm-named keys only.
Kwargs from untrusted places (a folder's ``config.json``, ``--model-args``) pass an allow-list of
architecture hyper-parameters per family: nothing that makes timm fetch, read or trust a file.
"""
import dataclasses
import functools
import json
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch

from ..models import ModelFamily, model_families
from ..models._family import build_architecture
from ..models._helpers import state_dict_problems
from ..pretrained import downstream_backbone_kwargs, registry_entry_name
from .errors import ConversionError, one_line

__all__ = ['Architecture', 'FAMILIES', 'Family', 'family_of', 'infer_architecture', 'timm_nat_architectures']

StateDict = Dict[str, torch.Tensor]
Kwargs = Dict[str, Any]
Family = ModelFamily
_HEAD_KWARGS = frozenset({'num_classes', 'in_chans', 'global_pool'})  # timm's save_for_hf writes these


class _Misfit(Exception):
    """A checkpoint does not fit one candidate architecture (the message says why)."""


FAMILIES: Mapping[str, ModelFamily] = model_families()  # every family module's declaration (a live view)


def _transformers_model_types() -> Dict[str, str]:
    """transformers model_type -> the registered architecture that carries that family's conventions."""
    return {t: arch for family in FAMILIES.values() for t, arch in family.transformers_model_types.items()}


def timm_nat_architectures() -> List[str]:
    """Every architecture of the timm-nat families, in family order."""
    return [arch for family in FAMILIES.values() for arch in family.architectures]


def family_of(arch: str) -> Family:
    """The :class:`Family` of a registered timm-nat architecture."""
    family = next((f for f in FAMILIES.values() if arch in f.architectures), None)
    if family is None:
        raise ConversionError(f"unknown model {arch!r}; timm-nat registers: {', '.join(timm_nat_architectures())}")
    return family


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
    allowed = family_of(arch).model_kwargs | _HEAD_KWARGS
    refused = sorted(k for k in model_args if k not in allowed)
    if refused:
        raise ConversionError(
            f"{where} sets {', '.join(map(repr, refused))}, which is not an architecture hyper-parameter of "
            f"{arch}; refused (only {', '.join(sorted(allowed))} may be set)")
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
    return build_architecture(arch, device='meta', **json.loads(kwargs_json))


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
            converted = family_of(arch).checkpoint_filter_fn(dict(state_dict), model)
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
            remapped = family.remap_checkpoint(dict(state_dict))
        except (RuntimeError, KeyError, ValueError):  # e.g. incomplete query/key/value: the strict check says so
            continue
        if kwargs := family.infer_kwargs(remapped, arch):
            return family, kwargs
    return None, {}


def _kwargs_from_transformers_config(config: Dict[str, Any]) -> Kwargs:
    arch = _transformers_model_types()[config['model_type']]
    try:
        kwargs = family_of(arch).kwargs_from_transformers_config(config)
    except (KeyError, TypeError) as err:
        raise ConversionError(f"config.json of a {config['model_type']} model lacks or mangles {err}") from err
    return checked_model_args(arch, kwargs, 'config.json')


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
    if entry:  # a detection / segmentation backbone: its task's kernel, dilations, per-output norms
        args = {k: v for k, v in downstream_backbone_kwargs(entry).items() if v is not None and k != 'num_classes'} \
            if 'task' in entry else {}
        return _requested_architecture(state_dict, entry['model'], args, None, entry)
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
    if model_type not in _transformers_model_types():
        raise ConversionError(
            f"config.json has model_type {model_type!r}; only NAT/DiNAT transformers configs "
            f"({', '.join(_transformers_model_types())}) or timm configs (with 'architecture') are understood")
    return config


def _architecture_from_config(state_dict, config) -> Architecture:
    base = _transformers_model_types()[_checked_transformers_config(config)['model_type']]
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
