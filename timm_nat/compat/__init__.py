"""Legacy NATTEN (<= 0.17) API on timm-nat's exact operator, and attention maps of timm-nat models."""
from .functional import (
    na1d_av, na1d_qk, na2d_av, na2d_qk, natten1dav, natten1dqk, natten1dqkrpb, natten2dav, natten2dqk, natten2dqkrpb)

__all__ = [
    "natten2dqkrpb", "natten2dqk", "natten2dav", "natten1dqkrpb", "natten1dqk", "natten1dav",
    "na2d_qk", "na2d_av", "na1d_qk", "na1d_av",
]
