""" NAT and DiNAT: (Dilated) Neighborhood Attention Transformers

A timm implementation of
* `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
* `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

that loads the published checkpoints (https://github.com/SHI-Labs/Neighborhood-Attention-Transformer,
MIT licence) in both the original layout and the transformers (``shi-labs/*`` Hub) layout.
DiNAT is NAT with per-block dilations, so both families are the one ``Nat`` class.

Layout follows timm's Swin: channels-last inside the stages, the downsampler at the start of
stages 1..3, so stage outputs (``feature_info``, ``forward_intermediates``) are the
pre-downsample maps a detection backbone taps.
"""
import functools
import re
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, calculate_drop_path_rates
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply

from .._timm_compat import get_device_dtype, reset_classifier_head
from ..layers import NeighborhoodAttentionBlock
from ._family import Arch, ModelFamily, register_family
from ._helpers import (
    adapt_input_conv_weight, backbone_of_checkpoint, blocks_by_index, build_model_or_explain, check_state_dict_fits,
    downsample_to_next_stage, family_cfg, first_of_blocks, init_weights, original_head_key, out_norm_key,
    split_backbone, unwrap_state_dict,
)

__all__ = ['Nat', 'checkpoint_filter_fn', 'remap_checkpoint']  # and the entrypoints; FAMILY is the declaration

_FIRST_CONV = 'patch_embed.proj.0'  # the first of the stem's two convs

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (no activation between, as published) then a norm: NCHW in, NHWC out."""

    def __init__(
            self,
            in_chans: int = 3,
            embed_dim: int = 64,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convs are ~2x faster on CPU (oneDNN), and their output is NHWC already
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (no bias) doubling channels, then a norm: NHWC in and out."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NatStage(nn.Module):
    """Optional downsampler, then neighborhood-attention blocks (one dilation per block)."""

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
            ls_init_value: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            downsample_layer: Callable[..., nn.Module] = ConvDownsample,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = downsample_layer(dim, out_dim, norm_layer=norm_layer, **dd)
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
                ls_init_value=ls_init_value,
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


class Nat(nn.Module):
    """(Dilated) Neighborhood Attention Transformer.

    NAT: ``dilations=None``. DiNAT: ``dilations`` gives one dilation per block of every stage.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 6, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: _int_or_tuple_2_t = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            stem_layer: Callable[..., nn.Module] = ConvStem,
            downsample_layer: Callable[..., nn.Module] = ConvDownsample,
            out_norms: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Input image channels.
            num_classes: Classifier classes (0 for no classifier).
            global_pool: Global pooling type of the head.
            embed_dim: Channels of the first stage; doubled by every downsampler.
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            kernel_size: Neighbourhood size of every block.
            dilations: Per stage, one dilation per block (DiNAT); None for all ones (NAT).
            mlp_ratio: MLP hidden size as a multiple of the block's channels.
            qkv_bias: Bias in the qkv projections.
            ls_init_value: Layer-scale init value; no layer scale if None.
            drop_rate: Classifier dropout rate.
            proj_drop_rate: Dropout after attention projections and in the MLPs.
            attn_drop_rate: Attention-probability dropout (must be 0, see NeighborhoodAttention2d).
            drop_path_rate: Stochastic depth rate, rising linearly over all blocks.
            norm_layer: Normalisation layer (channels-last).
            stem_layer: Stride-4 stem, called ``(in_chans, embed_dim, norm_layer=)``: NCHW in, NHWC out
                (NAT's two 3x3 convs; DiNAT_s passes Swin's 4x4 patch embedding).
            downsample_layer: Stride-2 downsampler between stages, ``(dim, out_dim, norm_layer=)``, NHWC
                (NAT's 3x3 conv; DiNAT_s passes Swin's patch merging).
            out_norms: One norm per stage output (``out_norms.i``) instead of the final norm, as the
                published detection / segmentation backbones (their ``norm{i}``): stage outputs
                (``forward_intermediates``, ``features_only``) go through them; the next stage
                takes the map before it.
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

        self.patch_embed = stem_layer(in_chans, dims[0], norm_layer=norm_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        in_dim, reduction = dims[0], 4
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            stages += [NatStage(
                dim=in_dim,
                out_dim=dims[i],
                depth=depths[i],
                downsample=i > 0,
                num_heads=num_heads[i],
                kernel_size=kernel_size,
                dilations=dilations[i] if dilations is not None else None,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                downsample_layer=downsample_layer,
                **dd,
            )]
            in_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.out_norms = nn.ModuleList([norm_layer(d, **dd) for d in dims]) if out_norms else None
        self.norm = nn.Identity() if out_norms else norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
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
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
                (r'^out_norms\.(\d+)', (99999,)),
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
        """Forward that also returns stage outputs (before the next stage's downsampler).

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's intermediate (the per-output norms of
                an ``out_norms`` model always apply).
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
                x_inter = self.out_norms[i](x) if self.out_norms is not None else x
                # final norm is sized for (and only applied to) the last stage
                x_inter = self.norm(x_inter) if norm and i == num_stages - 1 else x_inter
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
        if self.out_norms is not None:  # the taken outputs keep their norms
            self.out_norms = nn.ModuleList([
                norm if i in take_indices else nn.Identity() for i, norm in enumerate(self.out_norms[:max_index + 1])])
        if prune_end:
            # features now end at the last kept stage; the head was sized for the final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and final norm; returns NHWC features."""
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
    if dilations is None:
        return
    if len(dilations) != len(depths) or any(len(d) != n for d, n in zip(dilations, depths)):
        raise ValueError(
            f"dilations must give one dilation per block of every stage (depths {tuple(depths)}), "
            f"got {[tuple(d) for d in dilations]}")


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion: transformers (shi-labs/* Hub) and original (.pth) layouts -> timm
# ----------------------------------------------------------------------------------------------


# per-block renames, transformers -> timm (order matters: 'attention.output.dense' before 'output.dense')
_TRANSFORMERS_BLOCK_RENAMES = (
    ('layernorm_before.', 'norm1.'),
    ('attention.self.rpb', 'attn.rpb'),
    ('attention.output.dense.', 'attn.proj.'),
    ('layernorm_after.', 'norm2.'),
    ('intermediate.dense.', 'mlp.fc1.'),
    ('output.dense.', 'mlp.fc2.'),
)
# the rest of the transformers model, outside the blocks and downsamplers
_TRANSFORMERS_RENAMES = (
    ('embeddings.patch_embeddings.projection.', 'patch_embed.proj.'),
    ('embeddings.norm.', 'patch_embed.norm.'),
    ('layernorm.', 'norm.'),
    ('classifier.', 'head.fc.'),
)
_ORIGINAL_BLOCK_RENAMES = (('gamma1', 'ls1.gamma'), ('gamma2', 'ls2.gamma'))


def _rename_prefix(rest: str, renames) -> str:
    """``rest`` with the first matching ``(old, new)`` prefix replaced (unchanged if none matches)."""
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _checkpoint_format(state_dict: Dict[str, Any]) -> str:
    """'transformers', 'original' or 'timm', from the key names."""
    if any(k.startswith(('nat.', 'dinat.', 'embeddings.', 'encoder.')) for k in state_dict):
        return 'transformers'
    if any(k.startswith('levels.') for k in state_dict):
        return 'original'
    return 'timm'


def _from_transformers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers ``Nat``/``Dinat`` naming -> timm naming (query/key/value fused, layer scales split)."""
    out = {}
    qkv_parts = defaultdict(dict)  # fused qkv name -> {'query': w, 'key': w, 'value': w}
    for k, v in state_dict.items():
        k = re.sub(r'^(di)?nat\.', '', k)
        if m := re.match(r'encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$', k):
            block, rest = f'stages.{m[1]}.blocks.{m[2]}.', m[3]
            if rest == 'layer_scale_parameters':  # [2, dim]: attention gamma, then MLP gamma
                out[block + 'ls1.gamma'], out[block + 'ls2.gamma'] = v[0], v[1]
            elif qkv := re.match(r'attention\.self\.(query|key|value)\.(weight|bias)$', rest):
                qkv_parts[f'{block}attn.qkv.{qkv[2]}'][qkv[1]] = v
            else:
                out[block + _rename_prefix(rest, _TRANSFORMERS_BLOCK_RENAMES)] = v
        else:
            out[downsample_to_next_stage(k, 'encoder.levels.') or out_norm_key(k)
                or _rename_prefix(k, _TRANSFORMERS_RENAMES)] = v
    for name, parts in qkv_parts.items():
        if set(parts) != {'query', 'key', 'value'}:
            raise RuntimeError(f"incomplete query/key/value for {name}: only {sorted(parts)} in the checkpoint")
        out[name] = torch.cat([parts['query'], parts['key'], parts['value']], dim=0)
    return out


def _from_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``classification/nat.py`` / ``dinat.py`` naming -> timm naming."""
    out = {}
    for k, v in state_dict.items():
        if m := re.match(r'levels\.(\d+)\.blocks\.(\d+)\.(.+)$', k):
            k = f'stages.{m[1]}.blocks.{m[2]}.' + _rename_prefix(m[3], _ORIGINAL_BLOCK_RENAMES)
        else:
            k = downsample_to_next_stage(k, 'levels.') or out_norm_key(k) or original_head_key(k)
        out[k] = v
    return out


def remap_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A published NAT/DiNAT checkpoint in timm naming (pure: no model, no checks).

    Accepts the transformers layout (``nat.``/``dinat.`` prefixed or headless, separate
    query/key/value, ``layer_scale_parameters`` [2, dim], ``classifier``), the original
    repository's ``.pth`` layout (``levels.i.blocks.j``, ``gamma1``/``gamma2``, ``head``),
    optionally wrapped in ``{'model': ...}`` / ``{'state_dict': ...}``, or timm's own layout
    (returned as is). Of a whole detection / segmentation checkpoint (mmdet, mmseg, detectron2,
    transformers OneFormer) only the backbone is taken, its per-output norms as ``out_norms.i``.
    """
    state_dict, _ = split_backbone(unwrap_state_dict(state_dict))
    fmt = _checkpoint_format(state_dict)
    if fmt == 'transformers':
        return _from_transformers(state_dict)
    if fmt == 'original':
        return _from_original(state_dict)
    return dict(state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`remap_checkpoint`, the stem adapted to the model's ``in_chans``, then a strict check.

    Raises listing every unexpected, missing or wrongly shaped key (the classifier excepted,
    see :func:`._helpers.check_state_dict_fits`). Of a whole detection / segmentation checkpoint
    only the backbone is used; the rest is counted in a warning.
    """
    state_dict = adapt_input_conv_weight(remap_checkpoint(backbone_of_checkpoint(state_dict)), model, _FIRST_CONV)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_nat(variant: str, pretrained: bool = False, filter_fn=checkpoint_filter_fn, **kwargs) -> Nat:
    """Build a registered ``Nat`` variant; other families built on Nat pass their own checkpoint filter."""
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 1, 1))))))
    return build_model_or_explain(
        Nat, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        # the getter wraps forward_intermediates, so features_only maps are NCHW stage outputs
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


# ----------------------------------------------------------------------------------------------
# Hyper-parameters from checkpoints: timm-named keys (any published layout, remapped) and transformers configs
# ----------------------------------------------------------------------------------------------

# hyper-parameters a config.json / --model-args may set, shared by the hierarchical families
HIERARCHICAL_MODEL_KWARGS = frozenset({'embed_dim', 'num_heads', 'kernel_size', 'mlp_ratio', 'qkv_bias', 'depths',
                                       'dilations', 'out_norms'})


def hierarchical_kwargs(state_dict: Dict[str, torch.Tensor], stem_ok: Callable[[Dict], bool]) -> Optional[Dict]:
    """NAT / DiNAT / DiNAT_s sizes from timm names (``stages.i.blocks.j``); None if not this layout."""
    stages = blocks_by_index(state_dict, r'stages\.(\d+)\.blocks\.(\d+)\.(.+)')
    if not stages or sorted(stages) != list(range(len(stages))) or not stem_ok(state_dict):
        return None
    rpbs = {i: r for i in sorted(stages) if (r := first_of_blocks(stages[i], 'attn.rpb')) is not None}
    dim, fc1 = first_of_blocks(stages[0], 'norm1.weight'), first_of_blocks(stages[0], 'mlp.fc1.weight')
    if dim is None or fc1 is None or not rpbs:
        return None
    # heads double per stage in every published size: a stage whose RPB is missing altogether
    # follows that rule, so the strict check names the missing key instead of every key
    known, rpb = next(iter(rpbs.items()))
    kwargs = dict(
        embed_dim=dim.shape[0],
        depths=tuple(max(stages[i]) + 1 for i in sorted(stages)),
        num_heads=tuple(rpbs[i].shape[0] if i in rpbs else max(1, int(rpb.shape[0] * 2.0 ** (i - known)))
                        for i in sorted(stages)),
        kernel_size=(rpb.shape[-1] + 1) // 2,  # rpb is [heads, 2k-1, 2k-1]
        mlp_ratio=fc1.shape[0] / dim.shape[0],
    )
    if first_of_blocks(stages[0], 'ls1.gamma') is not None:
        kwargs['ls_init_value'] = 1e-5  # the published init; loaded weights replace it
    if 'out_norms.0.weight' in state_dict:  # a detection / segmentation backbone
        kwargs['out_norms'] = True
    return kwargs


def downsample_dims(state_dict: Dict[str, torch.Tensor]) -> Set[int]:
    """Ranks of the downsamplers' weights: 4 for NAT's convs, 2 for Swin's linear patch merging."""
    return {v.dim() for k, v in state_dict.items() if re.fullmatch(r'stages\.\d+\.downsample\.reduction\.weight', k)}


def _infer_kwargs(state_dict: Dict[str, torch.Tensor], arch: Optional[str] = None) -> Optional[Dict]:
    """NAT / DiNAT: two-conv stem (``patch_embed.proj.0/1``), conv downsamplers."""
    return hierarchical_kwargs(state_dict, lambda sd: (
        'patch_embed.proj.1.weight' in sd or 'patch_embed.proj.0.weight' in sd or downsample_dims(sd) == {4}))


def dilations_hint(depths: Sequence[int]) -> str:
    """How to pass dilations for ``depths`` on the converter's command line."""
    return f"""'{{"dilations": [[...], ...]}}' (per stage, one per block: {', '.join(map(str, depths))})"""


def _candidates(kwargs: Dict) -> List[Tuple[str, str]]:
    return [('nat_mini', 'NAT: dilation 1 in every block'),
            ('dinat_mini', f"DiNAT: also pass --model-args {dilations_hint(kwargs['depths'])}")]


def _kwargs_from_transformers_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """timm kwargs of a transformers ``NatConfig`` / ``DinatConfig`` dict (KeyError / TypeError if mangled)."""
    kwargs = dict(
        embed_dim=config['embed_dim'],
        depths=tuple(config['depths']),
        num_heads=tuple(config['num_heads']),
        kernel_size=config['kernel_size'],
        mlp_ratio=config['mlp_ratio'],
    )
    if config.get('layer_scale_init_value'):  # transformers: 0.0 means no layer scale
        kwargs['ls_init_value'] = config['layer_scale_init_value']
    if config['model_type'] == 'dinat':
        kwargs['dilations'] = tuple(tuple(d) for d in config['dilations'])
    return kwargs


# ----------------------------------------------------------------------------------------------
# Registered architectures (pretrained cfgs: facts from weights/checkpoints.toml)
# ----------------------------------------------------------------------------------------------

def dinat_dilations(depths: Sequence[int], stage_dilations: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """DiNAT's schedule: blocks alternate dilation 1 (local) and the stage's dilation (sparse global)."""
    return tuple(
        tuple(1 if j % 2 == 0 else d for j in range(depth))
        for depth, d in zip(depths, stage_dilations))


_DEPTHS_MINI = (3, 4, 6, 5)
_DEPTHS = (3, 4, 18, 5)
DILATIONS_224 = (8, 4, 2, 1)  # stage dilations for 224 inputs (56, 28, 14, 7 maps, kernel 7)
DILATIONS_384 = (13, 6, 3, 1)  # for 384 inputs (96, 48, 24, 12 maps)
_MINI = dict(embed_dim=64, depths=_DEPTHS_MINI, num_heads=(2, 4, 8, 16), mlp_ratio=3., kernel_size=7)
_TINY = dict(_MINI, depths=_DEPTHS)
_SMALL = dict(embed_dim=96, depths=_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=2., kernel_size=7)
_BASE = dict(embed_dim=128, depths=_DEPTHS, num_heads=(4, 8, 16, 32), mlp_ratio=2., kernel_size=7, ls_init_value=1e-5)
_LARGE = dict(embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=2., kernel_size=7)

FAMILY = register_family(ModelFamily(
    name='nat',
    module=__name__,
    architectures={
        'nat_mini': Arch("NAT-Mini.", _MINI),
        'nat_tiny': Arch("NAT-Tiny.", _TINY),
        'nat_small': Arch("NAT-Small (layer scale).", dict(_SMALL, ls_init_value=1e-5)),
        'nat_base': Arch("NAT-Base (layer scale).", _BASE),
        'dinat_mini': Arch("DiNAT-Mini.", dict(_MINI, dilations=dinat_dilations(_DEPTHS_MINI, DILATIONS_224))),
        'dinat_tiny': Arch("DiNAT-Tiny.", dict(_TINY, dilations=dinat_dilations(_DEPTHS, DILATIONS_224))),
        'dinat_small': Arch("DiNAT-Small (no layer scale, unlike NAT-Small).",
                            dict(_SMALL, dilations=dinat_dilations(_DEPTHS, DILATIONS_224))),
        'dinat_base': Arch("DiNAT-Base (layer scale).", dict(_BASE, dilations=dinat_dilations(_DEPTHS, DILATIONS_224))),
        'dinat_large': Arch("DiNAT-Large, 224 (no layer scale).",
                            dict(_LARGE, dilations=dinat_dilations(_DEPTHS, DILATIONS_224))),
        'dinat_large_384': Arch("DiNAT-Large, 384 (dilations scaled to the larger maps).",
                                dict(_LARGE, dilations=dinat_dilations(_DEPTHS, DILATIONS_384))),
        'dinat_large_384_11x11': Arch("DiNAT-Large, 384, 11x11 kernel (with the 224 dilations).",
                                      dict(_LARGE, kernel_size=11, dilations=dinat_dilations(_DEPTHS, DILATIONS_224))),
    },
    build=_create_nat,
    make_cfg=functools.partial(family_cfg, first_conv=_FIRST_CONV, reduction=32),
    remap_checkpoint=remap_checkpoint,
    checkpoint_filter_fn=checkpoint_filter_fn,
    model_kwargs=HIERARCHICAL_MODEL_KWARGS | {'ls_init_value'},
    infer_kwargs=_infer_kwargs,
    candidates=_candidates,
    transformers_model_types={'nat': 'nat_mini', 'dinat': 'dinat_mini'},
    kwargs_from_transformers_config=_kwargs_from_transformers_config,
))
