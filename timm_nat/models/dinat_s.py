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
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging

from ._family import Arch, ModelFamily, register_family
from ._helpers import (
    adapt_input_conv_weight, backbone_of_checkpoint, check_state_dict_fits, downsample_to_next_stage, family_cfg,
    original_head_key, out_norm_key, split_backbone, unwrap_state_dict,
)
from .nat import (
    DILATIONS_224, DILATIONS_384, HIERARCHICAL_MODEL_KWARGS, Nat, _create_nat, dilations_hint, dinat_dilations,
    downsample_dims, hierarchical_kwargs,
)

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
            k = downsample_to_next_stage(k, 'layers.') or out_norm_key(k) or original_head_key(k)
        out[k] = v
    return out


def remap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A published DiNAT_s checkpoint in timm naming (pure: no model, no checks).

    Accepts the original repository's ``.pth`` layout (``layers.i.blocks.j``,
    ``layers.i.downsample``, ``head``), optionally wrapped in ``{'model': ...}`` /
    ``{'state_dict': ...}``, or timm's own layout (returned as is). Of a whole mmdet / mmseg
    checkpoint only the backbone is taken, its per-output norms as ``out_norms.i``.
    """
    state_dict, _ = split_backbone(unwrap_state_dict(state_dict))
    if any(k.startswith('layers.') for k in state_dict):
        return _from_original(state_dict)
    return dict(state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`remap_checkpoint`, the patch embedding adapted to the model's ``in_chans``, then a strict check.

    Raises listing every unexpected, missing or wrongly shaped key (the classifier is left to
    timm's loader, which drops or keeps it by ``num_classes``). Of a whole detection / segmentation
    checkpoint only the backbone is used; the rest is counted in a warning.
    """
    state_dict = adapt_input_conv_weight(remap_checkpoint(backbone_of_checkpoint(state_dict)), model, _FIRST_CONV)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs) -> Nat:
    """Build a registered DiNAT_s variant: ``Nat`` with Swin's patch embedding and merging."""
    return _create_nat(
        variant, pretrained, filter_fn=checkpoint_filter_fn,
        stem_layer=swin_patch_stem, downsample_layer=PatchMerging, **kwargs)


def _infer_kwargs(state_dict: Dict[str, torch.Tensor], arch: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """DiNAT_s sizes from timm names: Swin's 4x4 patch embedding (``patch_embed.proj``), linear patch merging."""
    return hierarchical_kwargs(state_dict, lambda sd: (
        getattr(sd.get('patch_embed.proj.weight'), 'ndim', 0) == 4 or downsample_dims(sd) == {2}))


# ----------------------------------------------------------------------------------------------
# Registered architectures (pretrained cfgs: facts from weights/checkpoints.toml)
# ----------------------------------------------------------------------------------------------

_DEPTHS_TINY = (2, 2, 6, 2)
_DEPTHS = (2, 2, 18, 2)
_SMALL = dict(embed_dim=96, depths=_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=4., kernel_size=7,
              dilations=dinat_dilations(_DEPTHS, DILATIONS_224))
_LARGE = dict(_SMALL, embed_dim=192, num_heads=(6, 12, 24, 48))

FAMILY = register_family(ModelFamily(
    name='dinat_s',
    module=__name__,
    architectures={
        'dinat_s_tiny': Arch("DiNAT_s-Tiny.", dict(
            _SMALL, depths=_DEPTHS_TINY, dilations=dinat_dilations(_DEPTHS_TINY, DILATIONS_224))),
        'dinat_s_small': Arch("DiNAT_s-Small.", _SMALL),
        'dinat_s_base': Arch("DiNAT_s-Base.", dict(_SMALL, embed_dim=128, num_heads=(4, 8, 16, 32))),
        'dinat_s_large': Arch(
            "DiNAT_s-Large, 224 (ImageNet-22k pre-trained; ``.in22k`` is the 21841-class pre-training head).", _LARGE),
        'dinat_s_large_384': Arch("DiNAT_s-Large, 384 (dilations scaled to the larger maps).",
                                  dict(_LARGE, dilations=dinat_dilations(_DEPTHS, DILATIONS_384))),
    },
    build=_create_dinat_s,
    make_cfg=functools.partial(family_cfg, first_conv=_FIRST_CONV, reduction=32),
    remap_checkpoint=remap_checkpoint,
    checkpoint_filter_fn=checkpoint_filter_fn,
    model_kwargs=HIERARCHICAL_MODEL_KWARGS,
    infer_kwargs=_infer_kwargs,
    candidates=lambda kwargs: [('dinat_s_tiny', f"also pass --model-args {dilations_hint(kwargs['depths'])}")],
))
