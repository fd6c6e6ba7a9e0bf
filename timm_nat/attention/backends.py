"""The backends of ``na2d``, each with a ``can_run`` check, and the one chooser over them.

Every backend says for itself whether it can run an input (device, RPB, autograd, empty
input); :func:`choose` takes the first one in the device's order of preference that can.
A backend may still refuse a particular shape when it runs (:class:`Unsupported`, e.g.
NATTEN's own head_dim rules); ``na2d`` then moves on to the next one that can run.
flex and NATTEN are imported lazily: they are heavy to import.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from . import graph_mode
from .reference import exact_where_nonfinite, na2d_reference

__all__ = ["Backend", "Unsupported", "BACKENDS", "preference", "choose"]

_logger = logging.getLogger(__name__)

QueryOrDevice = Union[torch.Tensor, torch.device]


class Unsupported(Exception):
    """A backend cannot run this particular input (shape, dtype) although it runs on the device."""


class Backend:
    """One way to compute ``na2d``. Subclasses set ``name`` and implement ``run`` and ``why_not``."""
    name = ""

    def why_not(self, query: QueryOrDevice, has_rpb: bool, needs_grad: bool) -> Optional[str]:
        """Why this backend cannot run ``query`` (a tensor, or only its device), or None if it can."""
        return None

    def can_run(self, query: QueryOrDevice, has_rpb: bool, needs_grad: bool) -> bool:
        """Whether this backend can run ``query`` (a tensor, or only its device)."""
        return self.why_not(query, has_rpb, needs_grad) is None

    def run(self, query, key, value, kernel_size, dilation, rpb, scale) -> torch.Tensor:
        """Arguments as :func:`timm_nat.attention.na2d`, validated and normalised."""
        raise NotImplementedError


def _device(query: QueryOrDevice) -> torch.device:
    return query.device if isinstance(query, torch.Tensor) else torch.device(query)


def _is_empty(query: QueryOrDevice) -> bool:
    return isinstance(query, torch.Tensor) and query.numel() == 0


class TiledBackend(Backend):
    """Query tiles against dense key halos, one fused SDPA call per chunk (:mod:`.tiled`)."""
    name = "tiled"

    def run(self, query, key, value, kernel_size, dilation, rpb, scale):
        from .tiled import na2d_tiled
        return na2d_tiled(query, key, value, kernel_size, dilation, rpb, scale)


class CpuFusedBackend(Backend):
    """The C++ kernel that reads only each query's window, forward and backward (:mod:`.cpu_fused`),
    compiled on first use; where it cannot be built, ``tiled`` takes over (one log line says why)."""
    name = "cpu_fused"

    def why_not(self, query, has_rpb, needs_grad):
        device = _device(query)
        if device.type != "cpu":
            return f"runs on cpu only, not {device}"
        if graph_mode.is_exporting():
            return "is a custom op that exported graphs (jit.trace, ONNX, torch.export) could not run elsewhere; 'tiled' can"
        if graph_mode.is_compiling() and graph_mode.OLD_DYNAMO:
            return "gives zero gradients under torch.compile before torch 2.15 (seen on 2.11)"
        from . import cpu_fused
        if isinstance(query, torch.Tensor) and query.dtype not in cpu_fused.SUPPORTED_DTYPES:
            return f"has no kernel for {query.dtype}"
        if not cpu_fused.is_available():
            return "could not be built here (see the log line from timm_nat.attention.cpu_fused)"
        return None

    def run(self, query, key, value, kernel_size, dilation, rpb, scale):
        from .cpu_fused import na2d_cpu_fused
        return na2d_cpu_fused(query, key, value, kernel_size, dilation, rpb, scale)


class ReferenceBackend(Backend):
    """Gather-based (:mod:`.reference`): runs everywhere, for tests."""
    name = "reference"

    def run(self, query, key, value, kernel_size, dilation, rpb, scale):
        return na2d_reference(query, key, value, kernel_size, dilation, rpb, scale)


def _fused_why_not(query: QueryOrDevice, needs_grad: bool, importable: bool, package: str) -> Optional[str]:
    """Rules flex and NATTEN share: CPU/CUDA only, no CPU backward, no empty inputs, no export."""
    if graph_mode.is_exporting():
        return "cannot be exported (torch.jit.trace, torch.onnx.export, torch.export); 'tiled' can"
    device = _device(query)
    if device.type not in ("cpu", "cuda"):
        return f"cannot run on {device}"
    if not importable:
        return f"needs {package}, which is not installed"
    if device.type == "cpu" and needs_grad:
        return "cannot run on cpu with autograd (torch has no CPU flex backward)"
    if _is_empty(query):  # compiled CPU flex dies on a zero-size launch; NATTEN divides by zero
        return f"cannot run an empty input (query shape {tuple(query.shape)})"
    return None


class FlexBackend(Backend):
    """``flex_attention`` with a neighbourhood block mask and an RPB ``score_mod`` (:mod:`.flex`).

    A compile or launch failure in an eager call (a Triton error, out of shared memory or
    registers for a shape) is :class:`Unsupported`: the automatic choice then moves on to the next
    backend (``tiled`` on CUDA) with one warning naming the shape and the error, and skips flex for
    that shape from then on; a forced ``flex`` raises. Not caught: failures inside a caller's
    ``torch.compile`` graph (they surface at the caller's compilation) and in the backward kernel,
    which torch compiles at the first ``backward()`` (after the forward has returned).
    """
    name = "flex"

    def __init__(self):
        self._failed: dict[tuple, str] = {}  # shape key -> the error flex gave for it

    def why_not(self, query, has_rpb, needs_grad):
        return _fused_why_not(query, needs_grad, flex_importable(), "torch.nn.attention.flex_attention")

    def run(self, query, key, value, kernel_size, dilation, rpb, scale):
        from .flex import na2d_flex
        if graph_mode.is_compiling():
            return na2d_flex(query, key, value, kernel_size, dilation, rpb, scale)
        shape = (tuple(query.shape), query.dtype, query.device.type, tuple(kernel_size), tuple(dilation),
                 rpb is not None, torch.is_grad_enabled())
        if shape in self._failed:
            raise Unsupported(self._failed[shape])
        try:
            return na2d_flex(query, key, value, kernel_size, dilation, rpb, scale)
        except (ValueError, TypeError):  # a caller's mistake, not a kernel failure
            raise
        except Exception as error:  # noqa: BLE001 (Triton, inductor and CUDA raise many types)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            reason = (f"flex failed for query {list(query.shape)} {str(query.dtype).removeprefix('torch.')}, "
                      f"kernel {tuple(kernel_size)}, dilation {tuple(dilation)}, "
                      f"{'with' if rpb is not None else 'no'} RPB: {type(error).__name__}: {first_line}")
            self._failed[shape] = reason
            _logger.warning("na2d: %s; falling back to the next backend for this shape", reason)
            raise Unsupported(reason) from error


class NattenBackend(Backend):
    """``natten.na2d`` (NATTEN >= 0.20): fused kernels on CUDA, unfused flex on CPU; no RPB."""
    name = "natten"

    def why_not(self, query, has_rpb, needs_grad):
        if has_rpb:
            return "has no relative positional bias; use 'flex', 'tiled' or 'reference'"
        return _fused_why_not(query, needs_grad, natten_importable(), "NATTEN (pip install 'timm-nat[natten]')")

    def run(self, query, key, value, kernel_size, dilation, rpb, scale):
        if query.device.type == "cpu":  # NATTEN's CPU path attends to dense blocks: see exact_where_nonfinite
            return exact_where_nonfinite(self._natten, query, key, value, kernel_size, dilation, rpb, scale)
        return self._natten(query, key, value, kernel_size, dilation, rpb, scale)

    @staticmethod
    def _natten(query, key, value, kernel_size, dilation, rpb, scale):
        import natten
        try:
            return natten.na2d(query, key, value, kernel_size=kernel_size, dilation=dilation, scale=scale)
        except NotImplementedError as error:
            raise Unsupported(f"natten.na2d has no kernel for head_dim={query.shape[-1]}, dtype={query.dtype} "
                              f"on {query.device}: {error}") from error


def natten_importable() -> bool:
    """Whether NATTEN is installed and importable (it is optional). A stand-in module registered in
    ``sys.modules`` without a file (a legacy-API shim) has no kernels and does not count."""
    try:
        import natten
    except ImportError:
        return False
    return getattr(natten, "__file__", None) is not None


def flex_importable() -> bool:
    """Whether this torch has ``flex_attention``."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (NattenBackend(), FlexBackend(), CpuFusedBackend(), TiledBackend(), ReferenceBackend())}

# Order of preference. CPU: the fused kernel (window only), then tiled (dense SDPA tiles), both far
# ahead of NATTEN's and flex's CPU paths. Elsewhere: NATTEN's fused kernels (no RPB), flex (RPB),
# then tiled. reference runs everywhere.
_PREFERENCE = {"cpu": ("cpu_fused", "tiled", "natten", "flex", "reference")}
_DEFAULT_PREFERENCE = ("natten", "flex", "tiled", "cpu_fused", "reference")


def preference(device: torch.device) -> tuple[str, ...]:
    """All backend names, in the order ``na2d`` prefers them on ``device``."""
    return _PREFERENCE.get(device.type, _DEFAULT_PREFERENCE)


def choose(query: QueryOrDevice, has_rpb: bool, needs_grad: bool, after: Optional[str] = None) -> str:
    """The first backend in the device's preference (after ``after``, if given) that can run."""
    order = preference(_device(query))
    if after is not None:
        order = order[order.index(after) + 1:]
    return next(name for name in order if BACKENDS[name].can_run(query, has_rpb, needs_grad))
