"""Gather-based neighborhood attention: small, slow, obviously correct. For tests."""
from __future__ import annotations

from typing import Optional

import torch

from .windows import neighborhood_1d

__all__ = ["na2d_reference"]


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
    _, height, width, _, _ = query.shape
    rows, row_bias = neighborhood_1d(height, kernel_size[0], dilation[0])
    cols, col_bias = neighborhood_1d(width, kernel_size[1], dilation[1])
    # [batch, H, W, kh, kw, heads, dim]
    row_idx, col_idx = rows[:, None, :, None], cols[None, :, None, :]
    k = key[:, row_idx, col_idx]
    v = value[:, row_idx, col_idx]
    logits = torch.einsum("bhwnd,bhwijnd->bhwnij", query * scale, k)
    if rpb is not None:
        # [heads, H, W, kh, kw] -> [H, W, heads, kh, kw]
        bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
        logits = logits + bias.permute(1, 2, 0, 3, 4)
    b, h, w, n, i, j = logits.shape
    attn = logits.reshape(b, h, w, n, i * j).softmax(dim=-1).reshape(b, h, w, n, i, j)
    return torch.einsum("bhwnij,bhwijnd->bhwnd", attn, v)
