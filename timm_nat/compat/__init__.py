"""Legacy NATTEN (<= 0.17) API on timm-nat's exact operator.

Migration: ``from timm_nat.compat import natten2dqkrpb, natten2dav`` in place of
``from natten.functional import natten2dqkrpb, natten2dav`` (same arguments, layouts and
results), or call :func:`install` once so that the old imports resolve here.

The attention maps of timm-nat's own models live in :mod:`timm_nat.attention_maps` (re-exported
here, where they used to be).
"""
from ._shim import install
from .functional import (
    na1d_av, na1d_qk, na2d_av, na2d_qk, natten1dav, natten1dqk, natten1dqkrpb, natten2dav, natten2dqk, natten2dqkrpb)
from ..attention_maps import attention_maps, global_weights, neighborhood_weights, record_attention_maps
from .modules import NeighborhoodAttention2D

__all__ = [
    "natten2dqkrpb", "natten2dqk", "natten2dav", "natten1dqkrpb", "natten1dqk", "natten1dav",
    "na2d_qk", "na2d_av", "na1d_qk", "na1d_av", "NeighborhoodAttention2D", "install",
    "attention_maps", "record_attention_maps", "neighborhood_weights", "global_weights",
]
