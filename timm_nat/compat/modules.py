"""NATTEN's legacy ``NeighborhoodAttention2D`` module (<= 0.17), state-dict compatible."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple, trunc_normal_

from ..attention import na2d
from ..layers import pad_to_window
from .functional import natten2dav, natten2dqkrpb

__all__ = ["NeighborhoodAttention2D", "pad_to_window"]

IntOrPair = Union[int, tuple[int, int]]


class NeighborhoodAttention2D(nn.Module):
    """Legacy NATTEN ``NeighborhoodAttention2D``: NHWC in and out, fused qkv, RPB table ``rpb``.

    Parameters and state-dict keys are NATTEN's (``qkv.weight``, ``qkv.bias``, ``rpb``,
    ``proj.weight``, ``proj.bias``), so checkpoints of models built on it load unchanged.
    Maps smaller than ``kernel_size * dilation`` are zero-padded on the bottom/right and cropped
    back, as NATTEN <= 0.14 did (0.15-0.17 refused them).

    Attention runs through the fused :func:`timm_nat.attention.na2d` unless attention-probability
    dropout is active (``attn_drop > 0`` in training); then it takes the unfused path
    ``natten2dqkrpb -> softmax -> dropout -> natten2dav`` so that the dropout really applies.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: IntOrPair,
            dilation: Optional[IntOrPair] = 1,
            *,
            bias: Optional[bool] = None,
            rel_pos_bias: Optional[bool] = None,
            is_causal: bool = False,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            use_experimental_ops: bool = False,
    ):
        """
        Args:
            dim: Channels of input and output.
            num_heads: Attention heads (must divide ``dim``).
            kernel_size: Neighbourhood size, int or (kh, kw).
            dilation: Dilation, int or (dh, dw); ``None`` means 1 (the original NAT models pass None).
            bias: NATTEN <= 0.14's name for ``rel_pos_bias``.
            rel_pos_bias: Learn an RPB table ``rpb`` [heads, 2kh-1, 2kw-1]. Default: on, as in NATTEN
                <= 0.14 and in every published NAT/DiNAT model (NATTEN 0.15-0.17 defaulted to off;
                code written for them that wants no RPB passes ``rel_pos_bias=False``).
            is_causal: Must be False (causal neighbourhoods are not supported).
            qkv_bias: Bias in the qkv projection.
            qk_scale: Logit scale; ``None`` (or 0, as NATTEN's ``or`` read it) means ``head_dim ** -0.5``.
            attn_drop: Dropout on the attention probabilities (training only; unfused path).
            proj_drop: Dropout after the output projection.
            use_experimental_ops: Accepted for NATTEN 0.17 compatibility; no effect.
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if is_causal:
            raise NotImplementedError("causal neighborhood attention is not supported by timm_nat.compat")
        if bias is not None and rel_pos_bias is not None and bias != rel_pos_bias:
            raise ValueError(f"bias={bias} and rel_pos_bias={rel_pos_bias} disagree (they are the same option)")
        use_rpb = next((flag for flag in (rel_pos_bias, bias) if flag is not None), True)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(1 if dilation is None else dilation)
        self.window_size = tuple(k * d for k, d in zip(self.kernel_size, self.dilation))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if use_rpb:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            trunc_normal_(self.rpb, std=.02, mean=0., a=-2., b=2.)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NeighborhoodAttention2D expects NHWC [batch, height, width, dim], got shape {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        x = pad_to_window(x, self.window_size)
        padded_height, padded_width = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, padded_height, padded_width, 3, self.num_heads, self.head_dim)
        if self.training and self.attn_drop_rate > 0:
            q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # each [batch, heads, H, W, head_dim]
            attn = natten2dqkrpb(q * self.scale, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
            x = natten2dav(self.attn_drop(attn), v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
        else:
            q, k, v = qkv.unbind(3)  # each [batch, H, W, heads, head_dim]
            x = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale)
        x = x.reshape(batch, padded_height, padded_width, channels)[:, :height, :width]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}")
