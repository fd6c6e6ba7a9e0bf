"""Fused CPU neighborhood attention with RPB and dilation: a C++ kernel compiled on first use.

Each query reads only its ``kh*kw`` window (no key halos, no gathers): logits vectorised over
head_dim, softmax over the window, output accumulated in place, parallel over (batch, row).
The backward recomputes probabilities from the saved logsumexp; dk and dv are gathered per key
over the queries whose windows hold it (deterministic, no atomics). Source:
``csrc/na2d_cpu.cpp``; semantics are legacy NATTEN's (see :mod:`.windows`).

The extension is built with ``torch.utils.cpp_extension.load`` the first time it is needed and
cached (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), for the vector ISA torch
itself dispatches to on this CPU (``torch.backends.cpu.get_cpu_capability()``), so the package
installs without a compiler. Where it cannot be built, :func:`is_available` is False (logged
once) and ``tiled`` stays the CPU backend. Computation is in float32 (float64 for float64
inputs); bf16/fp16 inputs are widened on the way in and the result rounded once on the way out.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import re
import shutil
import threading
import time
from typing import Optional

import torch

__all__ = ["is_available", "can_run", "na2d_cpu_fused", "build_seconds"]

_logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "na2d_cpu.cpp")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The ISA flags torch compiles its own kernels of each capability with (ATen/cpu/vec needs the
# CPU_CAPABILITY macros to pick its 512- or 256-bit Vectorized).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_build_seconds: Optional[float] = None


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    return capability if capability in _ISA_FLAGS else "DEFAULT"


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Build (or load the cached build of) the extension; None on success, else why not."""
    global _build_seconds
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH)"
    capability = _capability()
    flags = ["-O3", f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY_{capability}"] + _ISA_FLAGS[capability]
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load
        # one build per torch version too: an extension built against other torch headers must not be reused
        torch_tag = re.sub(r"\W", "_", torch.__version__)
        load(name=f"timm_nat_na2d_cpu_{capability.lower()}_torch_{torch_tag}", sources=[_SOURCE], extra_cflags=flags,
             is_python_module=False, verbose=False)
    except Exception as error:  # compiler errors, missing headers, ninja: all mean "use tiled"
        lines = str(error).strip().splitlines() or ["?"]
        first_error = next((line for line in lines if "error:" in line), lines[-1])
        return f"building {os.path.basename(_SOURCE)} failed: {first_error.strip()[:300]}"
    _build_seconds = time.perf_counter() - start
    _register_fake_kernels()
    return None


def _register_fake_kernels() -> None:
    """Shapes for tracing (torch.compile, meta tensors): the ops are opaque to inductor."""
    @torch.library.register_fake("timm_nat_na2d::forward")
    def _forward_fake(query, key, value, rpb, kernel_size, dilation, scale):
        return query.new_empty(query.shape), query.new_empty(query.shape[:4])

    @torch.library.register_fake("timm_nat_na2d::backward")
    def _backward_fake(grad_out, query, key, value, out, lse, rpb, kernel_size, dilation, scale, rpb_grad):
        drpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else query.new_empty(0)
        return query.new_empty(query.shape), query.new_empty(query.shape), query.new_empty(query.shape), drpb


_availability: Optional[bool] = None
_availability_lock = threading.Lock()  # two threads' first calls build once


@torch.compiler.assume_constant_result  # a trace (torch.compile) runs it eagerly and keeps the answer
def is_available() -> bool:
    """Whether the fused kernel runs here: builds or loads it once; logs once why not."""
    global _availability
    if _availability is None:
        with _availability_lock:
            if _availability is None:
                reason = _load()
                if reason is not None:
                    _logger.warning("na2d: fused CPU kernel unavailable (%s); the 'tiled' backend is used instead", reason)
                _availability = reason is None
    return _availability


def build_seconds() -> Optional[float]:
    """Wall time the first :func:`is_available` spent building or loading the extension (None before)."""
    return _build_seconds


def can_run(query: torch.Tensor, has_rpb: bool, needs_grad: bool) -> bool:
    """Whether :func:`na2d_cpu_fused` runs on ``query`` (CPU, a float dtype; RPB and autograd are
    both supported, so ``has_rpb`` and ``needs_grad`` do not restrict it)."""
    return query.device.type == "cpu" and query.dtype in SUPPORTED_DTYPES and is_available()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FusedNA2D(torch.autograd.Function):
    """Autograd for the fused kernel: saves the inputs, the (compute dtype) output and the logsumexp."""

    @staticmethod
    def forward(ctx, query, key, value, rpb, kernel_size, dilation, scale):
        compute = _compute_dtype(query.dtype)
        q, k, v = (t.to(compute) for t in (query, key, value))
        table = rpb.to(compute) if rpb is not None else None
        out, lse = torch.ops.timm_nat_na2d.forward(q, k, v, table, list(kernel_size), list(dilation), float(scale))
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.config = (list(kernel_size), list(dilation), float(scale), query.dtype, None if rpb is None else rpb.dtype)
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        kernel_size, dilation, scale, dtype, rpb_dtype = ctx.config
        rpb_grad = table is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drpb = torch.ops.timm_nat_na2d.backward(
            grad_out.to(q.dtype), q, k, v, out, lse, table, kernel_size, dilation, scale, rpb_grad)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), drpb.to(rpb_dtype) if rpb_grad else None, None, None, None


def na2d_cpu_fused(query, key, value, kernel_size, dilation, rpb, scale):
    """Exact neighborhood attention with RPB by the fused CPU kernel, with autograd.

    Arguments as :func:`timm_nat.attention.na2d`, validated (kernel_size and dilation pairs,
    ``scale`` a float); layout ``[batch, height, width, heads, head_dim]``. Call only where
    :func:`can_run` is True.
    """
    if not is_available():
        raise RuntimeError(f"the fused CPU na2d kernel is unavailable: {_load()}")
    return _FusedNA2D.apply(query, key, value, rpb, tuple(kernel_size), tuple(dilation), scale)
