"""Fused CPU neighborhood attention with RPB and dilation: a C++ kernel compiled on first use.

Each query reads only its ``kh*kw`` window (no key halos, no gathers): logits vectorised over
head_dim, softmax over the window, output accumulated in place, parallel over (batch, row).
The backward recomputes probabilities from the saved logsumexp; dk and dv are gathered per key
over the queries whose windows hold it (deterministic, no atomics). Source:
``csrc/na2d_cpu.cpp``; semantics are legacy NATTEN's (see :mod:`.windows`).

The extension is built with ``torch.utils.cpp_extension.load`` the first time it is needed, for
the vector ISA torch itself dispatches to on this CPU (``torch.backends.cpu.get_cpu_capability()``),
so the package installs without a compiler. The build directory under ``$TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``) is named by a hash of the source, the flags, the compiler
and torch: each kernel source builds once per torch (one WARNING line says so) and is then loaded
directly, also from a read-only directory. Where it cannot be built or loaded, :func:`is_available`
is False (logged once) and ``tiled`` stays the CPU backend. bf16/fp16 q, k, v (and gradients) are
read and written in their own dtype and computed in float32 (float64 for float64 inputs): each
output element is rounded once; the logsumexp is kept in the compute dtype, and rpb may be
float32 (an autocast model's parameter) or the inputs' dtype. Second-order gradients (``create_graph=True``) are exact: that backward recomputes with the
differentiable gather reference (:func:`.reference.na2d_reference`), which needs
``O(tokens * kh * kw * head_dim)`` memory.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from typing import Optional, Sequence

import torch

from .reference import na2d_reference

__all__ = ["is_available", "na2d_cpu_fused", "build_seconds"]

_logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "na2d_cpu.cpp")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The ISA flags torch compiles its own kernels of each capability with (ATen/cpu/vec needs the
# CPU_CAPABILITY macros to pick its 512- or 256-bit Vectorized).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
# The op schemas, defined here once: the C++ source only implements them (the dispatcher checks
# its signatures against these), and the fake kernels below follow them.
_SCHEMAS = (
    "forward(Tensor query, Tensor key, Tensor value, Tensor? rpb, int[] kernel_size, int[] dilation, float scale) "
    "-> (Tensor, Tensor)",
    "backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor lse, Tensor? rpb, "
    "int[] kernel_size, int[] dilation, float scale, bool rpb_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)
_library: Optional[torch.library.Library] = None  # kept alive: dropping it would remove the ops
_build_seconds: Optional[float] = None


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def _flags(capability: str) -> list[str]:
    flags = ["-O3", f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY_{capability}"] + _ISA_FLAGS[capability]
    if platform.system() == "Linux" and torch.backends.openmp.is_available():
        # at::parallel_for is OpenMP inline in ATen's headers: without -fopenmp it runs serially. Only
        # compiled with it, not linked: the GOMP symbols resolve to the runtime torch already loaded
        # (through libtorch_cpu), so the kernel shares torch's thread pool and its set_num_threads.
        flags.append("-fopenmp")
    return flags


def _extension_name(source: bytes, flags: Sequence[str], compiler: str) -> str:
    """The build's name: a hash of everything the binary depends on, so that one build is never
    loaded for another source, flag set, compiler or torch (and equal ones share it)."""
    digest = hashlib.sha256(source)
    for part in (*flags, compiler, torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag):
        digest.update(b"\0" + str(part).encode())
    return f"timm_nat_na2d_cpu_{digest.hexdigest()[:16]}"


def _build_root() -> str:
    """Where torch's JIT builds extensions (``$TORCH_EXTENSIONS_DIR``, else torch's per-user cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "torch_extensions")


class _DropNoCudaRuntime(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...``, logged when
    ``torch.utils.cpp_extension`` is imported on a machine with a CUDA toolkit but no GPU: our
    CPU build does not use CUDA, so the line only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _no_cuda_runtime_warning():
    extension_logger = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropNoCudaRuntime()
    extension_logger.addFilter(drop)
    try:
        yield
    finally:
        extension_logger.removeFilter(drop)


def _define_library() -> None:
    """Define the ops (once per process) and their fake kernels (shapes for torch.compile and meta
    tensors: the ops are opaque to inductor). The C++ extension registers the CPU implementations."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("timm_nat_na2d", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)

    @torch.library.register_fake("timm_nat_na2d::forward", lib=library)
    def _forward_fake(query, key, value, rpb, kernel_size, dilation, scale):
        return query.new_empty(query.shape), query.new_empty(query.shape[:4], dtype=_compute_dtype(query.dtype))

    @torch.library.register_fake("timm_nat_na2d::backward", lib=library)
    def _backward_fake(grad_out, query, key, value, lse, rpb, kernel_size, dilation, scale, rpb_grad):
        drpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else query.new_empty(0)
        return query.new_empty(query.shape), query.new_empty(query.shape), query.new_empty(query.shape), drpb

    _library = library


def _load_library(directory: str, name: str, flags: list[str]) -> None:
    """Load the build in ``directory``, building it first if it is not there. A finished build is
    loaded directly (no ninja run, no write): from a read-only cache too, and whichever checkout's
    path its build file names."""
    library_path = os.path.join(directory, f"{name}.so")
    if os.path.exists(library_path) and not os.access(directory, os.W_OK):
        torch.ops.load_library(library_path)
        return
    os.makedirs(directory, exist_ok=True)
    from filelock import FileLock  # a torch dependency
    # Our own lock file: torch < 2.15 builds under a baton that waits for a file named "lock" to
    # disappear, and filelock leaves its file behind (a shared name deadlocked the first build).
    with FileLock(os.path.join(directory, "timm_nat.lock")):  # a concurrent first build finishes before we look
        if os.path.exists(library_path):
            torch.ops.load_library(library_path)
            return
    _logger.warning("building the fused CPU attention kernel (about 20 s, once per torch version and kernel "
                    "source); cached in %s", directory)
    with _no_cuda_runtime_warning():
        from torch.utils.cpp_extension import load
    load(name=name, sources=[_SOURCE], extra_cflags=flags, build_directory=directory, is_python_module=False,
         verbose=False)


def _smoke_test() -> None:
    """One tiny call: raises unless the loaded library implements the ops on CPU."""
    ones = torch.ones(1, 2, 2, 1, 1)
    torch.ops.timm_nat_na2d.forward(ones, ones, ones, None, [2, 2], [1, 1], 1.0)


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Build (or load the cached build of) the extension; None on success, else why not."""
    global _build_seconds
    command = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]  # e.g. CXX="ccache g++"
    if shutil.which(command[0]) is None:
        return f"no C++ compiler ({command[0]!r} not on PATH)"
    flags = _flags(_capability())
    with open(_SOURCE, "rb") as source:
        name = _extension_name(source.read(), flags, " ".join(command))
    directory = os.path.join(_build_root(), name)
    start = time.perf_counter()
    try:  # anything failing here (compiler, headers, ninja, a foreign or broken build) means "use tiled"
        _define_library()
        _load_library(directory, name, flags)
        _smoke_test()
    except Exception as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        first_error = next((line for line in lines if "error:" in line), lines[-1])
        return f"building or loading {os.path.basename(_SOURCE)} failed: {first_error.strip()[:300]}"
    _build_seconds = time.perf_counter() - start
    return None


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_table(rpb: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """rpb as the kernel takes it: float32 or the query's dtype as it is (no copy: under autocast
    the parameter stays float32), any other dtype cast to the compute dtype (a small table)."""
    if rpb is None or rpb.dtype in (torch.float32, dtype):
        return rpb
    return rpb.to(_compute_dtype(dtype))


class _FusedNA2D(torch.autograd.Function):
    """Autograd for the fused kernel: saves the inputs and the (compute dtype) logsumexp; q, k, v,
    the output and the gradients stay in the inputs' dtype (no widened copies).

    The backward is the fused kernel; under ``create_graph=True`` (grad mode on in backward) it is
    recomputed with differentiable formulas instead, so that second-order gradients are exact.
    """

    @staticmethod
    def forward(ctx, query, key, value, rpb, kernel_size, dilation, scale):
        out, lse = torch.ops.timm_nat_na2d.forward(query, key, value, _bias_table(rpb, query.dtype),
                                                   list(kernel_size), list(dilation), float(scale))
        ctx.save_for_backward(query, key, value, rpb, lse)
        ctx.config = (list(kernel_size), list(dilation), float(scale))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, rpb, lse = ctx.saved_tensors
        kernel_size, dilation, scale = ctx.config
        if torch.is_grad_enabled():
            return (*_differentiable_grads(ctx, grad_out, query, key, value, rpb), None, None, None)
        rpb_grad = rpb is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drpb = torch.ops.timm_nat_na2d.backward(
            grad_out.to(query.dtype), query, key, value, lse, _bias_table(rpb, query.dtype), kernel_size, dilation,
            scale, rpb_grad)
        return dq, dk, dv, drpb.to(rpb.dtype) if rpb_grad else None, None, None, None


def _differentiable_grads(ctx, grad_out, query, key, value, rpb) -> list[Optional[torch.Tensor]]:
    """The gradients of q, k, v, rpb as a differentiable function of the inputs and ``grad_out``
    (the backward under ``create_graph=True``): the gather reference's vector-Jacobian product."""
    kernel_size, dilation, scale = ctx.config
    inputs = (query, key, value, rpb)
    wanted = [i for i, needed in enumerate(ctx.needs_input_grad[:4]) if needed]
    compute = _compute_dtype(query.dtype)
    with torch.enable_grad():
        out = na2d_reference(*(t.to(compute) for t in inputs[:3]), kernel_size, dilation, rpb, scale)
        found = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out.to(compute), create_graph=True,
                                    allow_unused=True)
    grads: list[Optional[torch.Tensor]] = [None] * 4
    for i, grad in zip(wanted, found):
        grads[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return grads


def na2d_cpu_fused(query, key, value, kernel_size, dilation, rpb, scale):
    """Exact neighborhood attention with RPB by the fused CPU kernel, with autograd (second order too).

    Arguments as :func:`timm_nat.attention.na2d`, validated (kernel_size and dilation pairs,
    ``scale`` a real number); layout ``[batch, height, width, heads, head_dim]``. ``na2d`` calls
    it where its ``cpu_fused`` backend can run.
    """
    if not is_available():
        raise RuntimeError(f"the fused CPU na2d kernel is unavailable: {_load()}")
    return _FusedNA2D.apply(query, key, value, rpb, tuple(kernel_size), tuple(dilation), scale)
