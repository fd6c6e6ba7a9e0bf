"""``na2d``: 2-D neighborhood attention with optional relative positional bias (RPB).

Layout follows NATTEN: ``[batch, height, width, heads, head_dim]``. Semantics are legacy
NATTEN's (<= 0.17), which every published NAT/DiNAT checkpoint was trained with.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import numbers
import os
import warnings
from typing import Iterator, Optional, Union

import torch

from . import backends, graph_mode

__all__ = ["na2d", "use_backend", "available_backends", "select_backend", "BACKEND_ENV_VAR"]

_logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "TIMM_NAT_ATTENTION_BACKEND"
_BACKENDS = tuple(backends.BACKENDS)
_logged_choices: set = set()


class _Override:
    """One active ``use_backend`` block (compared by identity, so equal names stay distinct)."""
    __slots__ = ("name",)

    def __init__(self, name: Optional[str]):
        self.name = name


# Active use_backend blocks of this thread / asyncio task, innermost last. A tuple, never mutated:
# contexts copied for new tasks share it safely, and a block leaving out of order removes itself only.
_overrides: contextvars.ContextVar[tuple] = contextvars.ContextVar("timm_nat_attention_overrides", default=())

IntOrPair = Union[int, tuple[int, int]]


def _traced_value(value):
    """Under ``torch.jit.trace`` sizes taken from a shape are 0-dim int tensors: their traced values
    (the index plans are built for them; tiled's size guard fails a graph run at another size)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_traced_value(v) for v in value)
    return value


def int_pair(name: str, value: IntOrPair, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each ``>= minimum``) as an ``(h, w)`` pair of ints.

    Raises ``TypeError`` / ``ValueError`` naming ``name`` and the value (the operator, the
    layers at build time and the legacy API all check their window arguments with it).
    """
    if graph_mode.is_jit_tracing():
        value = _traced_value(value)
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if (isinstance(value, bool) or not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r} ({type(value).__name__})")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on each axis, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_scale(scale) -> None:
    """``scale`` is None or a real number (a Python or NumPy int/float, not a bool): a tensor is
    refused on every backend, as some would silently not differentiate it."""
    real = isinstance(scale, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(scale, bool)
    if scale is not None and not real:
        raise TypeError(f"scale must be None or a real number (int or float), got {scale!r} ({type(scale).__name__})")


def _check_inputs(query, key, value, kernel_size, dilation, rpb, scale):
    _check_scale(scale)
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
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if query.shape[-1] == 0:
        raise ValueError(f"head_dim must be >= 1, got query shape {tuple(query.shape)}")
    kernel_size = int_pair("kernel_size", kernel_size, 2)
    dilation = int_pair("dilation", dilation, 1)
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
        if not rpb.is_floating_point():
            raise TypeError(f"rpb must be a floating-point tensor, got dtype {rpb.dtype}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}; move it there (rpb.to(query.device))")
    return kernel_size, dilation


def available_backends(device: Union[str, torch.device] = "cpu", has_rpb: bool = True, needs_grad: bool = False) -> list[str]:
    """Backends that can run on ``device``, in the order ``na2d`` prefers them.

    CPU: ``cpu_fused`` first (the C++ kernel, where it could be built), then ``tiled`` (fused SDPA
    tiles); NATTEN (no RPB) and flex run there only without autograd (torch has no CPU flex
    backward). CUDA: NATTEN's fused kernels when there is no RPB, flex with RPB, then ``tiled``.
    ``reference`` runs everywhere.
    """
    return _runnable(torch.device(device), has_rpb, needs_grad)


def _runnable(query, has_rpb: bool, needs_grad: bool) -> list[str]:
    device = query.device if isinstance(query, torch.Tensor) else query
    return [name for name in backends.preference(device) if backends.BACKENDS[name].can_run(query, has_rpb, needs_grad)]


def _forced() -> tuple[Optional[str], str]:
    """``(name, source)`` of the backend forced by the innermost ``use_backend`` block, else by
    ``$TIMM_NAT_ATTENTION_BACKEND``; name None means automatic choice."""
    overrides = _overrides.get()
    if overrides:
        return overrides[-1].name, "use_backend"
    return os.environ.get(BACKEND_ENV_VAR) or None, f"${BACKEND_ENV_VAR}"


def _resolve(query, has_rpb: bool, needs_grad: bool, backend: Optional[str]) -> tuple[str, bool]:
    """``(backend name, whether it was forced)``; a forced backend that cannot run raises."""
    forced, source = (backend, "the backend argument") if backend is not None else _forced()
    if forced is None:
        return backends.choose(query, has_rpb, needs_grad), False
    if forced not in _BACKENDS:
        raise ValueError(f"unknown attention backend {forced!r} (from {source}); expected one of {_BACKENDS}")
    reason = backends.BACKENDS[forced].why_not(query, has_rpb, needs_grad)
    if reason is not None:
        raise ValueError(f"attention backend {forced!r} (from {source}) {reason}; "
                         f"available: {_runnable(query, has_rpb, needs_grad)}")
    return forced, True


def select_backend(device: Union[str, torch.device], has_rpb: bool, needs_grad: bool = False) -> str:
    """The backend ``na2d`` uses: forced by the innermost :func:`use_backend` block, else by
    ``$TIMM_NAT_ATTENTION_BACKEND``, else the first of :func:`available_backends`. A forced
    backend that cannot run raises. (``na2d(..., backend=...)`` beats all of these.)"""
    return _resolve(torch.device(device), has_rpb, needs_grad, None)[0]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force the ``na2d`` backend inside a ``with`` block, in this thread or asyncio task only.

    ``name`` is one of ``"natten"``, ``"flex"``, ``"cpu_fused"``, ``"tiled"``, ``"reference"``, or ``None`` for
    the automatic choice. Either way the block takes precedence over outer blocks and over the
    ``TIMM_NAT_ATTENTION_BACKEND`` environment variable; leaving it restores what was in force
    before, also when blocks are left out of order. New threads start with no block in force;
    asyncio tasks inherit the blocks active where they were created.
    """
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {_BACKENDS}")
    override = _Override(name)
    _overrides.set(_overrides.get() + (override,))
    try:
        yield
    finally:
        _overrides.set(tuple(o for o in _overrides.get() if o is not override))


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """2-D neighborhood attention, exactly as legacy NATTEN computed it, with autograd.

    Args:
        query, key, value: ``[batch, height, width, heads, head_dim]``, floating point, one
            device; batch and heads may be 0, head_dim not.
        kernel_size: window size, int or ``(kh, kw)``, each >= 2.
        dilation: int or ``(dh, dw)``; ``height >= kh * dh`` and ``width >= kw * dw`` are required.
        rpb: optional relative positional bias ``[heads, 2*kh-1, 2*kw-1]`` added to the logits,
            on query's device (any floating dtype; cast to query's).
        scale: logit scale, a real number (int or float; not a tensor, on every backend), default
            ``head_dim ** -0.5``.
        backend: force a backend for this call (beats :func:`use_backend` and the environment
            variable); None: as :func:`select_backend` decides.

    Returns:
        ``[batch, height, width, heads, head_dim]``, the dtype of ``query``. An output is NaN
        exactly where legacy NATTEN's is (its q, or a k/v in its window, is non-finite).
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch
        raise RuntimeError("na2d is not scriptable (torch.jit.script): use torch.jit.trace, torch.export, "
                           "torch.onnx.export or torch.compile")
    else:
        if graph_mode.is_jit_tracing():  # sizes read as constants here are intended: see tiled._traced_size_guard
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return _na2d(query, key, value, kernel_size, dilation, rpb, scale, backend)
        return _na2d(query, key, value, kernel_size, dilation, rpb, scale, backend)


def _na2d(query, key, value, kernel_size, dilation, rpb, scale, backend) -> torch.Tensor:
    kernel_size, dilation = _check_inputs(query, key, value, kernel_size, dilation, rpb, scale)
    if scale is None:
        scale = float(query.shape[-1]) ** -0.5
    has_rpb = rpb is not None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, rpb))
    name, forced = _resolve(query, has_rpb, needs_grad, backend)
    _log_once(name, query.device.type, has_rpb)
    while True:
        try:
            return backends.BACKENDS[name].run(query, key, value, kernel_size, dilation, rpb, scale)
        except backends.Unsupported as error:
            if forced:
                raise ValueError(f"attention backend {name!r} refused this input: {error}") from error
            # e.g. NATTEN's own shape rules (head_dim a power of two >= 8 on flex): next that can run
            refused, name = name, backends.choose(query, has_rpb, needs_grad, after=name)
            _log_once(name, query.device.type, has_rpb, reason=f"{refused!r} refused the input")


def _log_once(name: str, device_type: str, has_rpb: bool, reason: str = "") -> None:
    if graph_mode.is_compiling():  # logging would break a fullgraph trace; eager calls log
        return
    choice = (name, device_type, has_rpb, reason)
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        _logger.info("na2d: using the %r backend on %s (%s RPB)%s", name, device_type,
                     "with" if has_rpb else "no", f"; {reason}" if reason else "")
