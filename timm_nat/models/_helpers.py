"""Helpers shared by the model families: building with a helpful download error, checkpoint
unwrapping and the strict key/shape check of remapped checkpoints."""
from typing import Any, Dict, Tuple, Type

import torch
import torch.nn as nn
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

from .._offline import cached_hub_file, hub_unreachable_reason
from ..pretrained import weights_unavailable_error

__all__ = ['build_model_or_explain', 'check_state_dict_fits', 'unwrap_state_dict']

_CLASSIFIER_KEYS = ('head.fc.weight', 'head.fc.bias')


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict inside ``{'model': ...}`` / ``{'state_dict': ...}`` training checkpoints (or itself)."""
    for wrapper in ('model', 'state_dict'):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return checkpoint


def build_model_or_explain(model_cls: Type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """``build_model_with_cfg``, turning weight download / file errors into one that says how to fix them.

    Without network (the Hub's name does not resolve) Hub weights come straight from the local
    Hub cache, or the error is raised at once instead of after huggingface_hub's retries.
    """
    if pretrained:
        kwargs = _offline_hub_weights_as_file(variant, kwargs)
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except OSError as err:  # download, Hub cache and file access failures are all OSError subclasses
        if not pretrained:
            raise
        name, cfg = _resolved_cfg(variant, kwargs)
        raise weights_unavailable_error(name, cfg, err) from err


def _resolved_cfg(variant: str, kwargs: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(``arch.tag``, pretrained cfg dict) that ``build_model_with_cfg`` will use."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    ).to_dict()
    return (f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant), cfg


def _offline_hub_weights_as_file(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` unchanged unless the weights come from an unreachable Hub: then the cached
    file as ``pretrained_cfg_overlay['file']``, or raise the explanation now."""
    name, cfg = _resolved_cfg(variant, kwargs)
    # what timm would fetch from the Hub (``hf-hub:`` names are timm's own path, left alone)
    from_hub = cfg.get('hf_hub_id') and not (cfg.get('file') or cfg.get('state_dict') or cfg.get('source'))
    reason = hub_unreachable_reason() if from_hub else None
    if reason is None:
        return kwargs
    filename = cfg.get('hf_hub_filename') or HF_WEIGHTS_NAME
    cached = cached_hub_file(cfg['hf_hub_id'], [*_get_safe_alternatives(filename), filename])  # timm's order
    if cached is None:
        raise weights_unavailable_error(name, cfg, ConnectionError(f"no network, {reason}; not in the local Hub cache either"))
    return {**kwargs, 'pretrained_cfg_overlay': {**(kwargs.get('pretrained_cfg_overlay') or {}), 'file': cached}}


def check_state_dict_fits(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise listing every unexpected, missing or mis-shaped key of a remapped checkpoint.

    The classifier is left to timm's ``load_pretrained``, which drops or keeps it depending on
    ``num_classes`` (and whose strict load then checks it).
    """
    expected = model.state_dict()
    leftover = [k for k in state_dict if k not in expected and k not in _CLASSIFIER_KEYS]
    missing = [k for k in expected if k not in state_dict and k not in _CLASSIFIER_KEYS]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and k not in _CLASSIFIER_KEYS and v.shape != expected[k].shape]
    problems = []
    if leftover:
        problems.append(f"{len(leftover)} unexpected key(s): {', '.join(leftover)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    if problems:
        raise RuntimeError(
            "checkpoint does not match the model (wrong architecture or arguments?): " + ". ".join(problems))
