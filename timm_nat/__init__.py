"""NAT and DiNAT as timm models, with exact relative-positional-bias neighborhood attention.

Importing ``timm_nat`` registers the models with timm (``timm.create_model('dinat_mini', ...)``).
"""
from .attention import BACKEND_ENV_VAR, available_backends, na2d, neighborhood_1d, select_backend, use_backend
from .layers import NeighborhoodAttention2d, NeighborhoodAttentionBlock
from . import models
from . import _fx  # noqa: F401  (attention layers become torch.fx leaves)
from .models import Nat

__all__ = [
    "na2d", "use_backend", "available_backends", "select_backend", "BACKEND_ENV_VAR", "neighborhood_1d",
    "NeighborhoodAttention2d", "NeighborhoodAttentionBlock", "Nat", "models",
]
