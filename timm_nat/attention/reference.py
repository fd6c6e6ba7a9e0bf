"""Gather-based neighborhood attention: small, slow, obviously correct. For tests, and for the
few queries whose windows hold non-finite values (:func:`exact_where_nonfinite`)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .graph_mode import is_compiling
from .windows import neighborhood_1d

__all__ = ["na2d_reference", "na2d_reference_at", "exact_where_nonfinite", "holds_nonfinite"]


def na2d_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Neighborhood attention by explicit gathering of every query's ``kh*kw`` neighbours.

    Layout ``[batch, height, width, heads, head_dim]``; arguments already validated.
    Memory is ``O(tokens * kh * kw * head_dim)``: use it for checking, not for models.
    """
    every_query = torch.ones(query.shape[:4], dtype=torch.bool, device=query.device).nonzero(as_tuple=True)
    out = na2d_reference_at(query, key, value, kernel_size, dilation, rpb, scale, every_query)
    return out.view(query.shape)


def na2d_reference_at(query, key, value, kernel_size, dilation, rpb, scale,
                      index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Outputs ``[len(index[0]), head_dim]`` of the queries at ``index = (batch, row, col, head)``
    (1-D int64 tensors); other arguments as :func:`na2d_reference`."""
    batch, row, col, head = index
    rows, row_bias = neighborhood_1d(query.shape[1], kernel_size[0], dilation[0], query.device)
    cols, col_bias = neighborhood_1d(query.shape[2], kernel_size[1], dilation[1], query.device)
    # window of each selected query: [m, kh, 1] x [m, 1, kw] -> keys and values [m, kh, kw, dim]
    window_rows, window_cols = rows[row][:, :, None], cols[col][:, None, :]
    batch_, head_ = batch[:, None, None], head[:, None, None]
    k = key[batch_, window_rows, window_cols, head_]
    v = value[batch_, window_rows, window_cols, head_]
    logits = torch.einsum("md,mijd->mij", query[batch, row, col, head] * scale, k)
    if rpb is not None:
        logits = logits + rpb.to(logits.dtype)[head_, row_bias[row][:, :, None], col_bias[col][:, None, :]]
    attn = logits.flatten(1).softmax(dim=-1).view_as(logits)
    return torch.einsum("mij,mijd->md", attn, v)


def exact_where_nonfinite(compute: Callable[..., torch.Tensor], query, key, value, kernel_size, dilation,
                          rpb, scale) -> torch.Tensor:
    """``compute(query, key, value, kernel_size, dilation, rpb, scale)``, with legacy NATTEN's
    semantics for non-finite inputs even where ``compute`` attends to dense tiles or blocks.

    Dense kernels also touch keys outside a query's window (masked with -inf, weighted 0), and
    ``NaN - inf`` and ``0 * NaN`` are NaN: one NaN would spoil a whole tile, and a row whose every
    logit is -inf (an RPB of -inf) would count as fully masked, 0 instead of NaN. So when q, k, v
    or rpb holds a NaN/Inf, ``compute`` runs on zeroed copies and the queries whose output depends
    on one (their own q, a k/v in their window, an RPB entry their window uses) are recomputed by
    :func:`na2d_reference_at`. The check is one sum per tensor; it is skipped on meta tensors and
    while ``torch.compile`` traces (a data-dependent branch would break the graph).
    """
    if not holds_nonfinite(*(t for t in (query, key, value, rpb) if t is not None)):
        return compute(query, key, value, kernel_size, dilation, rpb, scale)
    index = _queries_seeing_nonfinite(query, key, value, kernel_size, dilation, rpb)
    query_, key_, value_, rpb_ = (t if t is None else t.nan_to_num(0.0, 0.0, 0.0) for t in (query, key, value, rpb))
    out = compute(query_, key_, value_, kernel_size, dilation, rpb_, scale)
    return out.index_put(index, na2d_reference_at(query, key, value, kernel_size, dilation, rpb, scale, index))


def holds_nonfinite(*tensors: torch.Tensor) -> bool:
    """Whether an element of ``tensors`` is NaN or Inf, checked eagerly; False on meta tensors and
    while ``torch.compile`` traces (a data-dependent branch would break the graph)."""
    if tensors[0].device.type == "meta" or is_compiling():
        return False
    return not _all_finite(*tensors)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True if no element is NaN or Inf. A sum is non-finite whenever an element is, and costs
    less than ``isfinite().all()``; a finite sum that overflows only sends us to the exact path."""
    with torch.no_grad():
        total = sum(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors)
        return bool(torch.isfinite(total))


def _queries_seeing_nonfinite(query, key, value, kernel_size, dilation, rpb=None) -> tuple[torch.Tensor, ...]:
    """``(batch, row, col, head)`` of every query whose q, a k or v in its window, or an RPB entry
    its window uses, is non-finite."""
    with torch.no_grad():
        bad_key = ~(key.isfinite().all(-1) & value.isfinite().all(-1))  # [batch, H, W, heads]
        rows, row_bias = neighborhood_1d(query.shape[1], kernel_size[0], dilation[0], query.device)
        cols, col_bias = neighborhood_1d(query.shape[2], kernel_size[1], dilation[1], query.device)
        sees_bad = bad_key[:, rows[:, None, :, None], cols[None, :, None, :]].flatten(3, 4).any(3)
        sees_bad |= ~query.isfinite().all(-1)
        if rpb is not None:  # [heads, H, W, kh, kw] -> [H, W, heads]
            bad_bias = ~rpb.isfinite()[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
            sees_bad |= bad_bias.flatten(3, 4).any(3).permute(1, 2, 0)
        return sees_bad.nonzero(as_tuple=True)
