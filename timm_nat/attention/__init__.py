"""Neighborhood attention operator (apart from the models): ``na2d`` and its backends."""
from .functional import BACKEND_ENV_VAR, available_backends, na2d, select_backend, use_backend
from .windows import neighborhood_1d

__all__ = ["na2d", "use_backend", "available_backends", "select_backend", "BACKEND_ENV_VAR", "neighborhood_1d"]
