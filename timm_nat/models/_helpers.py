"""Helpers shared by the DiNAT_s and isotropic model families (model building and checkpoint unwrapping)."""
from typing import Any, Dict, Type

import torch.nn as nn
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg

from ..pretrained import weights_unavailable_error

__all__ = ['build_model_or_explain', 'unwrap_state_dict']


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
