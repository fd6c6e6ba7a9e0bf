""" Isotropic NAT, DiNAT and ViT-RPB

A timm implementation of the isotropic (ViT-like, single resolution) models of
`Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

that loads the published checkpoints (https://github.com/SHI-Labs/Neighborhood-Attention-Transformer,
``classification/isotropic.py``, MIT licence): a 16x16 patch embedding, then a plain stack of
pre-norm blocks at 1/16 resolution whose attention is
* NAT-isotropic: neighborhood attention with relative positional bias (RPB);
* DiNAT-isotropic: the same, with dilation on every odd block;
* ViT-RPB: global self-attention with a [heads, 2H-1, 2W-1] RPB table over the (H, W) map.

Unlike the original, which only ran at its training resolution, every model takes any input
size: inputs are padded to a multiple of the patch, neighborhood attention pads maps smaller
than kernel x dilation (as the hierarchical models do), and ViT-RPB resizes its bias table to
the actual map with timm's ``resize_rel_pos_bias_table`` (see :class:`RelPosGlobalAttention`).
"""
import functools
import re
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import (
    ClassifierHead, PatchEmbed, calculate_drop_path_rates, resize_rel_pos_bias_table, to_2tuple,
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq, named_apply

from .._timm_compat import get_device_dtype, reset_classifier_head
from ..layers import NeighborhoodAttentionBlock, RelPosGlobalAttention
from ._family import Arch, ModelFamily, register_family
from ._helpers import (
    adapt_input_conv_weight, build_model_or_explain, check_state_dict_fits, family_cfg,
    first_of_blocks, init_weights, original_head_key, unwrap_state_dict,
)

__all__ = ['NatIsotropic', 'RelPosGlobalAttention']  # checkpoint_filter_fn, remap_checkpoint stay module-level

_FIRST_CONV = 'patch_embed.proj'
_PATCH_SIZE = 16


class NatIsotropic(nn.Module):
    """Isotropic NAT / DiNAT (neighborhood attention) and ViT-RPB (``kernel_size=None``: global attention)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            kernel_size: Optional[int] = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input size the model is built for; only ViT-RPB depends on it (its bias
                table covers the ``img_size / patch_size`` map). Other sizes run too.
            patch_size: Patch size (and stride) of the patch embedding.
            in_chans: Input image channels.
            num_classes: Classifier classes (0 for no classifier).
            global_pool: Global pooling type of the head.
            embed_dim: Channels of every block.
            depth: Number of blocks.
            num_heads: Attention heads of every block.
            kernel_size: Neighbourhood size; None for global attention with RPB (ViT-RPB).
            dilation: Dilation of the odd blocks (even blocks use 1): 1 for NAT, 2 for DiNAT.
            mlp_ratio: MLP hidden size as a multiple of ``embed_dim``.
            qkv_bias: Bias in the qkv projections.
            drop_rate: Classifier dropout rate.
            proj_drop_rate: Dropout after attention projections and in the MLPs.
            attn_drop_rate: Attention-probability dropout (must be 0).
            drop_path_rate: Stochastic depth rate, rising linearly over the blocks (the published
                models trained with 0.1 / 0.4; 0 here, as timm models default to).
            norm_layer: Normalisation layer (channels-last).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False

        # any input size: pads bottom/right to a multiple of the patch, as the original did
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt='NHWC',
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        feat_size = tuple(-(-s // p) for s, p in zip(to_2tuple(img_size), self.patch_embed.patch_size))
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        block_args = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer, **dd)
        if kernel_size is None:
            global_attn = functools.partial(RelPosGlobalAttention, feat_size=feat_size)
            blocks = [
                NeighborhoodAttentionBlock(attn_layer=global_attn, drop_path=dpr[i], **block_args) for i in range(depth)]
        else:
            blocks = [
                NeighborhoodAttentionBlock(
                    kernel_size=kernel_size, dilation=1 if i % 2 == 0 else dilation, drop_path=dpr[i], **block_args)
                for i in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f'blocks.{i}') for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head = ClassifierHead(
            embed_dim,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        named_apply(init_weights, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Relative positional bias tables, exempt from weight decay as in the original training."""
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, per-block, final norm) for layer-wise LR decay."""
        return dict(
            stem=r'^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing of the blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it); optionally change the pooling."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        reset_classifier_head(self.head, num_classes, global_pool, self.num_features, **dd)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns block outputs, as timm's ViT does.

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to every intermediate.
            stop_early: Stop after the last block needed.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Only return the intermediates.
        Returns:
            List of intermediates, or a tuple of (final normed NHWC features, intermediates).
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(x)
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm/head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, blocks and final norm; returns NHWC features."""
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool NHWC features and classify (or return the pooled features if ``pre_logits``)."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _from_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``classification/isotropic.py`` naming -> timm naming, without the derived index buffers."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith('.relative_position_index'):
            continue  # ViT-RPB's persistent buffer: derived from the map size, not learned
        if m := re.match(r'layers\.(\d+)\.(.+)$', k):
            k = f'blocks.{m[1]}.{m[2]}'
        else:
            k = original_head_key(k)
        out[k] = v
    return out


def _resize_global_rpb(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize ViT-RPB bias tables trained for another map size to the model's (timm's resampling)."""
    for name, module in model.named_modules():
        key = f'{name}.rpb'
        if isinstance(module, RelPosGlobalAttention) and key in state_dict:
            table = state_dict[key]
            if table.dim() == 3 and table.shape != module.rpb.shape:
                state_dict[key] = resize_rel_pos_bias_table(
                    table, new_window_size=module.feat_size, new_bias_shape=tuple(module.rpb.shape))
    return state_dict


def remap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A published isotropic NAT / DiNAT / ViT-RPB checkpoint in timm naming (pure: no model, no checks).

    Accepts the original repository's ``.pth`` layout (``layers.i``, ``head``, ViT-RPB's
    ``relative_position_index`` buffers, which are dropped), optionally wrapped in
    ``{'model': ...}`` / ``{'state_dict': ...}``, or timm's own layout.
    """
    return _from_original(unwrap_state_dict(state_dict))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`remap_checkpoint`, ViT-RPB tables resized and the patch embedding adapted to ``model``
    (its ``img_size`` and ``in_chans``), then a strict check.

    ViT-RPB bias tables made for another feature-map size (e.g. 224 weights into ``img_size=384``)
    are resized with timm's ``resize_rel_pos_bias_table``. Raises listing every unexpected,
    missing or wrongly shaped key (the classifier is left to timm's loader, which drops or keeps
    it by ``num_classes``).
    """
    state_dict = _resize_global_rpb(remap_checkpoint(state_dict), model)
    state_dict = adapt_input_conv_weight(state_dict, model, _FIRST_CONV)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NatIsotropic:
    """Build a registered isotropic variant (``features_only`` maps: the last block outputs)."""
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_or_explain(
        NatIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # the getter wraps forward_intermediates, so features_only maps are NCHW block outputs
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


# ----------------------------------------------------------------------------------------------
# Hyper-parameters from checkpoints (timm-named keys) and registered architectures
# ----------------------------------------------------------------------------------------------

_GLOBAL_ATTENTION = ('vitrpb_small', 'vitrpb_base')  # architectures with a global RPB table


def _infer_kwargs(state_dict: Dict[str, torch.Tensor], arch: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Isotropic NAT / DiNAT / ViT-RPB sizes from timm names (``blocks.i``); None if not this layout.

    Neighborhood and global attention share a layout; the RPB table spans ``2k-1`` (kernel k) or
    ``2H-1`` (map H). Legacy NATTEN, which trained every published model, took odd kernels only,
    so an even extent is a global table; for an odd one ``arch`` decides (None: a kernel).
    """
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r'blocks\.(\d+)\.(.+)', key):
            layers.setdefault(int(m[1]), {})[m[2]] = value
    stem = state_dict.get('patch_embed.proj.weight')
    rpb, fc1 = first_of_blocks(layers, 'attn.rpb'), first_of_blocks(layers, 'mlp.fc1.weight')
    if stem is None or stem.dim() != 4 or rpb is None or fc1 is None:
        return None
    embed_dim, patch_size, extent = stem.shape[0], stem.shape[-1], (rpb.shape[-1] + 1) // 2
    kwargs = dict(patch_size=patch_size, embed_dim=embed_dim, depth=max(layers) + 1, num_heads=rpb.shape[0],
                  mlp_ratio=fc1.shape[0] / embed_dim)
    if arch in _GLOBAL_ATTENTION or (arch is None and extent % 2 == 0):
        kwargs['img_size'] = extent * patch_size
    else:
        kwargs['kernel_size'] = extent
    return kwargs


def _candidates(kwargs: Dict[str, Any]) -> List[Tuple[str, str]]:
    if 'img_size' in kwargs:
        return [('vitrpb_small', '')]
    return [('nat_isotropic_small', 'NAT: dilation 1'), ('dinat_isotropic_small', 'DiNAT: dilation 2 on odd blocks'),
            ('vitrpb_small', f"ViT-RPB: global attention over a {kwargs['kernel_size']}x{kwargs['kernel_size']} map")]


_SMALL = dict(patch_size=_PATCH_SIZE, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.)
_BASE = dict(patch_size=_PATCH_SIZE, embed_dim=768, depth=12, num_heads=24, mlp_ratio=4.)

FAMILY = register_family(ModelFamily(
    name='isotropic',
    module=__name__,
    architectures={
        'nat_isotropic_small': Arch("NAT-isotropic-Small (7x7 neighborhood attention).",
                                    dict(_SMALL, kernel_size=7, dilation=1)),
        'nat_isotropic_base': Arch("NAT-isotropic-Base (7x7 neighborhood attention).",
                                   dict(_BASE, kernel_size=7, dilation=1)),
        'dinat_isotropic_small': Arch("DiNAT-isotropic-Small (7x7 neighborhood attention, dilation 2 on odd blocks).",
                                      dict(_SMALL, kernel_size=7, dilation=2)),
        'dinat_isotropic_base': Arch("DiNAT-isotropic-Base (7x7 neighborhood attention, dilation 2 on odd blocks).",
                                     dict(_BASE, kernel_size=7, dilation=2)),
        'vitrpb_small': Arch("ViT-RPB-Small (global attention with relative positional bias).",
                             dict(_SMALL, kernel_size=None)),
        'vitrpb_base': Arch("ViT-RPB-Base (global attention with relative positional bias).",
                            dict(_BASE, kernel_size=None)),
    },
    build=_create_isotropic,
    # the final map of these models is 1/16 of the input (the patch size)
    make_cfg=functools.partial(family_cfg, first_conv=_FIRST_CONV, reduction=_PATCH_SIZE),
    remap_checkpoint=remap_checkpoint,
    checkpoint_filter_fn=checkpoint_filter_fn,
    model_kwargs=frozenset({'embed_dim', 'num_heads', 'kernel_size', 'mlp_ratio', 'qkv_bias', 'img_size', 'patch_size',
                            'depth', 'dilation'}),
    infer_kwargs=_infer_kwargs,
    candidates=_candidates,
))
