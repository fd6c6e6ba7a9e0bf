"""A toy model family, written as a new family module of ``timm_nat/models/`` would be: the model, its
published checkpoint layout, and its declaration. Together with its registry rows (``TOY_REGISTRY_ROWS``,
in a real family: ``[[checkpoint]]`` tables of weights/checkpoints.toml) it is everything a new family
needs; tests/test_models.py registers it and runs it end to end (create_model, converter, loading)."""
import functools
import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import ClassifierHead

from timm_nat.layers import NeighborhoodAttentionBlock
from timm_nat.models._family import Arch, ModelFamily
from timm_nat.models._helpers import (
    build_model_or_explain, check_state_dict_fits, family_cfg, first_of_blocks, unwrap_state_dict,
)


class ToyNat(nn.Module):
    """A 4x4 patch embedding, a stack of neighborhood-attention blocks, a norm and a classifier."""

    def __init__(self, in_chans=3, num_classes=1000, global_pool='avg', embed_dim=32, depth=2, num_heads=2,
                 kernel_size=3, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes, self.num_features = num_classes, embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=4, stride=4, **dd)
        self.blocks = nn.Sequential(*[
            NeighborhoodAttentionBlock(embed_dim, num_heads, kernel_size=kernel_size, **dd) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, input_fmt='NHWC', **dd)
        self.feature_info = [dict(num_chs=embed_dim, reduction=4, module='blocks')]

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.patch_embed(x).permute(0, 2, 3, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def remap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The toy's "published" layout (``stem.``, ``layers.i.``, ``classifier.``) in timm naming."""
    renames = ((r'^stem\.', 'patch_embed.'), (r'^layers\.(\d+)\.', r'blocks.\1.'), (r'^classifier\.', 'head.fc.'))
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    state_dict = remap_checkpoint(state_dict)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _infer_kwargs(state_dict: Dict[str, torch.Tensor], arch: Optional[str] = None) -> Optional[Dict[str, Any]]:
    blocks = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r'blocks\.(\d+)\.(.+)', key):
            blocks.setdefault(int(m[1]), {})[m[2]] = value
    stem, rpb = state_dict.get('patch_embed.weight'), first_of_blocks(blocks, 'attn.rpb')
    if stem is None or rpb is None:
        return None
    return dict(embed_dim=stem.shape[0], depth=max(blocks) + 1, num_heads=rpb.shape[0],
                kernel_size=(rpb.shape[-1] + 1) // 2)


def _create_toy(variant: str, pretrained: bool = False, **kwargs) -> ToyNat:
    return build_model_or_explain(ToyNat, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


FAMILY = ModelFamily(
    name='toy',
    module=__name__,
    architectures={'toy_nat_small': Arch("Toy NAT, small.", dict(embed_dim=32, depth=2, num_heads=2, kernel_size=3))},
    build=_create_toy,
    make_cfg=functools.partial(family_cfg, first_conv='patch_embed', reduction=4),
    remap_checkpoint=remap_checkpoint,
    checkpoint_filter_fn=checkpoint_filter_fn,
    model_kwargs=frozenset({'embed_dim', 'depth', 'num_heads', 'kernel_size'}),
    infer_kwargs=_infer_kwargs,
    candidates=lambda kwargs: [('toy_nat_small', '')],
)

TOY_REGISTRY_ROWS = (dict(
    model='toy_nat_small', tag='in1k', url='https://example.invalid/toy_nat_small.pth', num_classes=1000,
    input_size=[3, 64, 64], crop_pct=0.875, license='mit', paper='arxiv:2204.07143', source='a test'),)
