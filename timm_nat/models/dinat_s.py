""" DiNAT_s: Swin's layout with (dilated) neighborhood attention

A timm implementation of the DiNAT_s variant of
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

that loads the published checkpoints (https://github.com/SHI-Labs/Neighborhood-Attention-Transformer,
``classification/dinats.py``, MIT licence). DiNAT_s is Swin Transformer with its shifted-window
attention replaced by blocks alternating plain and dilated neighborhood attention: a 4x4 stride-4
patch embedding and Swin's 2x2 patch merging (odd maps zero-padded bottom/right), no layer scale.

Layout follows timm's Swin: channels-last inside the stages, the patch merging at the start of
stages 1..3, so stage outputs (``feature_info``, ``forward_intermediates``) are the pre-merge maps
a detection backbone taps. Maps smaller than kernel x dilation are padded by the attention layer
(the original refused them).
"""
import functools
import re
from typing import Any, Dict, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ..pretrained import registry_default_cfgs
from ._helpers import (
    adapt_input_conv_weight, check_state_dict_fits, downsample_to_next_stage, family_cfg, original_head_key,
    unwrap_state_dict,
)
from .nat import Nat, _create_nat, dinat_dilations

__all__ = ['swin_patch_stem']  # the model class is Nat; checkpoint_filter_fn, remap_checkpoint stay module-level

_FIRST_CONV = 'patch_embed.proj'

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


def swin_patch_stem(
        in_chans: int,
        embed_dim: int,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
) -> nn.Module:
    """Swin's 4x4 stride-4 patch embedding, NHWC out; any input size (padded bottom/right to a
    multiple of 4, as the original did)."""
    return PatchEmbed(
        img_size=None,
        patch_size=4,
        in_chans=in_chans,
        embed_dim=embed_dim,
        norm_layer=norm_layer,
        output_fmt='NHWC',
        strict_img_size=False,
        dynamic_img_pad=True,
        device=device,
        dtype=dtype,
    )


def _from_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``classification/dinats.py`` naming -> timm naming."""
    out = {}
    for k, v in state_dict.items():
        if m := re.match(r'layers\.(\d+)\.blocks\.(.+)$', k):
            k = f'stages.{m[1]}.blocks.{m[2]}'
        else:
            k = downsample_to_next_stage(k, 'layers.') or original_head_key(k)
        out[k] = v
    return out


def remap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A published DiNAT_s checkpoint in timm naming (pure: no model, no checks).

    Accepts the original repository's ``.pth`` layout (``layers.i.blocks.j``,
    ``layers.i.downsample``, ``head``), optionally wrapped in ``{'model': ...}`` /
    ``{'state_dict': ...}``, or timm's own layout (returned as is).
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('layers.') for k in state_dict):
        return _from_original(state_dict)
    return dict(state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`remap_checkpoint`, the patch embedding adapted to the model's ``in_chans``, then a strict check.

    Raises listing every unexpected, missing or wrongly shaped key (the classifier is left to
    timm's loader, which drops or keeps it by ``num_classes``).
    """
    state_dict = adapt_input_conv_weight(remap_checkpoint(state_dict), model, _FIRST_CONV)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs) -> Nat:
    """Build a registered DiNAT_s variant: ``Nat`` with Swin's patch embedding and merging."""
    return _create_nat(
        variant, pretrained, filter_fn=checkpoint_filter_fn,
        stem_layer=swin_patch_stem, downsample_layer=PatchMerging, **kwargs)


# ----------------------------------------------------------------------------------------------
# Pretrained configs (facts from weights/checkpoints.toml) and registered architectures
# ----------------------------------------------------------------------------------------------

_cfg = functools.partial(family_cfg, first_conv=_FIRST_CONV, reduction=32)

_ARCHITECTURES = ('dinat_s_tiny', 'dinat_s_small', 'dinat_s_base', 'dinat_s_large', 'dinat_s_large_384')

default_cfgs = generate_default_cfgs(registry_default_cfgs(_ARCHITECTURES, _cfg))


_DEPTHS_TINY = (2, 2, 6, 2)
_DEPTHS = (2, 2, 18, 2)
_DILATIONS_224 = (8, 4, 2, 1)  # stage dilations for 224 inputs (56, 28, 14, 7 maps, kernel 7)
_DILATIONS_384 = (13, 6, 3, 1)  # for 384 inputs (96, 48, 24, 12 maps)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT_s-Tiny."""
    model_args = dict(
        embed_dim=96, depths=_DEPTHS_TINY, num_heads=(3, 6, 12, 24), mlp_ratio=4., kernel_size=7,
        dilations=dinat_dilations(_DEPTHS_TINY, _DILATIONS_224))
    return _create_dinat_s('dinat_s_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT_s-Small."""
    model_args = dict(
        embed_dim=96, depths=_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=4., kernel_size=7,
        dilations=dinat_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT_s-Base."""
    model_args = dict(
        embed_dim=128, depths=_DEPTHS, num_heads=(4, 8, 16, 32), mlp_ratio=4., kernel_size=7,
        dilations=dinat_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT_s-Large, 224 (ImageNet-22k pre-trained; ``.in22k`` is the 21841-class pre-training head)."""
    model_args = dict(
        embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=4., kernel_size=7,
        dilations=dinat_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT_s-Large, 384 (dilations scaled to the larger maps)."""
    model_args = dict(
        embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=4., kernel_size=7,
        dilations=dinat_dilations(_DEPTHS, _DILATIONS_384))
    return _create_dinat_s('dinat_s_large_384', pretrained=pretrained, **dict(model_args, **kwargs))
