"""One declaration per model family: everything the rest of the package needs to know about it.

A family module (``nat.py``, ``dinat_s.py``, ``isotropic.py``) ends with ``register_family(ModelFamily(...))``:
its architectures and their arguments (timm entrypoints are generated from them, with pretrained cfgs
from the registry ``weights/checkpoints.toml``), its checkpoint layouts (``remap_checkpoint``, the strict
``checkpoint_filter_fn``), how its hyper-parameters are read from timm-named keys, and how a
transformers ``config.json`` maps to its kwargs. The converter, the registry check and the tests read
:func:`model_families`; nothing else lists families. A new family is one new module here (imported by
``timm_nat.models`` automatically) plus its registry rows.
"""
import dataclasses
import sys
import types
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.models._registry import generate_default_cfgs, register_model

from ..pretrained import downstream_backbone_kwargs, downstream_entry, registry_default_cfgs

__all__ = ['Arch', 'ModelFamily', 'build_architecture', 'model_families', 'register_family']

StateDict = Dict[str, torch.Tensor]
Kwargs = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Arch:
    """One registered architecture: its docstring and the kwargs its entrypoint passes to the builder."""
    doc: str
    args: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the package knows about one model family (see the module docstring)."""
    name: str
    module: str  # the family module's __name__: timm lists the entrypoints (and their cfgs) there
    architectures: Mapping[str, Arch]  # in registry-table order
    build: Callable[..., nn.Module]  # build(variant, pretrained=False, **kwargs), e.g. build_model_with_cfg
    make_cfg: Callable[..., Dict[str, Any]]  # the family's pretrained-cfg conventions (family_cfg partial)
    remap_checkpoint: Callable[[StateDict], StateDict]  # published layouts -> timm names (pure)
    checkpoint_filter_fn: Callable[[StateDict, nn.Module], StateDict]  # remap + adapt + strict check
    model_kwargs: FrozenSet[str]  # hyper-parameters a config.json / --model-args may set (no head kwargs)
    # (timm-named state dict, architecture or None) -> kwargs read from its shapes; None if not this layout
    infer_kwargs: Callable[[StateDict, Optional[str]], Optional[Kwargs]]
    # inferred kwargs -> [(architecture, what choosing it assumes)]; one assuming nothing is unique
    candidates: Callable[[Kwargs], List[Tuple[str, str]]]
    # transformers model_type -> the architecture that carries its conventions, and the config -> kwargs
    # mapping (raises KeyError / TypeError for a config that lacks or mangles a field)
    transformers_model_types: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kwargs_from_transformers_config: Optional[Callable[[Dict[str, Any]], Kwargs]] = None


_FAMILIES: Dict[str, ModelFamily] = {}


def _architecture_args(arch: str, spec: Arch, kwargs: Kwargs) -> Kwargs:
    """The entrypoint's kwargs: the architecture's, a downstream tag's (its task's architecture
    arguments), then the caller's."""
    args = dict(spec.args)
    entry = downstream_entry(arch, kwargs.get('pretrained_cfg'))
    if entry is not None:
        args.update(downstream_backbone_kwargs(entry))
    args.update(kwargs)
    return args


def _entrypoint(family: ModelFamily, arch: str, spec: Arch) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        args = _architecture_args(arch, spec, kwargs)
        if args.get('out_norms') and not args.get('features_only'):  # a backbone only
            tag = (downstream_entry(arch, kwargs.get('pretrained_cfg')) or {}).get('tag')
            name = f"{arch}.{tag}" if tag else arch
            raise ValueError(
                f"{name} is a detection/segmentation backbone (per-output norms, no final norm): it has no "
                f"classifier; create it with features_only=True")
        return family.build(arch, pretrained=pretrained, **args)

    entrypoint.__name__ = entrypoint.__qualname__ = arch
    entrypoint.__module__ = family.module
    entrypoint.__doc__ = spec.doc
    return entrypoint


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family``: one timm entrypoint per architecture, in ``family.module`` (as ``@register_model``
    functions would be), with its registry entries as pretrained cfgs; returns ``family``.

    A tag of a detection / segmentation backbone (``weights/downstream.toml``) builds it with that
    entry's architecture arguments (see :func:`..pretrained.downstream_backbone_kwargs`), and only
    with ``features_only=True``.

    Raises if an architecture has no registry entry (see :func:`..pretrained.registry_entries`).
    """
    module = sys.modules[family.module]
    module.default_cfgs = generate_default_cfgs(registry_default_cfgs(tuple(family.architectures), family.make_cfg))
    for arch, spec in family.architectures.items():
        entrypoint = _entrypoint(family, arch, spec)
        setattr(module, arch, entrypoint)
        register_model(entrypoint)
    _FAMILIES[family.name] = family
    return family


def build_architecture(name: str, **kwargs) -> nn.Module:
    """Build ``name`` (``arch`` or ``arch.tag``) as its timm entrypoint would, but also a detection
    backbone as the bare model (no ``features_only`` wrapper), for tools that check or convert the
    weights themselves (the converter): ``forward_intermediates`` gives its normed stage outputs."""
    arch, _, tag = name.partition('.')
    family = next((f for f in _FAMILIES.values() if arch in f.architectures), None)
    if family is None:
        raise ValueError(f"unknown timm-nat architecture {arch!r}")
    if tag:
        kwargs.setdefault('pretrained_cfg', tag)
    model = family.build(arch, **_architecture_args(arch, family.architectures[arch], kwargs))
    # as timm.create_model: the caller's arguments, which timm's save_for_hf writes to config.json
    model._model_args = {k: v for k, v in kwargs.items() if k not in ('device', 'dtype', 'pretrained_cfg')}
    return model


def model_families() -> Mapping[str, ModelFamily]:
    """Every registered family by name, in registration order (``timm_nat.models`` imports them all): a
    read-only view that also shows families registered later."""
    return types.MappingProxyType(_FAMILIES)
