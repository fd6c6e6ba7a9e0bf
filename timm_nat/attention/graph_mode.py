"""What mode torch is in, the one place the operator and its backends ask: eager, or recording a
graph (and by which recorder), and the torch-version gates.

Recorders: ``torch.compile`` (dynamo; ``torch.export`` runs through it too), ``torch.export``,
``torch.jit.trace`` and the TorchScript ONNX exporter; below them, the dispatch modes (fake,
proxy, functional tensors) of ``torch.export`` and ``make_fx``. A graph that is *exported* runs
elsewhere (another process, ONNX Runtime), so it may not hold custom ops or eager-only branches.

``torch.fx`` symbolic tracing never reaches the operator: :mod:`timm_nat.layers` registers ``na2d``
(and its padding) with ``torch.fx.wrap``, so every fx tracer (timm's, torchvision's
``create_feature_extractor``, plain ``symbolic_trace``) records the attention call as one node.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["TORCH_VERSION", "OLD_DYNAMO", "is_compiling", "is_torch_exporting", "is_jit_tracing",
           "is_recording", "is_exporting", "dispatch_recording", "outside_recording"]

TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)  # compares with tuples, rc tags included

# torch.compile before 2.15 (seen on 2.11): dynamo keeps one ``assume_constant_result`` constant
# per function name in a graph (a second asserts "already in seen_sources"), and gives zero
# gradients through the fused CPU kernel's custom op. ``tiled`` and ``cpu_fused`` step aside there.
OLD_DYNAMO = TORCH_VERSION < (2, 15)


def is_compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compile``, and ``torch.export`` through it)."""
    return torch.compiler.is_compiling()


def is_torch_exporting() -> bool:
    """Whether ``torch.export`` is tracing this call."""
    return torch.compiler.is_exporting()


def is_jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` (or the TorchScript ONNX exporter, which uses it) records this call."""
    return torch.jit.is_tracing()


def is_exporting() -> bool:
    """Whether the graph being recorded runs elsewhere: ``torch.jit.trace``, ONNX export, ``torch.export``."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def is_recording() -> bool:
    """Whether this call is recorded into a graph (any recorder above) rather than run eagerly:
    no data-dependent branch, no batch-dependent loop count."""
    return is_compiling() or is_exporting()


def dispatch_recording() -> bool:
    """Whether a dispatch mode (fake, proxy, functional) or the jit tracer is active: tensors made
    now would be fake or recorded, not real."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._ops._len_torch_dispatch_stack_pre_dispatch()
                or torch._C._get_tracing_state() is not None)


@contextlib.contextmanager
def outside_recording() -> Iterator[None]:
    """Run eagerly on real tensors whatever records the caller: no fake / proxy / functional
    dispatch modes (torch.export, make_fx), no jit tracer, inference mode off."""
    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.utils._python_dispatch._disable_current_modes(), torch.inference_mode(False):
            yield
    finally:
        torch._C._set_tracing_state(tracing_state)
