"""Attention maps (per-query neighbourhood weights) of timm-nat models, computed exactly.

The models run the fused ``na2d``, which never materialises attention weights. Forward hooks
on every attention module recompute them from the module's input on the unfused legacy path
(``softmax(q * scale . k + rpb)`` over each query's window, :mod:`.attention.unfused`), so nothing in the models changes
and any forward (``model(x)``, ``forward_features``, ``forward_intermediates``, a
``features_only`` backbone) can be recorded.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn

from .attention.unfused import window_logits
from .layers import NeighborhoodAttention2d, RelPosGlobalAttention, pad_to_window

__all__ = ["attention_maps", "record_attention_maps", "neighborhood_weights", "global_weights"]


def _heads_first_qk(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's scaled query and key, [batch, heads, H, W, head_dim], from its NHWC input."""
    batch, height, width, _ = x.shape
    q, k, _ = module.qkv(x).reshape(batch, height, width, 3, module.num_heads, module.head_dim).permute(3, 0, 4, 1, 2, 5)
    return q * module.scale, k


def neighborhood_weights(module: NeighborhoodAttention2d, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """Attention weights of a :class:`~timm_nat.layers.NeighborhoodAttention2d` for its NHWC input ``x``.

    Returns ``[batch, heads, H, W, kh*kw]``: for each query its neighbours' weights in row-major
    window order (window positions from :func:`timm_nat.attention.neighborhood_1d`). Maps smaller
    than the module's ``window_size`` are padded as the module pads them; the rows of the padded
    queries are dropped, the windows of the kept queries may include padded keys.
    With ``logits=True``, the pre-softmax logits ``q * scale . k + rpb`` instead.
    """
    height, width = x.shape[1:3]
    q, k = _heads_first_qk(module, pad_to_window(x, module.window_size))
    scores = window_logits(q, k, module.rpb, module.kernel_size, module.dilation)[:, :, :height, :width]
    return scores if logits else scores.softmax(dim=-1)


def global_weights(module: nn.Module, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """Attention weights of ViT-RPB's global attention (``RelPosGlobalAttention``): ``[batch, heads, H, W, H*W]``,
    keys in row-major order. Global attention is neighbourhood attention with the whole map as window."""
    height, width = x.shape[1:3]
    q, k = _heads_first_qk(module, x)
    scores = window_logits(q, k, module.rel_pos_bias_table((height, width)), (height, width), (1, 1))
    return scores if logits else scores.softmax(dim=-1)


def _attention_kinds() -> dict:
    return {NeighborhoodAttention2d: neighborhood_weights, RelPosGlobalAttention: global_weights}


@contextlib.contextmanager
def record_attention_maps(model: nn.Module, logits: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention weights of every attention module during forwards inside the block.

    Yields a dict filled as the model runs: module name (as in ``model.named_modules()``) ->
    weights of its latest call, ``[batch, heads, H, W, kh*kw]`` for neighbourhood attention
    (:func:`neighborhood_weights`), ``[batch, heads, H, W, H*W]`` for ViT-RPB's global attention.
    The weights carry autograd when the forward does. ``logits=True`` records pre-softmax logits.

    Example::

        with record_attention_maps(model) as maps:
            model.forward_features(images)
        weights = maps["stages.0.blocks.0.attn"]
    """
    kinds = _attention_kinds()
    maps: dict[str, torch.Tensor] = {}

    def hook(name, compute, module, args, output):
        maps[name] = compute(module, args[0], logits=logits)

    handles = []
    for name, module in model.named_modules():
        compute = next((fn for kind, fn in kinds.items() if isinstance(module, kind)), None)
        if compute is not None:
            handles.append(module.register_forward_hook(functools.partial(hook, name, compute)))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no NeighborhoodAttention2d or RelPosGlobalAttention module")
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: nn.Module, x: torch.Tensor, logits: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` and return the attention weights of every attention module, by module name.

    See :func:`record_attention_maps` (which records any other forward too) for shapes.
    """
    with record_attention_maps(model, logits=logits) as maps:
        model(x)
    return maps
