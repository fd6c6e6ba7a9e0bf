"""Window logits and window-weighted sums on the shared query tiles (:mod:`.tiling`), with autograd.

The unfused form of neighborhood attention: ``window_logits`` gives each query's ``kh*kw`` logits
``query . key (+ rpb)`` (no scale), ``window_sum`` the weighted sum of its neighbours' values.
Layout ``[batch, heads, height, width, dim]``, weights ``[batch, heads, height, width, kh*kw]``
with neighbours in row-major window order. The legacy NATTEN API (:mod:`timm_nat.compat`) and the
attention maps of the models (:mod:`timm_nat.attention_maps`) are built on them.

``window_logits`` multiplies every query tile with its key halo (one batched matmul) and picks
each query's window entries out of the dense tile scores; ``window_sum`` scatters the weights into
a dense (zero elsewhere) tile and multiplies it with the value halo. Hand-written backwards use the
same three tile products, so autograd covers query, key, rpb, weights and value. A NaN/Inf reaches
only the outputs whose windows hold it, as in legacy NATTEN.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .reference import holds_nonfinite
from .tiling import chunk_slices, choose_tile, grid_plan, plan_cache, plan_on, window_index
from .windows import neighborhood_1d

__all__ = ["window_logits", "window_sum"]


class _Plan(NamedTuple):
    """The shared tiling (:func:`~timm_nat.attention.tiling.grid_plan`) and each query's window."""
    query_index: torch.Tensor      # [tiles * Tr * Tc]: position (row * width + col) of each query slot
    key_index: torch.Tensor        # [tiles * Hr * Hc]: position of each halo key
    window_index: torch.Tensor     # [H * W * Kr * Kc]: flat index into the tiles' dense scores
    output_index: torch.Tensor     # [H * W]: query slot holding each position
    neighbour_index: torch.Tensor  # [H * W, Kr * Kc]: position of each query's window neighbours
    row_bias: torch.Tensor         # [H, W, Kr * Kc]: RPB row index of each (query, neighbour)
    col_bias: torch.Tensor         # [H, W, Kr * Kc]: RPB column index
    tile_shape: tuple              # (tiles, Tr * Tc, Hr * Hc)


@plan_cache(maxsize=128)
def _plan(height: int, width: int, kernel_size: tuple, dilation: tuple) -> _Plan:
    tile = tuple(choose_tile(n, k, d) for n, k, d in zip((height, width), kernel_size, dilation))
    grid = grid_plan(height, width, kernel_size, dilation, tile)
    row_keys, row_bias = neighborhood_1d(height, kernel_size[0], dilation[0])
    col_keys, col_bias = neighborhood_1d(width, kernel_size[1], dilation[1])
    grid_shape = (height, width, kernel_size[0], kernel_size[1])

    def per_query(row_index, col_index):  # [H, Kr] x [W, Kc] -> [H, W, Kr * Kc]
        return (row_index[:, None, :, None].expand(grid_shape).reshape(height, width, -1),
                col_index[None, :, None, :].expand(grid_shape).reshape(height, width, -1))
    neighbour_rows, neighbour_cols = per_query(row_keys, col_keys)
    return _Plan(grid.query_index, grid.key_index, window_index(height, width, kernel_size, dilation, tile),
                 grid.output_index, (neighbour_rows * width + neighbour_cols).view(height * width, -1),
                 *per_query(row_bias, col_bias), grid.tile_shape)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, H, W, C] -> contiguous [B * heads, H * W, C] (row gathers from strided views are slow)."""
    b, n, h, w, c = x.shape
    return x.reshape(b * n, h * w, c).contiguous()


def _row_chunks(plan: _Plan, rows: int, element_size: int) -> list[slice]:
    """Chunks of (batch * heads) rows, by the bytes of their dense tile scores."""
    return chunk_slices(rows, math.prod(plan.tile_shape) * element_size)


# The three tile products. ``a``/``b`` are [rows, H*W, C] maps, ``w`` [rows, H*W, Kr*Kc] window
# weights; every op of both legacy functions and of their gradients is one of these.

def _window_scores(plan: _Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w[p, n] = a[p] . b[neighbour n of p]``: [rows, H*W, Kr*Kc]."""
    tiles, tile_len, halo_len = plan.tile_shape
    out = a.new_empty(a.shape[0], plan.window_index.numel())
    for rows in _row_chunks(plan, a.shape[0], a.element_size()):
        a_tiles = a[rows].index_select(1, plan.query_index).view(-1, tile_len, a.shape[-1])
        b_halo = b[rows].index_select(1, plan.key_index).view(-1, halo_len, b.shape[-1])
        scores = torch.bmm(a_tiles, b_halo.transpose(1, 2)).view(rows.stop - rows.start, -1)
        torch.index_select(scores, 1, plan.window_index, out=out[rows])
    return out.view(a.shape[0], a.shape[1], plan.window_index.numel() // a.shape[1])  # sizes explicit: rows may be 0


def _dense_weights(plan: _Plan, w: torch.Tensor) -> torch.Tensor:
    """Window weights [rows, H*W, Kr*Kc] as dense tile matrices [rows * tiles, T, Hk], zero outside windows."""
    tiles, tile_len, halo_len = plan.tile_shape
    dense = w.new_zeros(w.shape[0], tiles * tile_len * halo_len)
    dense.index_copy_(1, plan.window_index, w.reshape(w.shape[0], -1))
    return dense.view(-1, tile_len, halo_len)


def _apply_weights(plan: _Plan, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[p] = sum_n w[p, n] * b[neighbour n of p]``: [rows, H*W, C].

    The dense tiles weight keys outside a window by zero, and ``0 * NaN`` is NaN: where ``b`` holds
    a NaN/Inf, the tiles run on ``b`` with those rows zeroed and every output whose window holds
    one is recomputed from its own window (legacy semantics: nothing spreads beyond the window).
    """
    if not holds_nonfinite(b):
        return _apply_dense_weights(plan, w, b)
    bad = ~b.isfinite().all(-1)                                                 # [rows, H*W]
    out = _apply_dense_weights(plan, w, b.masked_fill(bad[..., None], 0))
    neighbours = plan.neighbour_index                                           # [H*W, Kr*Kc]
    row, query = bad[:, neighbours].any(-1).nonzero(as_tuple=True)              # outputs that see one
    window = b[row[:, None], neighbours[query]]                                 # [m, Kr*Kc, C]
    exact = torch.einsum("mn,mnc->mc", w[row, query].to(b.dtype), window)
    return out.index_put((row, query), exact)


def _apply_dense_weights(plan: _Plan, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    tiles, tile_len, halo_len = plan.tile_shape
    out = b.new_empty(b.shape)
    for rows in _row_chunks(plan, b.shape[0], b.element_size()):
        b_halo = b[rows].index_select(1, plan.key_index).view(-1, halo_len, b.shape[-1])
        tile_out = torch.bmm(_dense_weights(plan, w[rows]), b_halo).view(rows.stop - rows.start, -1, b.shape[-1])
        torch.index_select(tile_out, 1, plan.output_index, out=out[rows])
    return out


def _scatter_weights(plan: _Plan, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``out[m] = sum over (p, n) with neighbour n of p == m of w[p, n] * a[p]``: [rows, H*W, C].

    As :func:`_apply_weights`, a NaN/Inf row of ``a`` must reach only its own window's keys: the
    tiles run without the non-finite rows (their ``a`` and ``w`` zeroed), whose terms are then
    added to exactly the keys of their windows.
    """
    if not holds_nonfinite(a):
        return _scatter_dense_weights(plan, w, a)
    bad = ~a.isfinite().all(-1)                                                 # [rows, H*W]
    out = _scatter_dense_weights(plan, w.masked_fill(bad[..., None], 0), a.masked_fill(bad[..., None], 0))
    row, query = bad.nonzero(as_tuple=True)
    neighbours = plan.neighbour_index[query]                                    # [m, Kr*Kc]
    terms = w[row, query].to(a.dtype)[:, :, None] * a[row, query][:, None, :]  # [m, Kr*Kc, C]
    return out.index_put((row[:, None].expand_as(neighbours), neighbours), terms, accumulate=True)


def _scatter_dense_weights(plan: _Plan, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    tiles, tile_len, halo_len = plan.tile_shape
    out = a.new_zeros(a.shape)
    for rows in _row_chunks(plan, a.shape[0], a.element_size()):
        a_tiles = a[rows].index_select(1, plan.query_index).view(-1, tile_len, a.shape[-1])
        halo_out = torch.bmm(_dense_weights(plan, w[rows]).transpose(1, 2), a_tiles)
        out[rows].index_add_(1, plan.key_index, halo_out.view(rows.stop - rows.start, -1, a.shape[-1]))
    return out


class _QueryKey(torch.autograd.Function):
    """[rows, H*W, D] query and key -> [rows, H*W, Kr*Kc] logits (no bias, no scale)."""

    @staticmethod
    def forward(ctx, plan, query, key):
        ctx.plan = plan
        ctx.save_for_backward(query, key)
        return _window_scores(plan, query, key)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits):
        query, key = ctx.saved_tensors
        grad_logits = grad_logits.contiguous()
        grad_query = _apply_weights(ctx.plan, grad_logits, key) if ctx.needs_input_grad[1] else None
        grad_key = _scatter_weights(ctx.plan, grad_logits, query) if ctx.needs_input_grad[2] else None
        return None, grad_query, grad_key


class _AttnValue(torch.autograd.Function):
    """[rows, H*W, Kr*Kc] weights and [rows, H*W, D] value -> [rows, H*W, D]."""

    @staticmethod
    def forward(ctx, plan, attn, value):
        ctx.plan = plan
        ctx.save_for_backward(attn, value)
        return _apply_weights(plan, attn, value)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_attn = _window_scores(ctx.plan, grad_out, value) if ctx.needs_input_grad[1] else None
        grad_value = _scatter_weights(ctx.plan, attn, grad_out) if ctx.needs_input_grad[2] else None
        return None, grad_attn, grad_value


def window_logits(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: tuple[int, int],
                  dilation: tuple[int, int]) -> torch.Tensor:
    """``[batch, heads, H, W, kh*kw]`` logits ``query . key + rpb`` of each query's window (query not
    scaled); ``query``/``key`` ``[batch, heads, H, W, dim]``, ``rpb`` ``[heads, 2kh-1, 2kw-1]`` or None,
    window arguments as validated pairs."""
    batch, heads, height, width, dim = query.shape
    plan = plan_on(_plan(height, width, kernel_size, dilation), query.device)
    logits = _QueryKey.apply(plan, _flat(query), _flat(key)).view(batch, heads, height, width, math.prod(kernel_size))
    if rpb is not None:
        logits = logits + rpb.to(logits.dtype)[:, plan.row_bias, plan.col_bias]
    return logits


def window_sum(attn: torch.Tensor, value: torch.Tensor, kernel_size: tuple[int, int],
               dilation: tuple[int, int]) -> torch.Tensor:
    """``[batch, heads, H, W, dim]``: each query's ``attn``-weighted sum of its window's values
    (``attn`` ``[batch, heads, H, W, kh*kw]``, cast to ``value``'s dtype)."""
    batch, heads, height, width, dim = value.shape
    plan = plan_on(_plan(height, width, kernel_size, dilation), value.device)
    weights = attn.to(value.dtype).reshape(batch * heads, height * width, math.prod(kernel_size))
    return _AttnValue.apply(plan, weights, _flat(value)).view(batch, heads, height, width, dim)
