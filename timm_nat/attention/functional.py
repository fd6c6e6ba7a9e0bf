"""``na2d``: 2-D neighborhood attention with optional relative positional bias (RPB).

Layout follows NATTEN: ``[batch, height, width, heads, head_dim]``. Semantics are legacy
NATTEN's (<= 0.17), which every published NAT/DiNAT checkpoint was trained with.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Union

import torch

from . import backends
from .reference import na2d_reference

__all__ = ["na2d", "use_backend", "available_backends", "select_backend", "BACKEND_ENV_VAR"]

_logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "TIMM_NAT_ATTENTION_BACKEND"
_BACKENDS = ("natten", "flex", "tiled", "reference")
_forced_backend: Optional[str] = None
_logged_choices: set = set()

IntOrPair = Union[int, tuple[int, int]]


def _pair(name: str, value: IntOrPair, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on each axis, got {value!r}")
    return pair


def _check_inputs(query, key, value, kernel_size, dilation, rpb):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must be 5-D [batch, height, width, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"query, key and value must have the same shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    kernel_size = _pair("kernel_size", kernel_size, 2)
    dilation = _pair("dilation", dilation, 1)
    height, width, heads = query.shape[1], query.shape[2], query.shape[3]
    for axis, size, k, d in (("height", height, kernel_size[0], dilation[0]), ("width", width, kernel_size[1], dilation[1])):
        if size < k * d:
            raise ValueError(
                f"{axis} {size} is smaller than kernel_size * dilation = {k} * {d} = {k * d}; "
                "pad the feature map first (the models do this)")
    if rpb is not None:
        expected = (heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must have shape [heads, 2*kh-1, 2*kw-1] = {list(expected)}, got {list(rpb.shape)}")
    return kernel_size, dilation


def available_backends(device: Union[str, torch.device] = "cpu", has_rpb: bool = True, needs_grad: bool = False) -> list[str]:
    """Backends that can run on ``device``, in the order ``na2d`` prefers them.

    CPU: ``tiled`` first (exact, fused SDPA tiles); NATTEN (no RPB) and flex run there only
    without autograd (torch has no CPU flex backward). CUDA: NATTEN's fused kernels when there
    is no RPB, flex with RPB, then ``tiled``. ``reference`` runs everywhere.
    """
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    natten_ok = not has_rpb and backends.natten_supports(device) and not (on_cpu and needs_grad)
    flex_ok = backends.flex_supports(device) and not (on_cpu and needs_grad)
    if on_cpu:
        found = ["tiled"] + ["natten"] * natten_ok + ["flex"] * flex_ok
    else:
        found = ["natten"] * natten_ok + ["flex"] * flex_ok + ["tiled"]
    return found + ["reference"]


def select_backend(device: Union[str, torch.device], has_rpb: bool, needs_grad: bool = False) -> str:
    """The backend ``na2d`` uses: forced by :func:`use_backend`, then ``$TIMM_NAT_ATTENTION_BACKEND``,
    else the first of :func:`available_backends`. A forced backend that cannot run raises."""
    forced = _forced_backend or os.environ.get(BACKEND_ENV_VAR) or None
    if forced is None:
        return available_backends(device, has_rpb, needs_grad)[0]
    if forced not in _BACKENDS:
        raise ValueError(f"unknown attention backend {forced!r} (from use_backend or ${BACKEND_ENV_VAR}); expected one of {_BACKENDS}")
    if forced == "natten" and has_rpb:
        raise ValueError("attention backend 'natten' has no relative positional bias; use 'flex', 'tiled' or 'reference'")
    if forced not in available_backends(device, has_rpb, needs_grad):
        need = " with autograd" if needs_grad else ""
        raise ValueError(f"attention backend {forced!r} cannot run on {torch.device(device)}{need}; "
                         f"available: {available_backends(device, has_rpb, needs_grad)}")
    return forced


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force the ``na2d`` backend inside a ``with`` block (``None`` restores automatic choice).

    Takes precedence over the ``TIMM_NAT_ATTENTION_BACKEND`` environment variable.
    """
    global _forced_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {_BACKENDS}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """2-D neighborhood attention, exactly as legacy NATTEN computed it, with autograd.

    Args:
        query, key, value: ``[batch, height, width, heads, head_dim]``, floating point.
        kernel_size: window size, int or ``(kh, kw)``, each >= 2.
        dilation: int or ``(dh, dw)``; ``height >= kh * dh`` and ``width >= kw * dw`` are required.
        rpb: optional relative positional bias ``[heads, 2*kh-1, 2*kw-1]`` added to the logits.
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``[batch, height, width, heads, head_dim]``, the dtype of ``query``.
    """
    kernel_size, dilation = _check_inputs(query, key, value, kernel_size, dilation, rpb)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, rpb))
    name = select_backend(query.device, rpb is not None, needs_grad)
    _log_once(name, query.device.type, rpb is not None)
    if name == "reference":
        return na2d_reference(query, key, value, kernel_size, dilation, rpb, scale)
    try:
        return backends.run(name, query, key, value, kernel_size, dilation, rpb, scale)
    except backends.Unsupported as error:
        if _forced_backend or os.environ.get(BACKEND_ENV_VAR):
            raise ValueError(f"attention backend {name!r} refused this input: {error}") from error
    # NATTEN has shape rules of its own (e.g. head_dim a power of two >= 8 on flex): next backend.
    name = available_backends(query.device, rpb is not None, needs_grad)[1]
    _log_once(name, query.device.type, rpb is not None, reason="NATTEN refused the input")
    return backends.run(name, query, key, value, kernel_size, dilation, rpb, scale)


def _log_once(name: str, device_type: str, has_rpb: bool, reason: str = "") -> None:
    if torch.compiler.is_compiling():  # logging would break a fullgraph trace; eager calls log
        return
    choice = (name, device_type, has_rpb, reason)
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        _logger.info("na2d: using the %r backend on %s (%s RPB)%s", name, device_type,
                     "with" if has_rpb else "no", f"; {reason}" if reason else "")
