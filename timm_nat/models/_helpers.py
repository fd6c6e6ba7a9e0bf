"""Helpers shared by the model families: building with a helpful download error, checkpoint
unwrapping and the strict key/shape check of remapped checkpoints."""
from typing import Any, Dict, List, Sequence, Tuple, Type

import torch
import torch.nn as nn
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

from .._offline import cached_hub_file, hub_offline_mode, hub_unreachable_reason
from ..pretrained import weights_unavailable_error

__all__ = ['build_model_or_explain', 'check_state_dict_fits', 'state_dict_problems', 'unwrap_state_dict']

_CLASSIFIER_KEYS = ('head.fc.weight', 'head.fc.bias')


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict inside ``{'model': ...}`` / ``{'state_dict': ...}`` training checkpoints (or itself)."""
    for wrapper in ('model', 'state_dict'):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return checkpoint


def build_model_or_explain(model_cls: Type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """``build_model_with_cfg``, turning weight download / file errors into one that says how to fix them.

    Offline (the Hub's name does not resolve, or ``HF_HUB_OFFLINE``) Hub weights come straight
    from the local Hub cache, or the error is raised at once, before the model is built and
    without huggingface_hub's retries.
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
    """``kwargs`` unchanged unless the weights come from a Hub out of reach (no network, or
    ``HF_HUB_OFFLINE``): then a file missing from the local Hub cache raises the explanation
    now, before the model is built, and without network a cached file is passed as
    ``pretrained_cfg_overlay['file']`` (huggingface_hub would first retry the network)."""
    name, cfg = _resolved_cfg(variant, kwargs)
    # what timm would fetch from the Hub (``hf-hub:`` names are timm's own path, left alone)
    from_hub = cfg.get('hf_hub_id') and not (cfg.get('file') or cfg.get('state_dict') or cfg.get('source'))
    if not from_hub:
        return kwargs
    offline_mode = hub_offline_mode()
    reason = None if offline_mode else hub_unreachable_reason()
    if not (offline_mode or reason):
        return kwargs
    filename = cfg.get('hf_hub_filename') or HF_WEIGHTS_NAME
    cached = cached_hub_file(cfg['hf_hub_id'], [*_get_safe_alternatives(filename), filename])  # timm's order
    if cached is None:
        why = "offline mode (HF_HUB_OFFLINE is set)" if offline_mode else f"no network, {reason}"
        raise weights_unavailable_error(name, cfg, ConnectionError(f"{why}; not in the local Hub cache either"))
    if offline_mode:
        return kwargs  # huggingface_hub reads its cache directly
    return {**kwargs, 'pretrained_cfg_overlay': {**(kwargs.get('pretrained_cfg_overlay') or {}), 'file': cached}}


def state_dict_problems(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        skip: Sequence[str] = _CLASSIFIER_KEYS,
) -> List[str]:
    """Every unexpected, missing or mis-shaped key of ``state_dict`` against ``model`` (``skip`` keys
    aside), one sentence per kind (``'2 missing key(s): a, b'``); empty when it fits exactly."""
    expected = model.state_dict()
    leftover = [k for k in state_dict if k not in expected and k not in skip]
    missing = [k for k in expected if k not in state_dict and k not in skip]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and k not in skip and v.shape != expected[k].shape]
    problems = []
    if leftover:
        problems.append(f"{len(leftover)} unexpected key(s): {', '.join(leftover)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    return problems


def check_state_dict_fits(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise listing every unexpected, missing or mis-shaped key of a remapped checkpoint.

    The classifier is left to timm's ``load_pretrained``, which drops or keeps it depending on
    ``num_classes`` (and whose strict load then checks it).
    """
    problems = state_dict_problems(state_dict, model)
    if problems:
        raise RuntimeError(
            "checkpoint does not match the model (wrong architecture or arguments?): " + ". ".join(problems))
