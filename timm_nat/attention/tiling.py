"""Query tiles against dense key halos: the tiling that ``tiled`` (SDPA) and the legacy API
(:mod:`timm_nat.compat`) both build on.

Each spatial axis is split into dilation groups (the interleaved sub-grids, :mod:`.windows`)
and each group into tiles of ``T`` queries. All windows of a tile's queries fit in a halo of
``T + K - 1`` keys of the same group, so a tile is a small dense attention problem: ``T*T``
queries against ``Hk*Hk`` keys (2-D). Keys and values are gathered about ``((T + K - 1) / T)**2``
times instead of ``K*K`` times. Border tiles, sub-grids of unequal length and padded query slots
are all expressed by index tables, so every tile runs the same batched products:

* ``tiled`` adds a bias table to each tile (the RPB of every in-window pair, ``-inf`` elsewhere)
  and runs one SDPA call per chunk of tiles;
* the legacy ``natten2dqkrpb`` picks each query's ``K*K`` window entries out of its tile's dense
  scores (``window_index``), and ``natten2dav`` scatters weights into dense (zero elsewhere)
  tiles.

Dense tiles also touch keys outside a query's window: both callers keep legacy NaN/Inf semantics
on their own (``reference.exact_where_nonfinite``, and compat's exact window path).

The plans depend only on (length, kernel, dilation, tile) and are cached as plain CPU tensors
(built outside inference mode, any default-device context and any tracer, so a run under
``torch.inference_mode()``, on the meta device or inside a recorded graph never poisons them for
later training); callers move them to the input's device with :func:`plan_on`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .graph_mode import dispatch_recording, outside_recording
from .windows import subgrid_length, window_start

__all__ = ["AxisPlan", "GridPlan", "axis_plan", "grid_plan", "window_index", "choose_tile", "plan_on",
           "chunk_slices", "plan_cache", "halo_length", "CHUNK_BYTES", "MASKED"]

MASKED = -1  # bias index of a (query, key) pair outside the query's window

# Work (query-key pairs) one more tile costs besides its own products, per axis: small batched
# matmuls are slower per pair. 32 and 48 (the two rules this replaced) pick the same tiles at every
# NAT/DiNAT kernel-7 and 11 stage shape; where they differ (kernel 5, dilation 2-4: 7 vs 14
# queries) 32 was as fast or faster on CPU for both tiled (16 vs 20 ms) and the legacy qk + av.
TILE_OVERHEAD = 32

# Work is done in chunks of about this many bytes of gathered halos or dense tile scores: small
# buffers stay in cache between gather and product, and glibc reuses their memory, while one large
# buffer per call is unmapped and page-faulted anew each time (NAT-Mini stage 1, batch 8: tiled
# 57 ms with one buffer, 30 ms in 2 MiB chunks; the legacy qk 100 ms vs 49 ms).
CHUNK_BYTES = 2 * 2**20


def choose_tile(length: int, kernel_size: int, dilation: int) -> int:
    """Queries per tile on one axis: fewest (padded queries x halo) pairs plus :data:`TILE_OVERHEAD`
    per tile. Smaller tiles waste fewer key computations ((T+K-1)/T keys per query and axis) but
    make smaller matmuls."""
    n = subgrid_length(length, dilation, 0)
    best, best_cost = n, math.inf
    for tile in range(2, min(n, 16) + 1):
        tiles = dilation * math.ceil(n / tile)
        cost = tiles * (tile * min(tile + kernel_size - 1, n) + TILE_OVERHEAD)
        if cost < best_cost:
            best, best_cost = tile, cost
    return best


def chunk_slices(count: int, item_bytes: int) -> list[slice]:
    """``range(count)`` in slices of about :data:`CHUNK_BYTES` (items of ``item_bytes`` each, at
    least one per slice; empty items all go in one slice)."""
    step = max(1, CHUNK_BYTES // max(1, item_bytes))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def plan_cache(maxsize: int):
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
            if dispatch_recording():
                with outside_recording():
                    return cached(*args)
            with torch.inference_mode(False):  # eager: the cheap part of _outside_tracing is enough
                return cached(*args)
        plan.cache_clear = cached.cache_clear
        return plan
    return decorate


class AxisPlan(NamedTuple):
    """Tiling of one axis. Positions are in original (un-dilated) coordinates."""
    query_index: torch.Tensor  # [tiles, T]: position of each query slot (padding repeats one)
    key_index: torch.Tensor    # [tiles, Hk]: position of each halo key (padding repeats one)
    bias_index: torch.Tensor   # [tiles, T, Hk]: RPB index of each pair, or MASKED
    window_slot: torch.Tensor  # [tiles, T, K]: halo slot of each window neighbour of each query slot
    tile_of: torch.Tensor      # [length]: tile holding each position's query
    slot_of: torch.Tensor      # [length]: its slot inside that tile


def halo_length(length: int, kernel_size: int, dilation: int, tile: int) -> int:
    """Keys per halo on one axis: a tile's windows, capped by the longest sub-grid."""
    return max(min(tile + kernel_size - 1, subgrid_length(length, dilation, g)) for g in range(dilation))


@plan_cache(maxsize=256)
def axis_plan(length: int, kernel_size: int, dilation: int, tile: int) -> AxisPlan:
    """Build (and cache) the tiling of one axis as CPU tensors; see :class:`AxisPlan`."""
    halo = halo_length(length, kernel_size, dilation, tile)
    slots = torch.arange(tile, device="cpu")
    halo_slots = torch.arange(halo, device="cpu")
    queries, keys, biases, windows = [], [], [], []
    tile_of = torch.empty(length, dtype=torch.long, device="cpu")
    slot_of = torch.empty(length, dtype=torch.long, device="cpu")
    for group in range(dilation):
        n = subgrid_length(length, dilation, group)
        first = torch.arange(0, n, tile, device="cpu")                    # [tiles]
        sub_q = (first[:, None] + slots).clamp(max=n - 1)                 # [tiles, T]
        start = window_start(sub_q, n, kernel_size)                       # [tiles, T]
        halo_start = start[:, :1].clamp(max=max(n - halo, 0))             # [tiles, 1]
        sub_k = halo_start + halo_slots                                   # [tiles, Hk]
        rel = sub_k[:, None, :] - start[:, :, None]                       # [tiles, T, Hk]
        inside = (rel >= 0) & (rel < kernel_size) & (sub_k[:, None, :] < n)
        bias = sub_k[:, None, :] - sub_q[:, :, None] + kernel_size - 1
        biases.append(torch.where(inside, bias, torch.full_like(bias, MASKED)))
        windows.append((start - halo_start)[:, :, None] + torch.arange(kernel_size, device="cpu"))
        offset = sum(len(q) for q in queries)
        queries.append(group + dilation * sub_q)
        keys.append(group + dilation * sub_k.clamp(max=n - 1))
        sub = torch.arange(n, device="cpu")
        tile_of[group::dilation] = offset + sub // tile
        slot_of[group::dilation] = sub % tile
    return AxisPlan(torch.cat(queries), torch.cat(keys), torch.cat(biases), torch.cat(windows), tile_of, slot_of)


class GridPlan(NamedTuple):
    """Both axes combined, as flat ``row * width + col`` indices (tile-major order).

    Tiles with equal bias patterns share a class (all interior tiles do), so ``tiled`` builds the
    bias per class pair and copies it to tiles block-wise instead of gathering it element by element.
    """
    query_index: torch.Tensor   # [tiles * Tr * Tc]
    key_index: torch.Tensor     # [tiles * Hkr * Hkc]
    output_index: torch.Tensor  # [height * width]: flat query slot of every position
    row_bias: torch.Tensor      # [row classes, Tr, Hkr]: RPB row index, or MASKED
    col_bias: torch.Tensor      # [col classes, Tc, Hkc]
    tile_class: torch.Tensor    # [tiles]: row class * col classes + col class
    halo: tuple                 # (Hkr, Hkc)

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """(tiles, queries per tile, keys per halo)."""
        tiles, halo_len = len(self.tile_class), self.halo[0] * self.halo[1]
        return tiles, len(self.query_index) // max(1, tiles), halo_len


def _axis_plans(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> tuple[AxisPlan, AxisPlan]:
    return (axis_plan(height, kernel_size[0], dilation[0], tile[0]),
            axis_plan(width, kernel_size[1], dilation[1], tile[1]))


@plan_cache(maxsize=64)
def grid_plan(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> GridPlan:
    """Build (and cache) the 2-D tiling from the two axis plans, as CPU tensors."""
    rows, cols = _axis_plans(height, width, kernel_size, dilation, tile)

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


@plan_cache(maxsize=64)
def window_index(height: int, width: int, kernel_size: tuple, dilation: tuple, tile: tuple) -> torch.Tensor:
    """[H * W * Kr * Kc]: flat index into the tiles' dense ``[tiles, Tr*Tc, Hkr*Hkc]`` scores of every
    (position, window neighbour), neighbours in row-major window order; a CPU tensor."""
    rows, cols = _axis_plans(height, width, kernel_size, dilation, tile)
    plan = grid_plan(height, width, kernel_size, dilation, tile)
    row_slot = rows.window_slot[rows.tile_of, rows.slot_of]                         # [H, Kr]
    col_slot = cols.window_slot[cols.tile_of, cols.slot_of]                         # [W, Kc]
    halo_slot = row_slot[:, None, :, None] * plan.halo[1] + col_slot[None, :, None, :]  # [H, W, Kr, Kc]
    query_slot = plan.output_index.view(height, width, 1, 1)
    return (query_slot * (plan.halo[0] * plan.halo[1]) + halo_slot).reshape(-1)


def plan_on(plan, device: torch.device):
    """``plan`` (a :class:`GridPlan` or any tuple of tensors and ints) with its tensors on ``device``."""
    if device.type == "cpu":
        return plan
    return type(plan)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in plan))
