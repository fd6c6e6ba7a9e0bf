"""Helpers shared by the model families: building with a helpful download error, checkpoint
unwrapping and the strict key/shape check of remapped checkpoints."""
from typing import Any, Dict, List, Sequence, Type

import torch
import torch.nn as nn
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg

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
    """``build_model_with_cfg``, turning weight download / file errors into one that says how to fix them."""
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except OSError as err:  # download, Hub cache and file access failures are all OSError subclasses
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
        ).to_dict()
        name = f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant
        raise weights_unavailable_error(name, cfg, err) from err


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
