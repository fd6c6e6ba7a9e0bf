"""Dispatch to the fast backends (imported lazily: flex and NATTEN are heavy to import)."""
from __future__ import annotations

import torch


class Unsupported(Exception):
    """A backend cannot run this particular input (shape, dtype) although it runs on the device."""


def natten_supports(device: torch.device) -> bool:
    """NATTEN runs fused kernels on CUDA; on CPU (0.20+) it falls back to unfused flex."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return True


def flex_supports(device: torch.device) -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type in ("cpu", "cuda")


def run(name, query, key, value, kernel_size, dilation, rpb, scale):
    if name == "tiled":
        from .tiled import na2d_tiled
        return na2d_tiled(query, key, value, kernel_size, dilation, rpb, scale)
    if name == "flex":
        from .flex import na2d_flex
        return na2d_flex(query, key, value, kernel_size, dilation, rpb, scale)
    if name == "natten":
        import natten
        try:
            return natten.na2d(query, key, value, kernel_size=kernel_size, dilation=dilation, scale=scale)
        except NotImplementedError as error:
            raise Unsupported(f"natten.na2d has no kernel for head_dim={query.shape[-1]}, dtype={query.dtype} "
                              f"on {query.device}: {error}") from error
    raise ValueError(f"unknown attention backend {name!r}")
