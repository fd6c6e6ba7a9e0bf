"""Neighborhood attention with RPB on ``torch.nn.attention.flex_attention``.

The neighbourhood is a block-sparse mask over the flattened map, the RPB a ``score_mod``.
Compiled (fused) kernels on CUDA; on CPU flex compiles to C++ too, which is how CI checks
this backend. Masks are cached per (map size, kernel, dilation, device).
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


__all__ = ["na2d_flex"]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _window_offset(query_pos, key_pos, length, kernel_size, dilation):
    """``key - first key of the query's window`` along one axis, in index arithmetic only
    (the CPU compiler rejects tensors captured by a mask); see :mod:`.windows`."""
    group, sub = query_pos % dilation, query_pos // dilation
    sub_length = (length - group + dilation - 1) // dilation
    start = torch.minimum((sub - kernel_size // 2).clamp(min=0), sub_length - kernel_size)
    return key_pos - (group + dilation * start)


@functools.lru_cache(maxsize=64)
def _block_mask(height, width, kernel_size, dilation, device_str):
    (kh, kw), (dh, dw) = kernel_size, dilation

    def in_window(offset, dil, kernel):
        return (offset >= 0) & (offset < kernel * dil) & (offset % dil == 0)

    def neighborhood(b, h, q_idx, kv_idx):
        dr = _window_offset(q_idx // width, kv_idx // width, height, kh, dh)
        dc = _window_offset(q_idx % width, kv_idx % width, width, kw, dw)
        return in_window(dr, dh, kh) & in_window(dc, dw, kw)

    tokens = height * width
    return create_block_mask(neighborhood, B=None, H=None, Q_LEN=tokens, KV_LEN=tokens, device=device_str)


def na2d_flex(query, key, value, kernel_size, dilation, rpb, scale, compile=True):
    """Arguments as :func:`timm_nat.attention.na2d`, validated. ``compile=False`` runs flex eagerly."""
    b, height, width, heads, dim = query.shape
    mask = _block_mask(height, width, tuple(kernel_size), tuple(dilation), str(query.device))
    score_mod = None
    if rpb is not None:
        (kh, kw), (dh, dw) = kernel_size, dilation
        table = rpb.to(query.dtype)

        def score_mod(score, b_, h, q_idx, kv_idx):
            # Clamped so that pairs the mask drops still index inside the table.
            ir = ((kv_idx // width - q_idx // width) // dh + kh - 1).clamp(0, 2 * kh - 2)
            ic = ((kv_idx % width - q_idx % width) // dw + kw - 1).clamp(0, 2 * kw - 2)
            return score + table[h, ir, ic]

    def flat(x):
        return x.reshape(b, height * width, heads, dim).transpose(1, 2)

    attend = _compiled_flex() if compile else flex_attention
    out = attend(flat(query), flat(key), flat(value), score_mod=score_mod, block_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, height, width, heads, dim)
