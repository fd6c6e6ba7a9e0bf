"""Window and relative-position rules of legacy NATTEN (<= 0.17), per spatial axis.

Dilated neighborhood attention is plain neighborhood attention on each of the
``dilation`` interleaved sub-grids of an axis (positions with equal ``index % dilation``).
Inside a sub-grid of length ``n`` the window of sub-position ``p`` starts at
``clamp(p - kernel // 2, 0, n - kernel)``: centred, shifted inwards at the borders. This
is what NATTEN 0.17's ``get_window_start`` computes (including sub-grids of unequal
length when the axis is not a multiple of the dilation). The bias of a neighbour is
``rpb[kernel - 1 + (key - query) // dilation]`` on each axis (``get_pb_start`` + offset).

:func:`window_start` is the one place that rule is written; ``tiled``, ``reference`` and
``flex`` all derive their windows from it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["neighborhood_1d", "subgrid_length", "window_start"]

IntOrTensor = Union[int, torch.Tensor]


def subgrid_length(length: IntOrTensor, dilation: int, group: IntOrTensor) -> IntOrTensor:
    """Number of positions ``i < length`` with ``i % dilation == group`` (ints or tensors)."""
    return (length - group + dilation - 1) // dilation


def window_start(sub_position: torch.Tensor, sub_length: IntOrTensor, kernel_size: int) -> torch.Tensor:
    """First window position (in sub-grid coordinates) of each query sub-position.

    ``sub_length`` is the sub-grid's length, an int or a tensor broadcasting with
    ``sub_position`` (sub-grids of one axis differ in length when it is not a multiple of the
    dilation). Requires ``sub_length >= kernel_size``.
    """
    start = (sub_position - kernel_size // 2).clamp(min=0)
    if isinstance(sub_length, torch.Tensor):
        return torch.minimum(start, sub_length - kernel_size)
    return start.clamp(max=sub_length - kernel_size)


def neighborhood_1d(length: int, kernel_size: int, dilation: int,
                    device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of every position of one axis.

    Returns ``(keys, bias_index)``, both ``[length, kernel_size]`` int64 on ``device`` (default
    CPU): the key position of each neighbour (row-major window order) and its index into that
    axis of the RPB table.
    """
    pos = torch.arange(length, device=device or "cpu")
    group, sub = pos % dilation, pos // dilation
    start = window_start(sub, subgrid_length(length, dilation, group), kernel_size)
    sub_keys = start[:, None] + torch.arange(kernel_size, device=pos.device)
    keys = group[:, None] + dilation * sub_keys
    bias_index = sub_keys - sub[:, None] + kernel_size - 1
    return keys, bias_index
