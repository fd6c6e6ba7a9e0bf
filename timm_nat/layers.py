"""Attention layers and the transformer block shared by the NAT-family models (channels-last, NHWC).

The models reach the neighborhood-attention operator only through this module:
* :class:`NeighborhoodAttention2d`: (dilated) neighborhood attention with relative positional bias
  (NAT, DiNAT, DiNAT_s, isotropic NAT / DiNAT);
* :class:`RelPosGlobalAttention`: global attention with a relative positional bias (ViT-RPB);
* :class:`NeighborhoodAttentionBlock`: the pre-norm transformer block around either.
Both attention layers share :class:`QkvAttention2d` (fused qkv, heads, scale, output projection).
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, resize_rel_pos_bias_table, trunc_normal_

from .attention import na2d
from .attention.functional import int_pair

__all__ = ["QkvAttention2d", "NeighborhoodAttention2d", "RelPosGlobalAttention", "NeighborhoodAttentionBlock",
           "pad_to_window", "global_attention", "rel_pos_bias_table"]

IntOrPair = Union[int, Tuple[int, int]]


class QkvAttention2d(nn.Module):
    """Multi-head self-attention over an NHWC map: fused qkv projection, heads, logit scale and
    output projection; subclasses choose which keys each query sees (their ``forward``)."""

    published_models = "NAT/DiNAT"  # named in the attention-dropout error

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
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
            qkv_bias: Bias in the fused qkv projection.
            qk_scale: Logit scale, default ``head_dim ** -0.5``.
            attn_drop: Dropout on attention probabilities; must be 0 (``na2d`` is fused and never
                materialises them).
            proj_drop: Dropout after the output projection.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not isinstance(num_heads, numbers.Integral) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if attn_drop > 0:
            raise NotImplementedError(
                "attention-probability dropout is not supported: the fused na2d operator never materialises "
                f"the attention probabilities (no published {self.published_models} model used it)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of an NHWC map, each ``[batch, height, width, heads, head_dim]`` (``na2d``'s layout)."""
        batch, height, width, _ = x.shape
        # fused qkv channels are ordered (q|k|v, head, head_dim)
        qkv = self.qkv(x).reshape(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # a tuple, as annotated (torch.jit.script checks it)
        return q, k, v

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output ``[batch, height, width, heads, head_dim]`` through the output projection, NHWC."""
        batch, height, width = x.shape[:3]
        x = self.proj(x.reshape(batch, height, width, self.num_heads * self.head_dim))
        return self.proj_drop(x)


def pad_to_window(x: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad an NHWC map on the bottom/right up to ``window_size`` (kernel * dilation) per axis,
    as NATTEN's module (<= 0.14) and transformers did before the qkv projection."""
    pad_bottom = max(0, window_size[0] - x.shape[1])
    pad_right = max(0, window_size[1] - x.shape[2])
    if pad_bottom or pad_right:
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    return x


# torch.fx: every symbolic tracer records the operator and the runtime padding as single calls
# (fx.wrap patches these names in this module while tracing; see attention.graph_mode).
torch.fx.wrap("na2d")
torch.fx.wrap("pad_to_window")


class NeighborhoodAttention2d(QkvAttention2d):
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
            kernel_size: Neighbourhood size, int or (kh, kw), each >= 2.
            dilation: Dilation, int or (dh, dw), each >= 1.
            qkv_bias: Bias in the fused qkv projection.
            rel_pos_bias: Learn an RPB table ``rpb`` of shape [heads, 2kh-1, 2kw-1].
            qk_scale: Logit scale, default ``head_dim ** -0.5``.
            attn_drop: Dropout on attention probabilities; must be 0 (``na2d`` is fused and never
                materialises them).
            proj_drop: Dropout after the output projection.
        """
        dd = {'device': device, 'dtype': dtype}
        kernel_size = int_pair("kernel_size", kernel_size, 2)
        dilation = int_pair("dilation", dilation, 1)
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, **dd)
        self.kernel_size = kernel_size
        self.dilation = dilation
        # smallest map the operator accepts on each axis
        self.window_size = tuple(k * d for k, d in zip(self.kernel_size, self.dilation))
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kh - 1, 2 * kw - 1, **dd))
        else:
            self.register_parameter('rpb', None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the RPB table (the linears keep their own init unless the model re-inits them)."""
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        padded = pad_to_window(x, self.window_size)
        q, k, v = self.split_qkv(padded)
        out = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale)
        if padded is not x:  # crop the padding off again
            out = out[:, :height, :width]
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        """Heads, kernel, dilation and whether an RPB table is learnt, for ``repr``."""
        return (f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")


def global_attention_dense(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_pos_bias: torch.Tensor,
        scale: float,
) -> torch.Tensor:
    """Global attention with RPB over a [B, H, W, heads, D] map, via SDPA and an explicit bias.

    Used where ``na2d`` cannot run (its kernel must be >= 2 per axis, so 1-wide maps); same
    result: the bias of query (i, j) for key (m, n) is ``rel_pos_bias[:, m - i + H - 1, n - j + W - 1]``.
    """
    batch, height, width, heads, head_dim = q.shape
    rows, cols = torch.arange(height, device=q.device), torch.arange(width, device=q.device)
    row_offsets = rows[None, :] - rows[:, None] + height - 1  # [query row, key row]
    col_offsets = cols[None, :] - cols[:, None] + width - 1
    bias = rel_pos_bias[:, row_offsets[:, None, :, None], col_offsets[None, :, None, :]]  # [heads, H, W, H, W]
    bias = bias.reshape(heads, height * width, height * width).to(q.dtype)
    q, k, v = (t.reshape(batch, height * width, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return x.transpose(1, 2).reshape(batch, height, width, heads, head_dim)


def rel_pos_bias_table(rpb: torch.Tensor, native_size: Tuple[int, int], feat_size: Tuple[int, int]) -> torch.Tensor:
    """The bias table ``rpb`` [heads, 2H-1, 2W-1] of a ``native_size`` (H, W) map for an (h, w) map:
    ``rpb`` itself at the native size, else resized by timm's ``resize_rel_pos_bias_table``."""
    height, width = feat_size
    if (height, width) == tuple(native_size):
        return rpb
    return resize_rel_pos_bias_table(
        rpb, new_window_size=(height, width), new_bias_shape=(rpb.shape[0], 2 * height - 1, 2 * width - 1))


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor,
                     native_size: Tuple[int, int], scale: float) -> torch.Tensor:
    """Global attention with RPB over [B, H, W, heads, D] maps: ``na2d`` with the whole map as the
    window, or :func:`global_attention_dense` on maps one row or column wide (``na2d`` needs a
    kernel >= 2). ``rpb`` is the table of a ``native_size`` map (:func:`rel_pos_bias_table`)."""
    height, width = q.shape[1], q.shape[2]
    table = rel_pos_bias_table(rpb, native_size, (height, width))
    if height >= 2 and width >= 2:
        return na2d(q, k, v, kernel_size=(height, width), rpb=table, scale=scale)
    return global_attention_dense(q, k, v, table, scale)


torch.fx.wrap("global_attention")


class RelPosGlobalAttention(QkvAttention2d):
    """Global multi-head self-attention with a learned relative positional bias (ViT-RPB).

    NHWC in and out. The bias table ``rpb`` [heads, 2H-1, 2W-1] holds one value per relative
    offset of the native feature map (H, W) (``img_size // patch_size``). Maps of another size
    use the table resized to [heads, 2h-1, 2w-1] by timm's ``resize_rel_pos_bias_table``
    (geometric-progression resampling from BEiT, as timm resizes relative position tables of
    checkpoints), recomputed on every such forward so that it stays differentiable.

    Global attention over an (h, w) map is neighborhood attention with kernel (h, w) (every
    window is the whole map, bias index = key - query + size - 1), so it runs on ``na2d``.
    """

    published_models = "ViT-RPB"

    def __init__(
            self,
            dim: int,
            num_heads: int,
            feat_size: Tuple[int, int],
            qkv_bias: bool = True,
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
            feat_size: Native feature map (H, W) the bias table is sized for, each >= 1.
            qkv_bias: Bias in the fused qkv projection.
            qk_scale: Logit scale, default ``head_dim ** -0.5``.
            attn_drop: Attention-probability dropout; must be 0 (``na2d`` never materialises them).
            proj_drop: Dropout after the output projection.
        """
        dd = {'device': device, 'dtype': dtype}
        feat_size = int_pair("feat_size", feat_size, 1)
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, **dd)
        self.feat_size = feat_size
        height, width = self.feat_size
        self.rpb = nn.Parameter(torch.empty(num_heads, 2 * height - 1, 2 * width - 1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the RPB table as published (the linears are initialised by the model)."""
        trunc_normal_(self.rpb, std=.02)

    def rel_pos_bias_table(self, feat_size: Tuple[int, int]) -> torch.Tensor:
        """The bias table for an (h, w) map: ``rpb`` itself at the native size, else resized."""
        return rel_pos_bias_table(self.rpb, self.feat_size, feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        return self.merge_heads(global_attention(q, k, v, self.rpb, self.feat_size, self.scale))

    def extra_repr(self) -> str:
        """Heads and the native feature map of the bias table, for ``repr``."""
        return f"num_heads={self.num_heads}, feat_size={self.feat_size}"


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
                (called with ``dim, num_heads=, qkv_bias=, attn_drop=, proj_drop=``; e.g.
                :class:`RelPosGlobalAttention`); ``kernel_size``, ``dilation`` and ``rel_pos_bias``
                then do not apply.
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
