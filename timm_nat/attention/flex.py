"""Neighborhood attention with RPB on ``torch.nn.attention.flex_attention``.

The neighbourhood is a block-sparse mask, the RPB a ``score_mod``. Compiled (fused) kernels on
CUDA; on CPU flex compiles to C++ too (inference only), which is how CI checks this backend.

Token order: flex sees the map's tokens permuted so that its 128-token blocks are compact. Each
dilation group (positions with equal ``(row % dh, col % dw)``) is contiguous, since dilated NA is
plain NA on each group (see :mod:`.windows`); inside a group tokens run down vertical strips of
``STRIP_WIDTHS`` sub-grid columns (or whole rows), so that a block is a tile of the group instead
of a slice of a raster row. Each plan keeps the strip width with the fewest non-empty blocks. The
order changes nothing in the result, only which blocks flex computes.

Per (map size, kernel, dilation, device) a :class:`FlexPlan` holds that permutation, the
coordinate tables the mask and score mods read, and the block mask, built from each query's
``kh * kw`` neighbours: ``O(tokens * kh * kw)`` memory, never the ``tokens x tokens`` mask that
``create_block_mask`` evaluates without ``_compile=True``.

Compilation: one ``torch.compile(fullgraph=True)`` callable per (plan, dtype, RPB or not), each
with its own dynamo cache (so layers of other sizes never count against its recompile limit); a
second batch size makes the batch dimension dynamic (one recompile), and a callable that still
hits the limit raises instead of silently running flex uncompiled. A new map size (detection at
varying image sizes) builds a new plan (milliseconds) and compiles once more (seconds); plans and
callables are kept for the last ``_CACHE_SIZE`` keys.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import types
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import graph_mode
from .reference import _all_finite, na2d_reference
from .windows import neighborhood_1d

__all__ = ["na2d_flex", "flex_plan", "block_sparsity", "BLOCK_SIZE", "STRIP_WIDTHS"]

BLOCK_SIZE = 128  # flex's default sparse block: the unit its kernels skip or compute
STRIP_WIDTHS = (8, 16, 32)  # candidate strips (sub-grid columns); whole rows are always a candidate
_CACHE_SIZE = 64
_COMPILE_BACKEND = "inductor"  # tests count graphs with "eager"
_COPIES = itertools.count()


@dataclasses.dataclass(frozen=True, eq=False)
class FlexPlan:
    """Token order, per-token coordinates and block mask of one (map, kernel, dilation, device)."""

    height: int
    width: int
    kernel_size: tuple[int, int]
    dilation: tuple[int, int]
    strip_width: int  # sub-grid columns per strip of the chosen order (0: raster order)
    order: Optional[torch.Tensor]  # [N] raster index at each flex position; None: raster order
    inverse: Optional[torch.Tensor]  # [N] flex position of each raster index
    # int32, padded to whole blocks: map row / column of each flex position, and the first key
    # row / column of its window (as a query)
    rows: torch.Tensor
    cols: torch.Tensor
    first_row: torch.Tensor
    first_col: torch.Tensor
    block_mask: BlockMask


def _token_order(height: int, width: int, dilation: tuple[int, int], strip_width: int) -> torch.Tensor:
    """Raster index of each flex position: dilation groups one after another, each in strips."""
    dh, dw = dilation
    row, col = torch.arange(height)[:, None], torch.arange(width)[None, :]
    sub_height, sub_width = -(-height // dh), -(-width // dw)
    strips = -(-sub_width // strip_width)
    strip, in_strip = (col // dw) // strip_width, (col // dw) % strip_width
    group = (row % dh) * dw + col % dw
    rank = ((group * strips + strip) * sub_height + row // dh) * strip_width + in_strip
    return rank.flatten().argsort()


def _neighborhood_mask_mod(plan_tables, kernel_size, dilation) -> Callable:
    rows, cols, first_row, first_col = plan_tables
    (kh, kw), (dh, dw) = kernel_size, dilation

    def neighborhood(b, h, q_idx, kv_idx):
        dr = rows[kv_idx] - first_row[q_idx]
        dc = cols[kv_idx] - first_col[q_idx]
        return ((dr >= 0) & (dr < kh * dh) & (dr % dh == 0)
                & (dc >= 0) & (dc < kw * dw) & (dc % dw == 0))

    return neighborhood


def _block_pair_counts(order: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour pairs per (query block, key block) when flex sees the tokens in ``order``.

    ``neighbours`` is ``[N, kh * kw]``: raster index of each neighbour of each raster query.
    Returns the ``[blocks, blocks]`` counts and ``inverse`` (flex position of each raster index).
    """
    tokens = order.numel()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(tokens)
    blocks = -(-tokens // BLOCK_SIZE)
    pair_block = (inverse[:, None] // BLOCK_SIZE) * blocks + inverse[neighbours] // BLOCK_SIZE
    counts = torch.bincount(pair_block.flatten(), minlength=blocks * blocks).view(blocks, blocks)
    return counts, inverse


def _block_mask_from_counts(counts: torch.Tensor, tokens: int, mask_mod: Callable) -> BlockMask:
    """The block mask ``create_block_mask`` would build: a block is full when all ``BLOCK_SIZE**2``
    pairs are neighbours (padding never is), partial when some are."""
    full = counts == BLOCK_SIZE * BLOCK_SIZE
    partial = (counts > 0) & ~full

    def ordered(dense):  # flex's layout: count per query block, non-empty key blocks first, ascending
        dense = dense.to(torch.int32)
        return (dense.sum(-1).to(torch.int32)[None, None].contiguous(),
                dense.argsort(dim=-1, descending=True, stable=True).to(torch.int32)[None, None].contiguous())

    num, indices = ordered(partial)
    full_num, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(num, indices, full_num, full_indices, BLOCK_SIZE=BLOCK_SIZE,
                                    mask_mod=mask_mod, seq_lengths=(tokens, tokens))


_PLANS: "collections.OrderedDict[tuple, FlexPlan]" = collections.OrderedDict()  # least recently used first
_PLANS_LOCK = threading.Lock()  # threads share the cache; lookup, insert and eviction are one step


@torch._dynamo.assume_constant_result  # in a caller's compiled graph: runs eagerly while tracing
def _ensure_plan(key: tuple) -> bool:
    with _PLANS_LOCK:
        if key in _PLANS:
            _PLANS.move_to_end(key)
            return True
    with torch.inference_mode(False):  # a plan made in inference mode must still serve training
        plan = _build_plan(*key)
    with _PLANS_LOCK:
        _PLANS.setdefault(key, plan)  # another thread may have built it meanwhile: keep the first
        while len(_PLANS) > _CACHE_SIZE:
            _PLANS.popitem(last=False)
    return True


def flex_plan(height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int],
              device: torch.device | str = "cpu", regroup: bool = True) -> FlexPlan:
    """The cached :class:`FlexPlan` of one map; ``regroup=False`` keeps raster token order."""
    key = (height, width, tuple(kernel_size), tuple(dilation), torch.device(device), regroup)
    _ensure_plan(key)
    plan = _PLANS.get(key)  # a plain dict read, which a caller's compiled graph can trace
    if plan is None:  # evicted by other threads in between (eager only): build it again
        _ensure_plan(key)
        plan = _PLANS[key]
    return plan


def _build_plan(height, width, kernel_size, dilation, device, regroup) -> FlexPlan:
    tokens = height * width
    row_keys, _ = neighborhood_1d(height, kernel_size[0], dilation[0])  # [H, kh]
    col_keys, _ = neighborhood_1d(width, kernel_size[1], dilation[1])  # [W, kw]
    # Raster index of every neighbour of every (raster) query: [H, W, kh, kw] -> [N, kh * kw].
    neighbours = (row_keys[:, None, :, None] * width + col_keys[None, :, None, :]).reshape(tokens, -1)
    sub_width = -(-width // dilation[1])
    strips = sorted({min(s, sub_width) for s in STRIP_WIDTHS} | {sub_width}, reverse=True) if regroup else [0]
    candidates = []
    for strip_width in strips:  # the fewest non-empty blocks wins; the widest strip on ties
        order = _token_order(height, width, dilation, strip_width) if strip_width else torch.arange(tokens)
        counts, inverse = _block_pair_counts(order, neighbours)
        candidates.append((int((counts > 0).sum()), len(candidates), strip_width, order, inverse, counts))
    _, _, strip_width, order, inverse, counts = min(candidates, key=lambda c: c[:2])
    rows, cols = order // width, order % width
    # Padded to whole blocks, far outside the map: a mod that reads past the last token masks it.
    padding = -(-tokens // BLOCK_SIZE) * BLOCK_SIZE - tokens
    tables = tuple(torch.nn.functional.pad(t, (0, padding), value=-2 ** 20).to(device=device, dtype=torch.int32)
                   for t in (rows, cols, row_keys[rows, 0], col_keys[cols, 0]))
    block_mask = _block_mask_from_counts(counts, tokens, _neighborhood_mask_mod(tables, kernel_size, dilation))
    identity = bool((order == torch.arange(tokens)).all())
    return FlexPlan(height, width, kernel_size, dilation, strip_width,
                    None if identity else order.to(device), None if identity else inverse.to(device),
                    *tables, block_mask.to(device))


def block_sparsity(block_mask: BlockMask) -> dict:
    """Share of the ``blocks x blocks`` grid that flex computes: ``full``, ``partial``, ``nonempty``."""
    q_tokens, kv_tokens = block_mask.seq_lengths
    grid = -(-q_tokens // block_mask.BLOCK_SIZE[0]) * -(-kv_tokens // block_mask.BLOCK_SIZE[1])
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    partial = int(block_mask.kv_num_blocks.sum())
    return dict(full=full / grid, partial=partial / grid, nonempty=(full + partial) / grid)


class _Permute(torch.autograd.Function):
    """``x.index_select(1, order)`` whose backward is the inverse gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def _rpb_score_mod(plan: FlexPlan, table: torch.Tensor) -> Callable:
    """``score_mod`` adding ``table[head, kh - 1 + drow // dh, kw - 1 + dcol // dw]``."""
    (kh, kw), (dh, dw) = plan.kernel_size, plan.dilation
    rows, cols = plan.rows, plan.cols

    def score_mod(score, b, h, q_idx, kv_idx):
        # Clamped so that pairs the mask drops still index inside the table.
        ir = ((rows[kv_idx] - rows[q_idx]) // dh + kh - 1).clamp(0, 2 * kh - 2)
        ic = ((cols[kv_idx] - cols[q_idx]) // dw + kw - 1).clamp(0, 2 * kw - 2)
        return score + table[h, ir, ic]

    return score_mod


def _flex_call(query, key, value, table, plan, scale):
    score_mod = None if table is None else _rpb_score_mod(plan, table)
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=plan.block_mask, scale=scale)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compiled_flex(plan: FlexPlan, dtype: torch.dtype, has_rpb: bool) -> Callable:
    """A compiled copy of :func:`_flex_call` with a code object (hence a dynamo cache) of its own.

    ``fullgraph=True``: a graph break, or the recompile limit, raises instead of running flex
    eagerly (which would materialise every score).
    """
    # A name of its own too: dynamo keeps automatic-dynamic state per (file, line, name), and another
    # plan's sizes there would compile this one with symbolic sequence lengths.
    name = f"_flex_call_{next(_COPIES)}"
    own_copy = types.FunctionType(_flex_call.__code__.replace(co_name=name, co_qualname=name), _flex_call.__globals__, name)
    compiled = torch.compile(own_copy, fullgraph=True, backend=_COMPILE_BACKEND)
    key = f"{plan.height}x{plan.width}, kernel {plan.kernel_size}, dilation {plan.dilation}, {dtype}, " \
          f"{'with' if has_rpb else 'no'} RPB"

    def attend(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            raise RuntimeError(
                f"na2d flex ({key}): torch._dynamo.config.recompile_limit "
                f"({getattr(torch._dynamo.config, 'recompile_limit', '?')}) reached; "
                "raise it or run na2d_flex(compile=False)") from error

    return attend


def na2d_flex(query, key, value, kernel_size, dilation, rpb, scale, compile=True, regroup=True):
    """Arguments as :func:`timm_nat.attention.na2d`, validated. ``compile=False`` runs flex eagerly.

    Non-finite inputs (checked by one reduction in eager calls) go to the exact gather path, so
    NaN/Inf land exactly where legacy NATTEN puts them: flex's kernel would zero a NaN query and
    spread a NaN value to every query of the blocks around it. Inside a caller's
    ``torch.compile`` graph that check is skipped (it would break the graph).
    """
    compiling = graph_mode.is_compiling()
    if not compiling and not _all_finite(*(t for t in (query, key, value, rpb) if t is not None)):
        return na2d_reference(query, key, value, tuple(kernel_size), tuple(dilation), rpb, scale)
    b, height, width, heads, dim = query.shape
    plan = flex_plan(height, width, kernel_size, dilation, query.device, regroup)

    def to_flex(x):  # [B, H, W, heads, D] -> [B, heads, N, D] in the plan's token order
        x = x.reshape(b, height * width, heads, dim)
        if plan.order is not None:
            x = _Permute.apply(x, plan.order, plan.inverse)
        return x.transpose(1, 2)

    if compiling or not compile:
        attend = _flex_call
    else:
        attend = _compiled_flex(plan, query.dtype, rpb is not None)
    out = attend(to_flex(query), to_flex(key), to_flex(value), rpb, plan, scale).transpose(1, 2)
    if plan.order is not None:
        out = _Permute.apply(out, plan.inverse, plan.order)
    return out.reshape(b, height, width, heads, dim)
