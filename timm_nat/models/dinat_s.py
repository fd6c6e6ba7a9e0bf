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
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ..layers import NeighborhoodAttentionBlock
from ..pretrained import registry_default_cfgs
from ._helpers import build_model_or_explain, check_state_dict_fits, unwrap_state_dict

__all__ = ['DinatS']  # checkpoint_filter_fn stays module-level: the package's is NAT's

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


class DinatSStage(nn.Module):
    """Optional Swin patch merging, then neighborhood-attention blocks (one dilation per block)."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            downsample: bool = True,
            num_heads: int = 4,
            kernel_size: _int_or_tuple_2_t = 7,
            dilations: Optional[Sequence[int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd)
        else:
            assert dim == out_dim
            self.downsample = nn.Identity()
        dilations = dilations or (1,) * depth
        self.blocks = nn.Sequential(*[
            NeighborhoodAttentionBlock(
                dim=out_dim,
                num_heads=num_heads,
                kernel_size=kernel_size,
                dilation=dilations[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class DinatS(nn.Module):
    """DiNAT_s: Swin Transformer with (dilated) neighborhood attention in place of shifted windows."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            patch_size: int = 4,
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            kernel_size: _int_or_tuple_2_t = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
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
            in_chans: Input image channels.
            num_classes: Classifier classes (0 for no classifier).
            global_pool: Global pooling type of the head.
            patch_size: Patch size (and stride) of the patch embedding.
            embed_dim: Channels of the first stage; doubled by every patch merging.
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            kernel_size: Neighbourhood size of every block.
            dilations: Per stage, one dilation per block; None for all ones.
            mlp_ratio: MLP hidden size as a multiple of the block's channels.
            qkv_bias: Bias in the qkv projections.
            drop_rate: Classifier dropout rate.
            proj_drop_rate: Dropout after attention projections and in the MLPs.
            attn_drop_rate: Attention-probability dropout (must be 0, see NeighborhoodAttention2d).
            drop_path_rate: Stochastic depth rate, rising linearly over all blocks (the published
                models trained with 0.2-0.5; 0 here, as timm models default to).
            norm_layer: Normalisation layer (channels-last).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        _check_stage_args(depths, num_heads, dilations)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]

        # any input size: pads bottom/right to a multiple of the patch, as the original did
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=dims[0],
            norm_layer=norm_layer,
            output_fmt='NHWC',
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        in_dim, reduction = dims[0], patch_size
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            stages += [DinatSStage(
                dim=in_dim,
                out_dim=dims[i],
                depth=depths[i],
                downsample=i > 0,
                num_heads=num_heads[i],
                kernel_size=kernel_size,
                dilations=dilations[i] if dilations is not None else None,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                **dd,
            )]
            in_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        named_apply(_init_weights, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Relative positional bias tables, exempt from weight decay as in the original training."""
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, per-block, final norm) for layer-wise LR decay."""
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing of the blocks."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it); optionally change the pooling."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **dd)
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
        """Forward that also returns stage outputs (before the next stage's patch merging).

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop after the last stage needed.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Only return the intermediates.
        Returns:
            List of intermediates, or a tuple of (final NHWC features, intermediates).
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_stages = len(self.stages)
        x = self.patch_embed(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                # final norm is sized for (and only applied to) the last stage
                x_inter = self.norm(x) if norm and i == num_stages - 1 else x
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)
        if intermediates_only:
            return intermediates
        if i == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm/head) not needed for the given intermediates; returns kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            # features now end at the last kept stage; the head was sized for the final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, stages and final norm; returns NHWC features."""
        x = self.patch_embed(x)
        x = self.stages(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool NHWC features and classify (or return the pooled features if ``pre_logits``)."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _check_stage_args(depths, num_heads, dilations) -> None:
    if len(num_heads) != len(depths):
        raise ValueError(f"num_heads {tuple(num_heads)} needs one entry per stage of depths {tuple(depths)}")
    if dilations is not None and (
            len(dilations) != len(depths) or any(len(d) != n for d, n in zip(dilations, depths))):
        raise ValueError(
            f"dilations must give one dilation per block of every stage (depths {tuple(depths)}), "
            f"got {[tuple(d) for d in dilations]}")


def _init_weights(module: nn.Module, name: str = '') -> None:
    """Published init: truncated-normal linears with zero bias (norms, convs, RPB init themselves)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _from_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``classification/dinats.py`` naming -> timm naming."""
    out = {}
    for k, v in state_dict.items():
        if m := re.match(r'layers\.(\d+)\.blocks\.(.+)$', k):
            k = f'stages.{m[1]}.blocks.{m[2]}'
        elif m := re.match(r'layers\.(\d+)\.downsample\.(.+)$', k):
            # the original merges at the end of a layer, timm at the start of the next stage
            k = f'stages.{int(m[1]) + 1}.downsample.{m[2]}'
        elif k.startswith('head.'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a published DiNAT_s checkpoint to this model's naming and check it strictly.

    Accepts the original repository's ``.pth`` layout (``layers.i.blocks.j``,
    ``layers.i.downsample``, ``head``), optionally wrapped in ``{'model': ...}`` /
    ``{'state_dict': ...}``, or timm's own layout. Raises listing every unexpected, missing or
    wrongly shaped key (the classifier is left to timm's loader, which drops or keeps it by
    ``num_classes``).
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('layers.') for k in state_dict):
        state_dict = _from_original(state_dict)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs) -> DinatS:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 1, 1))))))
    return build_model_or_explain(
        DinatS, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # the getter wraps forward_intermediates, so features_only maps are NCHW stage outputs
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


# ----------------------------------------------------------------------------------------------
# Pretrained configs (facts from weights/checkpoints.toml) and registered architectures
# ----------------------------------------------------------------------------------------------

def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        **kwargs,
    }


_ARCHITECTURES = ('dinat_s_tiny', 'dinat_s_small', 'dinat_s_base', 'dinat_s_large', 'dinat_s_large_384')

default_cfgs = generate_default_cfgs(registry_default_cfgs(_ARCHITECTURES, _cfg))


def _alternating_dilations(depths: Sequence[int], stage_dilations: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """DiNAT's schedule: blocks alternate dilation 1 (local) and the stage's dilation (sparse global)."""
    return tuple(
        tuple(1 if j % 2 == 0 else d for j in range(depth))
        for depth, d in zip(depths, stage_dilations))


_DEPTHS_TINY = (2, 2, 6, 2)
_DEPTHS = (2, 2, 18, 2)
_DILATIONS_224 = (8, 4, 2, 1)  # stage dilations for 224 inputs (56, 28, 14, 7 maps, kernel 7)
_DILATIONS_384 = (13, 6, 3, 1)  # for 384 inputs (96, 48, 24, 12 maps)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> DinatS:
    """DiNAT_s-Tiny."""
    model_args = dict(
        embed_dim=96, depths=_DEPTHS_TINY, num_heads=(3, 6, 12, 24), mlp_ratio=4., kernel_size=7,
        dilations=_alternating_dilations(_DEPTHS_TINY, _DILATIONS_224))
    return _create_dinat_s('dinat_s_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs) -> DinatS:
    """DiNAT_s-Small."""
    model_args = dict(
        embed_dim=96, depths=_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=4., kernel_size=7,
        dilations=_alternating_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs) -> DinatS:
    """DiNAT_s-Base."""
    model_args = dict(
        embed_dim=128, depths=_DEPTHS, num_heads=(4, 8, 16, 32), mlp_ratio=4., kernel_size=7,
        dilations=_alternating_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs) -> DinatS:
    """DiNAT_s-Large, 224 (ImageNet-22k pre-trained; ``.in22k`` is the 21841-class pre-training head)."""
    model_args = dict(
        embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=4., kernel_size=7,
        dilations=_alternating_dilations(_DEPTHS, _DILATIONS_224))
    return _create_dinat_s('dinat_s_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs) -> DinatS:
    """DiNAT_s-Large, 384 (dilations scaled to the larger maps)."""
    model_args = dict(
        embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=4., kernel_size=7,
        dilations=_alternating_dilations(_DEPTHS, _DILATIONS_384))
    return _create_dinat_s('dinat_s_large_384', pretrained=pretrained, **dict(model_args, **kwargs))
