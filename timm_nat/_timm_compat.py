"""The two timm helpers that timm-nat needs and timm < 1.0.31 lacks, so that timm 1.0.21+ works.

timm 1.0.21 is the first release whose layers take ``device`` / ``dtype`` factory arguments and
have ``calculate_drop_path_rates``, which the models use throughout. Newer timm is used as is.
"""
import inspect
from typing import Optional

import torch.nn as nn

__all__ = ["get_device_dtype", "reset_classifier_head"]

try:
    from timm.layers import get_device_dtype
except ImportError:  # timm < 1.0.29
    def get_device_dtype(module: nn.Module, device=None, dtype=None) -> dict:
        """Factory ``device`` / ``dtype`` kwargs: explicit values, else those of the module's first parameter."""
        parameter = next(module.parameters(), None)
        if parameter is not None:
            device = parameter.device if device is None else device
            dtype = parameter.dtype if dtype is None else dtype
        return {"device": device, "dtype": dtype}


def _reset_takes_in_features(head: nn.Module) -> bool:
    return "in_features" in inspect.signature(head.reset).parameters


def reset_classifier_head(
        head: nn.Module,
        num_classes: int,
        pool_type: Optional[str],
        in_features: int,
        device=None,
        dtype=None,
) -> None:
    """``head.reset(num_classes, pool_type=..., in_features=..., device=..., dtype=...)`` of timm's
    ``ClassifierHead``, also on timm < 1.0.31, whose ``reset`` takes neither ``in_features`` nor
    device / dtype (the classifier then reads ``head.in_features`` and is moved afterwards)."""
    if _reset_takes_in_features(head):
        head.reset(num_classes, pool_type=pool_type, in_features=in_features, device=device, dtype=dtype)
        return
    head.in_features = in_features
    head.reset(num_classes, pool_type=pool_type)
    head.to(device=device, dtype=dtype)
    head.train(head.training)  # new layers start in training mode
    head.num_features = in_features * head.global_pool.feat_mult()
