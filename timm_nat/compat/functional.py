"""Legacy NATTEN (<= 0.17.4) unfused operators on timm-nat's window rules, with autograd.

Layout as the legacy kernels took it: ``[batch, heads, height, width, dim]``; attention weights
``[batch, heads, height, width, kh*kw]``, neighbours in row-major order of the window. The query
is *not* scaled inside ``natten2dqkrpb`` (callers scale it first, as NATTEN's own module and
transformers' ``DinatSelfAttention`` did).

The computation (and its autograd) is :mod:`timm_nat.attention.unfused`, on the query tiles of
:mod:`timm_nat.attention.tiling`; this module holds the legacy names, signatures and checks.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..attention.functional import int_pair
from ..attention.unfused import window_logits, window_sum

__all__ = [
    "natten2dqkrpb", "natten2dqk", "natten2dav", "natten1dqkrpb", "natten1dqk", "natten1dav",
    "na2d_qk", "na2d_av", "na1d_qk", "na1d_av",
]

IntOrPair = Union[int, tuple[int, int]]


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
    return window_logits(query, key, rpb, kernel_size, dilation)


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
    return window_sum(attn, value, kernel_size, dilation)


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
    rpb = None if rpb is None else rpb.unsqueeze(1)
    logits = window_logits(query.unsqueeze(2), key.unsqueeze(2), rpb, (1, kernel), (1, dil))
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
    return window_sum(attn.unsqueeze(2), value.unsqueeze(2), (1, kernel), (1, dil)).squeeze(2)


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
