"""Fast exact neighborhood attention for CPU: query tiles against dense key halos, one SDPA call
per chunk of tiles (the tiling: :mod:`.tiling`).

Each tile's additive bias holds the RPB of every in-window pair and ``-inf`` elsewhere, so
border tiles, sub-grids of unequal length and padded query slots all run the same fused
attention. Non-finite inputs keep legacy semantics through :func:`.reference.exact_where_nonfinite`.

A graph being recorded (torch.compile, torch.export, torch.jit.trace, ONNX export) gets the
plans as constants for its static height and width, runs all tiles as one chunk (the chunk
count would depend on the batch size) and has no non-finite branch.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import graph_mode
from .reference import exact_where_nonfinite
from .tiling import GridPlan, axis_plan, choose_tile, chunk_slices, grid_plan, halo_length, plan_on

__all__ = ["na2d_tiled", "axis_plan", "choose_tile"]


@torch.compiler.assume_constant_result
def _plan_tensor(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple, field: int) -> torch.Tensor:
    """One tensor of :func:`grid_plan`; torch.compile calls it at trace time and keeps the result
    as a graph constant instead of tracing the builder (one tensor per call: what it can hold)."""
    return grid_plan(height, width, kernel_size, dilation, tile)[field]


@torch._dynamo.disable
def _plan_across_a_graph_break(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """:func:`grid_plan` run eagerly by torch.compile on torch < 2.15 (fullgraph and export then refuse)."""
    return grid_plan(height, width, kernel_size, dilation, tile)


def _traced_plan(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """:func:`grid_plan` as constants of a graph being recorded."""
    halo = (halo_length(height, kernel_size[0], dilation[0], tile[0]),
            halo_length(width, kernel_size[1], dilation[1], tile[1]))
    tensors = (_plan_tensor(height, width, kernel_size, dilation, tile, field) for field in range(len(GridPlan._fields) - 1))
    return GridPlan(*tensors, halo)


def _static_spatial_size(query: torch.Tensor) -> tuple[int, int]:
    """(height, width) of ``query`` as ints, which the index plans are built for.

    torch.export with a dynamic height or width raises here (plans, hence graphs, are per map
    size); torch.compile specialises on the size instead. ``torch.jit.trace`` records sizes as
    tensors: their values at trace time are read, and :func:`_traced_size_guard` checks them.
    """
    height, width = query.shape[1], query.shape[2]
    if graph_mode.is_torch_exporting() and not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(
            f"na2d cannot be exported with a dynamic height or width (got {height} x {width}): its index plans "
            f"are built per map size. Export with static spatial dims (a dynamic batch is supported), "
            f"one graph per input size.")
    if graph_mode.is_jit_tracing():
        with warnings.catch_warnings():  # the conversion is intended: _traced_size_guard checks it
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(height), int(width)
    return int(height), int(width)


def _traced_size_guard(query: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[1]`` int64 zero that exists only if ``query``'s runtime map is ``height x width``.

    A graph from ``torch.jit.trace`` (or the TorchScript ONNX exporter, whose ``dynamic_axes`` may
    declare height and width dynamic) bakes in plans for the traced size; added to the plan's
    indices, this index-out-of-range makes a run at any other size fail instead of answering wrong.
    """
    mismatch = (query.shape[1] - height) ** 2 + (query.shape[2] - width) ** 2  # traced 0-dim tensors
    return torch.zeros(1, dtype=torch.long, device=query.device).index_select(0, torch.as_tensor(mismatch).reshape(1))


def _bias_table(rpb: Optional[torch.Tensor], heads: int, kernel_size, dtype, device) -> torch.Tensor:
    """RPB (or zeros) with one extra row and column of -inf, addressed by ``tiling.MASKED`` (-1)."""
    if rpb is None:
        table = torch.zeros(heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1, dtype=dtype, device=device)
    else:
        table = rpb.to(dtype)
    return F.pad(table, (0, 1, 0, 1), value=-math.inf)


def _class_bias(table: torch.Tensor, plan: GridPlan) -> torch.Tensor:
    """[heads, row classes * col classes, Tr*Tc * Hkr*Hkc]: the additive bias (RPB or -inf) of
    every tile class; a tile's bias is its class's (see ``GridPlan.tile_class``)."""
    br, bc = plan.row_bias, plan.col_bias
    bias = table[:, br[:, None, :, None, :, None], bc[None, :, None, :, None, :]]
    heads, cr, cc = bias.shape[:3]
    return bias.reshape(heads, cr * cc, math.prod(bias.shape[3:]))  # explicit: heads may be 0


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, heads, D] -> contiguous [B * heads, H * W, D]: gathering rows of that is ~5x faster
    than gathering from the strided view."""
    b, height, width, heads, dim = x.shape
    return x.permute(0, 3, 1, 2, 4).contiguous().view(b * heads, height * width, dim)


def na2d_tiled(query, key, value, kernel_size, dilation, rpb, scale, tile=None):
    """Exact neighborhood attention with RPB by dense tiles; see the module docstring.

    Arguments as :func:`timm_nat.attention.na2d`, validated; ``tile`` = (rows, cols) or None.
    """
    def dense(query, key, value, kernel_size, dilation, rpb, scale):
        return _na2d_dense_tiles(query, key, value, kernel_size, dilation, rpb, scale, tile)
    if graph_mode.is_recording():  # a recorded graph holds no data-dependent branch; see exact_where_nonfinite
        return dense(query, key, value, kernel_size, dilation, rpb, scale)
    if query.numel() == 0:  # SDPA's empty result is cut off from its inputs: keep their (zero) gradients
        return _empty_result(query, key, value, rpb)
    return exact_where_nonfinite(dense, query, key, value, kernel_size, dilation, rpb, scale)


def _empty_result(query, key, value, rpb) -> torch.Tensor:
    """The empty output of an empty input, with autograd edges to every input (zero gradients)."""
    inputs = [t for t in (key, value, rpb) if t is not None]
    return query * 0 + sum(t.sum() for t in inputs).to(query.dtype) * 0


def _na2d_dense_tiles(query, key, value, kernel_size, dilation, rpb, scale, tile):
    """Eagerly: cached plans, chunks of about ``tiling.CHUNK_BYTES``. Traced: constant plans, one chunk, and
    the batch size only ever as the traced value (int, SymInt or jit-traced size), never derived."""
    traced = graph_mode.is_recording()
    b, _, _, heads, dim = query.shape
    height, width = _static_spatial_size(query) if traced else query.shape[1:3]
    if tile is None:
        tile = (choose_tile(height, kernel_size[0], dilation[0]), choose_tile(width, kernel_size[1], dilation[1]))
    build = _traced_plan if traced else grid_plan
    if traced and graph_mode.is_compiling() and graph_mode.OLD_DYNAMO:  # one constant per name: see OLD_DYNAMO
        build = _plan_across_a_graph_break
    plan = build(height, width, tuple(kernel_size), tuple(dilation), tuple(tile))
    plan = plan_on(plan, query.device)
    if graph_mode.is_jit_tracing():
        guard = _traced_size_guard(query, height, width)
        plan = plan._replace(query_index=plan.query_index + guard, output_index=plan.output_index + guard)
    query_len, halo_len = tile[0] * tile[1], plan.halo[0] * plan.halo[1]
    num_tiles = len(plan.tile_class)
    q, k, v = _heads_first(query), _heads_first(key), _heads_first(value)
    class_bias = _class_bias(_bias_table(rpb, heads, kernel_size, query.dtype, query.device), plan)

    if traced:  # a chunk count would depend on the batch size, a graph input
        chunks = [slice(0, num_tiles)]
    else:  # chunks of gathered key halos
        chunks = chunk_slices(num_tiles, b * heads * halo_len * dim * query.element_size())
    outs = []
    for tiles in chunks:
        count = tiles.stop - tiles.start
        q_idx = plan.query_index[tiles.start * query_len:tiles.stop * query_len]
        k_idx = plan.key_index[tiles.start * halo_len:tiles.stop * halo_len]
        # explicit sizes (no -1): they stay defined when the batch or the heads are empty
        q_t = q.index_select(1, q_idx).view(b, heads * count, query_len, dim)
        k_t = k.index_select(1, k_idx).view(b, heads * count, halo_len, dim)
        v_t = v.index_select(1, k_idx).view(b, heads * count, halo_len, dim)
        bias = class_bias.index_select(1, plan.tile_class[tiles]).view(1, heads * count, query_len, halo_len)
        # Fused on CPU when nothing needs a gradient; its math path otherwise (exact either way).
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=bias, scale=scale)
        outs.append(out.view(b * heads, count * query_len, dim))
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    out = out.index_select(1, plan.output_index)
    return out.view(b, heads, height, width, dim).permute(0, 2, 3, 1, 4)
