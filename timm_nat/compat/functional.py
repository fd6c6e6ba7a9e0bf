"""Legacy NATTEN (<= 0.17.4) unfused operators on timm-nat's window rules, with autograd.

Layout as the legacy kernels took it: ``[batch, heads, height, width, dim]``; attention weights
``[batch, heads, height, width, kh*kw]``, neighbours in row-major order of the window. The query
is *not* scaled inside ``natten2dqkrpb`` (callers scale it first, as NATTEN's own module and
transformers' ``DinatSelfAttention`` did).

How it runs: on the query tiles and key halos of :mod:`timm_nat.attention.tiling`. ``qk``
multiplies every query tile with its key halo (one batched matmul) and picks each query's ``K*K``
window entries out of the dense tile scores; ``av`` scatters the weights into a dense (zero
elsewhere) tile and multiplies it with the value halo. Hand-written backwards use the same three
tile products, so autograd covers query, key, rpb, attention and value.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from ..attention.functional import int_pair
from ..attention.reference import holds_nonfinite
from ..attention.tiling import chunk_slices, choose_tile, grid_plan, plan_cache, plan_on, window_index
from ..attention.windows import neighborhood_1d

__all__ = [
    "natten2dqkrpb", "natten2dqk", "natten2dav", "natten1dqkrpb", "natten1dqk", "natten1dav",
    "na2d_qk", "na2d_av", "na1d_qk", "na1d_av",
]

IntOrPair = Union[int, tuple[int, int]]


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


def _check_map(name: str, x: torch.Tensor, kernel_size, dilation, minimum_kernel: int = 2):
    """Validate a [B, heads, H, W, C] tensor and the window arguments; return them as pairs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name} must be 5-D [batch, heads, height, width, dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    kernel_size = int_pair("kernel_size", kernel_size, minimum_kernel)
    dilation = int_pair("dilation", dilation, 1)
    for axis, size, k, d in (("height", x.shape[2], kernel_size[0], dilation[0]),
                             ("width", x.shape[3], kernel_size[1], dilation[1])):
        if size < k * d:
            raise ValueError(f"{name} {axis} {size} is smaller than kernel_size * dilation = {k} * {d} = {k * d} "
                             "(legacy NATTEN refused such maps too; pad the feature map first)")
    return kernel_size, dilation


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
    return out.view(a.shape[0], a.shape[1], -1)


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


def _qk(query, key, rpb, kernel_size, dilation):
    batch, heads, height, width, dim = query.shape
    plan = plan_on(_plan(height, width, kernel_size, dilation), query.device)
    logits = _QueryKey.apply(plan, _flat(query), _flat(key)).view(batch, heads, height, width, -1)
    if rpb is not None:
        logits = logits + rpb.to(logits.dtype)[:, plan.row_bias, plan.col_bias]
    return logits


def _av(attn, value, kernel_size, dilation):
    batch, heads, height, width, dim = value.shape
    plan = plan_on(_plan(height, width, kernel_size, dilation), value.device)
    weights = attn.to(value.dtype).reshape(batch * heads, height * width, -1)
    return _AttnValue.apply(plan, weights, _flat(value)).view(batch, heads, height, width, dim)


def na2d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    additional_keys: Optional[torch.Tensor] = None,
    is_causal=False,
    rpb: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """NATTEN 0.15-0.17 ``na2d_qk``: neighbourhood logits ``query . key (+ rpb)``, query not scaled.

    Args:
        query, key: ``[batch, heads, height, width, dim]``.
        kernel_size: int or ``(kh, kw)``; dilation: int or ``(dh, dw)``; each map axis must be
            at least ``kernel * dilation`` long, as the legacy kernels required.
        additional_keys, is_causal: legacy extensions, not supported (must be None / False).
        rpb: optional relative positional bias ``[heads, 2*kh-1, 2*kw-1]``.

    Returns:
        ``[batch, heads, height, width, kh*kw]``, neighbours in row-major window order.
    """
    _refuse_extensions(additional_keys, is_causal, "additional_keys")
    kernel_size, dilation = _check_map("query", query, kernel_size, dilation)
    if not isinstance(key, torch.Tensor) or key.shape != query.shape:
        raise ValueError(f"key must be a tensor shaped like query {tuple(query.shape)}, "
                         f"got {tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__}")
    if key.dtype != query.dtype:
        raise TypeError(f"query and key must share a dtype, got {query.dtype} and {key.dtype}")
    if rpb is not None:
        expected = (query.shape[1], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb must have shape [heads, 2*kh-1, 2*kw-1] = {list(expected)}, got {got}")
    return _qk(query, key, rpb, kernel_size, dilation)


def na2d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    additional_values: Optional[torch.Tensor] = None,
    is_causal=False,
) -> torch.Tensor:
    """NATTEN 0.15-0.17 ``na2d_av``: each query's weighted sum of its neighbours' values.

    Args:
        attn: ``[batch, heads, height, width, kh*kw]`` (usually softmax of :func:`na2d_qk`).
        value: ``[batch, heads, height, width, dim]``; ``attn`` is cast to its dtype.
        kernel_size, dilation: as for :func:`na2d_qk`.
        additional_values, is_causal: not supported (must be None / False).

    Returns:
        ``[batch, heads, height, width, dim]``.
    """
    _refuse_extensions(additional_values, is_causal, "additional_values")
    kernel_size, dilation = _check_map("value", value, kernel_size, dilation)
    expected = (*value.shape[:4], kernel_size[0] * kernel_size[1])
    if not isinstance(attn, torch.Tensor) or tuple(attn.shape) != expected:
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must have shape [batch, heads, height, width, kh*kw] = {list(expected)}, got {got}")
    return _av(attn, value, kernel_size, dilation)


def _refuse_extensions(extra, is_causal, extra_name):
    if extra is not None:
        raise NotImplementedError(f"{extra_name} (attention to extra tokens) is not supported by timm_nat.compat")
    if any(is_causal) if isinstance(is_causal, (tuple, list)) else is_causal:
        raise NotImplementedError("causal neighborhood attention is not supported by timm_nat.compat")


def _legacy_kernel_args(tensor_for_kernel: torch.Tensor, kernel_size, dilation, from_rpb: bool):
    """NATTEN <= 0.14.4 calls omitted ``kernel_size`` (``natten2dqkrpb(q, k, rpb, dilation)``): the
    kernel then comes from the rpb table (2K-1 wide) or the weights (K*K entries)."""
    if dilation is not None:
        return kernel_size, dilation
    if from_rpb:
        return (tensor_for_kernel.shape[-1] + 1) // 2, kernel_size
    kernel = math.isqrt(tensor_for_kernel.shape[-1])
    if kernel * kernel != tensor_for_kernel.shape[-1]:
        raise ValueError(f"cannot infer a square kernel from attn's last dimension {tensor_for_kernel.shape[-1]}; "
                         "pass kernel_size and dilation")
    return kernel, kernel_size


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor],
                  kernel_size: IntOrPair, dilation: Optional[IntOrPair] = None) -> torch.Tensor:
    """``natten.functional.natten2dqkrpb`` (NATTEN <= 0.17.4): logits ``query . key + rpb``.

    ``query`` and ``key`` are ``[batch, heads, height, width, dim]``; the query is not scaled here.
    ``rpb`` is ``[heads, 2*kh-1, 2*kw-1]`` or None. The NATTEN <= 0.14.4 form
    ``natten2dqkrpb(query, key, rpb, dilation)`` (kernel from the rpb shape) is accepted too.
    Returns ``[batch, heads, height, width, kh*kw]``.
    """
    if dilation is None and rpb is None:
        raise TypeError("natten2dqkrpb needs kernel_size and dilation when rpb is None")
    kernel_size, dilation = _legacy_kernel_args(rpb, kernel_size, dilation, from_rpb=True)
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten2dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair) -> torch.Tensor:
    """``natten.functional.natten2dqk`` (NATTEN <= 0.17.4): :func:`natten2dqkrpb` without bias."""
    return na2d_qk(query, key, kernel_size, dilation)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrPair,
               dilation: Optional[IntOrPair] = None) -> torch.Tensor:
    """``natten.functional.natten2dav`` (NATTEN <= 0.17.4): weighted sum of neighbour values.

    ``attn`` ``[batch, heads, height, width, kh*kw]``, ``value`` ``[batch, heads, height, width, dim]``.
    The NATTEN <= 0.14.4 form ``natten2dav(attn, value, dilation)`` (square kernel from ``attn``) is accepted too.
    """
    kernel_size, dilation = _legacy_kernel_args(attn, kernel_size, dilation, from_rpb=False)
    return na2d_av(attn, value, kernel_size, dilation)


# 1-D: a [batch, heads, length, dim] sequence is a 1 x length map with a 1 x K window.

def _check_sequence(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be 4-D [batch, heads, length, dim], got {got}")


def _single(name: str, value) -> int:
    value = value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (or a 1-tuple), got {value!r}")
    return value


def na1d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size, dilation=1, additional_keys=None,
            is_causal=False, rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NATTEN 0.15-0.17 ``na1d_qk``: ``[batch, heads, length, dim]`` -> logits ``[batch, heads, length, K]``;
    ``rpb`` is ``[heads, 2K-1]`` or None; the query is not scaled."""
    _refuse_extensions(additional_keys, is_causal, "additional_keys")
    _check_sequence("query", query)
    _check_sequence("key", key)
    kernel, dil = _single("kernel_size", kernel_size), _single("dilation", dilation)
    if kernel < 2:
        raise ValueError(f"kernel_size must be >= 2, got {kernel}")
    if rpb is not None and (not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != (query.shape[1], 2 * kernel - 1)):
        got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
        raise ValueError(f"rpb must have shape [heads, 2K-1] = {[query.shape[1], 2 * kernel - 1]}, got {got}")
    if query.shape != key.shape:
        raise ValueError(f"key must be shaped like query {tuple(query.shape)}, got {tuple(key.shape)}")
    _check_map("query", query.unsqueeze(2), (1, kernel), (1, dil), minimum_kernel=1)
    logits = _qk(query.unsqueeze(2), key.unsqueeze(2), None if rpb is None else rpb.unsqueeze(1), (1, kernel), (1, dil))
    return logits.squeeze(2)


def na1d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size, dilation=1, additional_values=None,
            is_causal=False) -> torch.Tensor:
    """NATTEN 0.15-0.17 ``na1d_av``: weights ``[batch, heads, length, K]`` times values ``[batch, heads, length, dim]``."""
    _refuse_extensions(additional_values, is_causal, "additional_values")
    _check_sequence("value", value)
    kernel, dil = _single("kernel_size", kernel_size), _single("dilation", dilation)
    if kernel < 2:
        raise ValueError(f"kernel_size must be >= 2, got {kernel}")
    if not isinstance(attn, torch.Tensor) or tuple(attn.shape) != (*value.shape[:3], kernel):
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must have shape [batch, heads, length, K] = {[*value.shape[:3], kernel]}, got {got}")
    _check_map("value", value.unsqueeze(2), (1, kernel), (1, dil), minimum_kernel=1)
    return _av(attn.unsqueeze(2), value.unsqueeze(2), (1, kernel), (1, dil)).squeeze(2)


def natten1dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: int,
                  dilation: Optional[int] = None) -> torch.Tensor:
    """``natten.functional.natten1dqkrpb`` (NATTEN <= 0.17.4); also NATTEN <= 0.14.4's ``(query, key, rpb, dilation)``."""
    if dilation is None and rpb is None:
        raise TypeError("natten1dqkrpb needs kernel_size and dilation when rpb is None")
    kernel_size, dilation = _legacy_kernel_args(rpb, kernel_size, dilation, from_rpb=True)
    return na1d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten1dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """``natten.functional.natten1dqk`` (NATTEN <= 0.17.4): :func:`natten1dqkrpb` without bias."""
    return na1d_qk(query, key, kernel_size, dilation)


def natten1dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: Optional[int] = None) -> torch.Tensor:
    """``natten.functional.natten1dav`` (NATTEN <= 0.17.4); also NATTEN <= 0.14.4's ``(attn, value, dilation)``."""
    if dilation is None:
        kernel_size, dilation = attn.shape[-1], kernel_size
    return na1d_av(attn, value, kernel_size, dilation)
