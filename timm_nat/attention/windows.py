"""Window and relative-position rules of legacy NATTEN (<= 0.17), per spatial axis.

Dilated neighborhood attention is plain neighborhood attention on each of the
``dilation`` interleaved sub-grids of an axis (positions with equal ``index % dilation``).
Inside a sub-grid of length ``n`` the window of sub-position ``p`` starts at
``clamp(p - kernel // 2, 0, n - kernel)``: centred, shifted inwards at the borders. This
is what NATTEN 0.17's ``get_window_start`` computes (including sub-grids of unequal
length when the axis is not a multiple of the dilation). The bias of a neighbour is
``rpb[kernel - 1 + (key - query) // dilation]`` on each axis (``get_pb_start`` + offset).
"""
from __future__ import annotations

import torch

__all__ = ["neighborhood_1d", "subgrid_length", "window_start"]


def subgrid_length(length: int, dilation: int, group: int) -> int:
    """Number of positions ``i < length`` with ``i % dilation == group``."""
    return (length - group + dilation - 1) // dilation


def window_start(sub_position: torch.Tensor, sub_length: int, kernel_size: int) -> torch.Tensor:
    """First window position (in sub-grid coordinates) of each query sub-position."""
    return (sub_position - kernel_size // 2).clamp(0, sub_length - kernel_size)


def neighborhood_1d(length: int, kernel_size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of every position of one axis.

    Returns ``(keys, bias_index)``, both ``[length, kernel_size]`` int64: the key position of
    each neighbour (row-major window order) and its index into that axis of the RPB table.
    """
    pos = torch.arange(length)
    group, sub = pos % dilation, pos // dilation
    sub_len = (length - group + dilation - 1) // dilation
    start = (sub - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, sub_len - kernel_size)
    sub_keys = start[:, None] + torch.arange(kernel_size)
    keys = group[:, None] + dilation * sub_keys
    bias_index = sub_keys - sub[:, None] + kernel_size - 1
    return keys, bias_index
