"""Fast exact neighborhood attention for CPU: query tiles against dense key halos.

Each spatial axis is split into dilation groups (the interleaved sub-grids) and each group
into tiles of ``T`` queries. All windows of a tile's queries fit in a halo of ``T + K - 1``
keys of the same group, so a tile is a small dense attention problem: ``T*T`` queries
against ``Hk*Hk`` keys, with an additive table holding the RPB of every in-window pair and
``-inf`` elsewhere. Border tiles, sub-grids of unequal length and padded query slots are
all expressed by that table, so every tile runs the same batched matmuls and softmax.

The index plans depend only on (length, kernel, dilation, tile) and are cached as plain CPU
tensors (built outside inference mode and any default-device context, so a run under
``torch.inference_mode()`` or on the meta device never poisons them for later training);
each call moves them to the input's device. Non-finite inputs keep legacy semantics through
:func:`.reference.exact_where_nonfinite`.

A graph being recorded (torch.compile, torch.export, torch.jit.trace, ONNX export) gets the
plans as constants for its static height and width, runs all tiles as one chunk (the chunk
count would depend on the batch size) and has no non-finite branch.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .reference import exact_where_nonfinite
from .windows import subgrid_length, window_start

__all__ = ["na2d_tiled", "axis_plan", "choose_tile"]

_MASKED = -1  # bias index of a (query, key) pair outside the query's window


class AxisPlan(NamedTuple):
    """Tiling of one axis. Positions are in original (un-dilated) coordinates."""
    query_index: torch.Tensor  # [tiles, T]: position of each query slot (padding repeats one)
    key_index: torch.Tensor    # [tiles, Hk]: position of each halo key (padding repeats one)
    bias_index: torch.Tensor   # [tiles, T, Hk]: RPB index of each pair, or _MASKED
    tile_of: torch.Tensor      # [length]: tile holding each position's query
    slot_of: torch.Tensor      # [length]: its slot inside that tile


def choose_tile(length: int, kernel_size: int, dilation: int) -> int:
    """Tile size minimising padded-query x halo work, with a per-tile overhead term.

    Smaller tiles waste fewer key computations ((T+K-1)/T keys per query and axis) but make
    smaller matmuls; the overhead term (worth ~48 query-key pairs per tile and axis, measured with SDPA on CPU) reflects that.
    """
    n = subgrid_length(length, dilation, 0)
    best, best_cost = n, math.inf
    for tile in range(2, min(n, 16) + 1):
        tiles = dilation * math.ceil(n / tile)
        halo = min(tile + kernel_size - 1, n)
        cost = tiles * (tile * halo + 48)
        if cost < best_cost:
            best, best_cost = tile, cost
    return best


def _is_traced() -> bool:
    """Whether this call is being recorded into a graph (torch.compile, torch.export, torch.jit.trace,
    ONNX export) rather than run eagerly."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _recording() -> bool:
    """Whether a dispatch mode (fake, proxy, functional) or the jit tracer is active."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._ops._len_torch_dispatch_stack_pre_dispatch()
                or torch._C._get_tracing_state() is not None)


@contextlib.contextmanager
def _outside_tracing():
    """Run eagerly on real tensors whatever records the caller: no fake / proxy / functional
    dispatch modes (torch.export, make_fx), no jit tracer, inference mode off."""
    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.utils._python_dispatch._disable_current_modes(), torch.inference_mode(False):
            yield
    finally:
        torch._C._set_tracing_state(tracing_state)


def _plan_cache(maxsize: int):
    """``functools.lru_cache`` for index plans, always built eagerly as real CPU tensors.

    Plans are data, never traced code: a graph being recorded gets them as constants (its
    ``.unique()`` would be a data-dependent op there). Tensors created under
    ``torch.inference_mode()`` can never be saved for backward, and a cache outlives the call that
    filled it. Builders put their tensors on CPU explicitly, so a default-device context such as
    ``with torch.device("meta")`` cannot reach the cache either.
    """
    def decorate(build):
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def plan(*args):
            if _recording():
                with _outside_tracing():
                    return cached(*args)
            with torch.inference_mode(False):  # eager: the cheap part of _outside_tracing is enough
                return cached(*args)
        plan.cache_clear = cached.cache_clear
        return plan
    return decorate


def _halo(length: int, kernel_size: int, dilation: int, tile: int) -> int:
    """Keys per halo on one axis: a tile's windows, capped by the longest sub-grid."""
    return max(min(tile + kernel_size - 1, subgrid_length(length, dilation, g)) for g in range(dilation))


@_plan_cache(maxsize=256)
def axis_plan(length: int, kernel_size: int, dilation: int, tile: int) -> AxisPlan:
    """Build (and cache) the tiling of one axis as CPU tensors; see :class:`AxisPlan`."""
    lengths = [subgrid_length(length, dilation, g) for g in range(dilation)]
    halo = _halo(length, kernel_size, dilation, tile)
    slots = torch.arange(tile, device="cpu")
    halo_slots = torch.arange(halo, device="cpu")
    queries, keys, biases = [], [], []
    tile_of = torch.empty(length, dtype=torch.long, device="cpu")
    slot_of = torch.empty(length, dtype=torch.long, device="cpu")
    for group, n in enumerate(lengths):
        first = torch.arange(0, n, tile, device="cpu")                    # [tiles]
        sub_q = (first[:, None] + slots).clamp(max=n - 1)                 # [tiles, T]
        start = window_start(sub_q, n, kernel_size)                       # [tiles, T]
        halo_start = start[:, :1].clamp(max=max(n - halo, 0))             # [tiles, 1]
        sub_k = halo_start + halo_slots                                   # [tiles, Hk]
        rel = sub_k[:, None, :] - start[:, :, None]                       # [tiles, T, Hk]
        inside = (rel >= 0) & (rel < kernel_size) & (sub_k[:, None, :] < n)
        bias = sub_k[:, None, :] - sub_q[:, :, None] + kernel_size - 1
        biases.append(torch.where(inside, bias, torch.full_like(bias, _MASKED)))
        queries.append(group + dilation * sub_q)
        keys.append(group + dilation * sub_k.clamp(max=n - 1))
        offset = sum(len(q) for q in queries[:-1])
        sub = torch.arange(n, device="cpu")
        tile_of[group::dilation] = offset + sub // tile
        slot_of[group::dilation] = sub % tile
    return AxisPlan(torch.cat(queries), torch.cat(keys), torch.cat(biases), tile_of, slot_of)


class GridPlan(NamedTuple):
    """Both axes combined, as flat ``row * width + col`` indices (tile-major order).

    Tiles with equal bias patterns share a class (all interior tiles do), so the bias is built
    per class pair and copied to tiles block-wise instead of gathered element by element.
    """
    query_index: torch.Tensor   # [tiles * Tr * Tc]
    key_index: torch.Tensor     # [tiles * Hkr * Hkc]
    output_index: torch.Tensor  # [height * width]: flat query slot of every position
    row_bias: torch.Tensor      # [row classes, Tr, Hkr]: RPB row index, or _MASKED
    col_bias: torch.Tensor      # [col classes, Tc, Hkc]
    tile_class: torch.Tensor    # [tiles]: row class * col classes + col class
    halo: tuple                 # (Hkr, Hkc)


@_plan_cache(maxsize=64)
def grid_plan(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """Build (and cache) the 2-D tiling from the two axis plans, as CPU tensors."""
    rows = axis_plan(height, kernel_size[0], dilation[0], tile[0])
    cols = axis_plan(width, kernel_size[1], dilation[1], tile[1])

    def flat(row_index, col_index):  # [tr, Tr] x [tc, Tc] -> [tr, tc, Tr, Tc] flattened
        return (row_index[:, None, :, None] * width + col_index[None, :, None, :]).reshape(-1)

    tiles_c = len(cols.query_index)
    tile_major = rows.tile_of[:, None] * tiles_c + cols.tile_of[None, :]
    output_index = (tile_major * tile[0] + rows.slot_of[:, None]) * tile[1] + cols.slot_of[None, :]
    row_bias, row_class = rows.bias_index.unique(dim=0, return_inverse=True)
    col_bias, col_class = cols.bias_index.unique(dim=0, return_inverse=True)
    tile_class = (row_class[:, None] * len(col_bias) + col_class[None, :]).reshape(-1)
    return GridPlan(flat(rows.query_index, cols.query_index), flat(rows.key_index, cols.key_index),
                    output_index.reshape(-1), row_bias, col_bias, tile_class,
                    (rows.key_index.shape[1], cols.key_index.shape[1]))


@torch.compiler.assume_constant_result
def _plan_tensor(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple, field: int) -> torch.Tensor:
    """One tensor of :func:`grid_plan`; torch.compile calls it at trace time and keeps the result
    as a graph constant instead of tracing the builder (one tensor per call: what it can hold)."""
    return grid_plan(height, width, kernel_size, dilation, tile)[field]


# torch < 2.15's dynamo keeps one assume_constant_result constant per function name (a second call
# in a graph asserts "already in seen_sources"); there the plan is fetched across a graph break.
_CONSTANT_PLANS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 15)


@torch._dynamo.disable
def _plan_across_a_graph_break(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """:func:`grid_plan` run eagerly by torch.compile on torch < 2.15 (fullgraph and export then refuse)."""
    return grid_plan(height, width, kernel_size, dilation, tile)


def _traced_plan(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """:func:`grid_plan` as constants of a graph being recorded."""
    halo = (_halo(height, kernel_size[0], dilation[0], tile[0]), _halo(width, kernel_size[1], dilation[1], tile[1]))
    tensors = (_plan_tensor(height, width, kernel_size, dilation, tile, field) for field in range(len(GridPlan._fields) - 1))
    return GridPlan(*tensors, halo)


def _static_spatial_size(query: torch.Tensor) -> tuple[int, int]:
    """(height, width) of ``query`` as ints, which the index plans are built for.

    torch.export with a dynamic height or width raises here (plans, hence graphs, are per map
    size); torch.compile specialises on the size instead. ``torch.jit.trace`` records sizes as
    tensors: their values at trace time are read, and :func:`_traced_size_guard` checks them.
    """
    height, width = query.shape[1], query.shape[2]
    if torch.compiler.is_exporting() and not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(
            f"na2d cannot be exported with a dynamic height or width (got {height} x {width}): its index plans "
            f"are built per map size. Export with static spatial dims (a dynamic batch is supported), "
            f"one graph per input size.")
    if torch.jit.is_tracing():
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
    """RPB (or zeros) with one extra row and column of -inf, addressed by _MASKED."""
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


# Gathered key halos per chunk of tiles. Small chunks stay in cache between gather and attention,
# and glibc reuses their memory; one large buffer per call is unmapped and page-faulted anew each
# time (measured at NAT-Mini stage 1, batch 8: 57 ms with one buffer, 30 ms in 2 MB chunks).
_CHUNK_BYTES = 2 * 2**20


def na2d_tiled(query, key, value, kernel_size, dilation, rpb, scale, tile=None):
    """Exact neighborhood attention with RPB by dense tiles; see the module docstring.

    Arguments as :func:`timm_nat.attention.na2d`, validated; ``tile`` = (rows, cols) or None.
    """
    def dense(query, key, value, kernel_size, dilation, rpb, scale):
        return _na2d_dense_tiles(query, key, value, kernel_size, dilation, rpb, scale, tile)
    if _is_traced():  # a recorded graph holds no data-dependent branch; see exact_where_nonfinite
        return dense(query, key, value, kernel_size, dilation, rpb, scale)
    if query.numel() == 0:  # SDPA's empty result is cut off from its inputs: keep their (zero) gradients
        return _empty_result(query, key, value, rpb)
    return exact_where_nonfinite(dense, query, key, value, kernel_size, dilation, rpb, scale)


def _empty_result(query, key, value, rpb) -> torch.Tensor:
    """The empty output of an empty input, with autograd edges to every input (zero gradients)."""
    inputs = [t for t in (key, value, rpb) if t is not None]
    return query * 0 + sum(t.sum() for t in inputs).to(query.dtype) * 0


def _na2d_dense_tiles(query, key, value, kernel_size, dilation, rpb, scale, tile):
    """Eagerly: cached plans, chunks of about _CHUNK_BYTES. Traced: constant plans, one chunk, and
    the batch size only ever as the traced value (int, SymInt or jit-traced size), never derived."""
    traced = _is_traced()
    b, _, _, heads, dim = query.shape
    height, width = _static_spatial_size(query) if traced else query.shape[1:3]
    if tile is None:
        tile = (choose_tile(height, kernel_size[0], dilation[0]), choose_tile(width, kernel_size[1], dilation[1]))
    build = _traced_plan if traced else grid_plan
    if traced and torch.compiler.is_compiling() and not _CONSTANT_PLANS:
        build = _plan_across_a_graph_break
    plan = build(height, width, tuple(kernel_size), tuple(dilation), tuple(tile))
    plan = GridPlan(*(t.to(query.device) if isinstance(t, torch.Tensor) else t for t in plan))
    if torch.jit.is_tracing():
        guard = _traced_size_guard(query, height, width)
        plan = plan._replace(query_index=plan.query_index + guard, output_index=plan.output_index + guard)
    query_len, halo_len = tile[0] * tile[1], plan.halo[0] * plan.halo[1]
    num_tiles = len(plan.tile_class)
    q, k, v = _heads_first(query), _heads_first(key), _heads_first(value)
    class_bias = _class_bias(_bias_table(rpb, heads, kernel_size, query.dtype, query.device), plan)

    if traced:  # a chunk count would depend on the batch size, a graph input
        chunk = num_tiles
    else:
        halo_bytes = b * heads * halo_len * dim * query.element_size()
        chunk = max(1, _CHUNK_BYTES // max(1, halo_bytes))  # an empty batch or no heads: one chunk
    outs = []
    for start in range(0, num_tiles, chunk):
        tiles = slice(start, min(start + chunk, num_tiles))
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
