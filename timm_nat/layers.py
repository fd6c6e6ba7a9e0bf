"""Neighborhood-attention building blocks shared by the NAT-family models (channels-last, NHWC)."""
from __future__ import annotations

import functools

from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, to_2tuple, trunc_normal_

from .attention import na2d

__all__ = ["NeighborhoodAttention2d", "NeighborhoodAttentionBlock"]

IntOrPair = Union[int, Tuple[int, int]]


class NeighborhoodAttention2d(nn.Module):
    """2-D (dilated) neighborhood attention with optional relative positional bias (RPB).

    Input and output are NHWC ``[batch, height, width, dim]``. Maps smaller than
    ``kernel_size * dilation`` on an axis are zero-padded on the bottom/right up to that size
    before the qkv projection and cropped back afterwards (padded tokens therefore carry
    qkv = bias), as NATTEN's module and transformers did for the published checkpoints.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: IntOrPair = 7,
            dilation: IntOrPair = 1,
            qkv_bias: bool = True,
            rel_pos_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels of input and output.
            num_heads: Attention heads (must divide ``dim``).
            kernel_size: Neighbourhood size, int or (kh, kw).
            dilation: Dilation, int or (dh, dw).
            qkv_bias: Bias in the fused qkv projection.
            rel_pos_bias: Learn an RPB table ``rpb`` of shape [heads, 2kh-1, 2kw-1].
            qk_scale: Logit scale, default ``head_dim ** -0.5``.
            attn_drop: Dropout on attention probabilities; must be 0 (``na2d`` is fused and never
                materialises them).
            proj_drop: Dropout after the output projection.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if attn_drop > 0:
            raise NotImplementedError(
                "attention-probability dropout is not supported: the fused na2d operator never materialises "
                "the attention probabilities (no published NAT/DiNAT model used it)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(dilation)
        # smallest map the operator accepts on each axis
        self.window_size = tuple(k * d for k, d in zip(self.kernel_size, self.dilation))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kh - 1, 2 * kw - 1, **dd))
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the RPB table (the linears keep their own init unless the model re-inits them)."""
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        pad_bottom = max(0, self.window_size[0] - height)
        pad_right = max(0, self.window_size[1] - width)
        if pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = height + pad_bottom, width + pad_right

        # fused qkv channels are ordered (q|k|v, head, head_dim), the layout na2d takes directly
        qkv = self.qkv(x).reshape(batch, padded_height, padded_width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)
        x = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale)
        x = x.reshape(batch, padded_height, padded_width, channels)
        if pad_bottom or pad_right:
            x = x[:, :height, :width, :]
        x = self.proj(x)
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")


class NeighborhoodAttentionBlock(nn.Module):
    """Pre-norm transformer block: NHWC ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: IntOrPair = 7,
            dilation: IntOrPair = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            rel_pos_bias: bool = True,
            ls_init_value: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            attn_layer: Optional[Callable[..., nn.Module]] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels.
            num_heads: Attention heads.
            kernel_size: Neighbourhood size.
            dilation: Neighbourhood dilation.
            mlp_ratio: MLP hidden size as a multiple of ``dim``.
            qkv_bias: Bias in the qkv projection.
            rel_pos_bias: Use a relative positional bias in attention.
            ls_init_value: Layer-scale init value; no layer scale if None.
            proj_drop: Dropout after the attention projection and in the MLP.
            attn_drop: Attention-probability dropout (must be 0, see NeighborhoodAttention2d).
            drop_path: Stochastic depth rate.
            attn_layer: Build the attention with this instead of :class:`NeighborhoodAttention2d`
                (called with ``dim, num_heads=, qkv_bias=, attn_drop=, proj_drop=``; e.g. ViT-RPB's
                global attention); ``kernel_size``, ``dilation`` and ``rel_pos_bias`` then do not apply.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        if attn_layer is None:
            attn_layer = functools.partial(
                NeighborhoodAttention2d, kernel_size=kernel_size, dilation=dilation, rel_pos_bias=rel_pos_bias)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
