"""NAT and DiNAT as timm models, with exact relative-positional-bias neighborhood attention.

Importing ``timm_nat`` registers the models with timm (``timm.create_model('dinat_mini', ...)``).
Public API: the operator (``na2d``, ``use_backend``, ``available_backends``, ``BACKEND_ENV_VAR``),
the layers (``NeighborhoodAttention2d``, ``RelPosGlobalAttention``, ``NeighborhoodAttentionBlock``)
and the model classes (``Nat``, ``NatIsotropic``); ``timm_nat.models`` holds the families.
"""
from .attention import BACKEND_ENV_VAR, available_backends, na2d, use_backend
from .layers import NeighborhoodAttention2d, NeighborhoodAttentionBlock, RelPosGlobalAttention
from . import models
from . import _fx  # noqa: F401  (attention layers become torch.fx leaves)
from .models import Nat, NatIsotropic

__all__ = [
    "na2d", "use_backend", "available_backends", "BACKEND_ENV_VAR",
    "NeighborhoodAttention2d", "RelPosGlobalAttention", "NeighborhoodAttentionBlock", "Nat", "NatIsotropic",
    "models",
]
