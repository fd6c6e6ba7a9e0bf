"""``install()``: make ``from natten.functional import natten2dqkrpb`` (and friends) work again."""
from __future__ import annotations

import logging
import re
import sys
import types

from . import functional
from .modules import NeighborhoodAttention2D

__all__ = ["install", "LEGACY_FUNCTIONAL_NAMES", "FIRST_NEW_NATTEN"]

_logger = logging.getLogger(__name__)

# Unfused ops NATTEN 0.20 removed: natten{1,2}d* (last in 0.17.4) and na{1,2}d_{qk,av} (0.15-0.17).
LEGACY_FUNCTIONAL_NAMES = (
    "natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav",
    "na1d_qk", "na1d_av", "na2d_qk", "na2d_av",
)
FIRST_NEW_NATTEN = (0, 20)  # the first release without the unfused ops and CPU kernels
SHIM_VERSION = "0.17.4+timm_nat"


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read NATTEN's version {version!r}")
    return int(match.group(1)), int(match.group(2))


def _shim_na2d(*args, **kwargs):
    raise NotImplementedError("NATTEN is not installed: timm_nat.compat's 'natten' shim has no fused kernels")


def _make_shim() -> types.ModuleType:
    """A minimal ``natten`` package: ``natten.functional`` with the legacy ops, ``NeighborhoodAttention2D``."""
    package = types.ModuleType("natten", "timm_nat.compat stand-in for legacy NATTEN (no NATTEN installed)")
    package.__path__ = []  # a package, so that ``import natten.functional`` resolves the submodule
    package.__version__ = SHIM_VERSION
    package.__timm_nat_shim__ = True
    package.NeighborhoodAttention2D = NeighborhoodAttention2D
    # timm_nat's NATTEN backend calls natten.na2d: refusing (NotImplementedError) makes it fall back.
    package.na2d = _shim_na2d
    module = types.ModuleType("natten.functional", "timm_nat.compat: legacy NATTEN unfused ops")
    for name in LEGACY_FUNCTIONAL_NAMES:
        setattr(module, name, getattr(functional, name))
    package.functional = module
    return package


def install(replace_module: bool = False) -> str:
    """Make code written for NATTEN <= 0.17 import its removed names from ``natten`` and run on timm-nat.

    Opt-in, idempotent, never shadows anything that works:

    * NATTEN older than 0.20 is installed: nothing changes (its own ops run); returns ``"natten"``.
    * NATTEN 0.20 or newer: the removed names (``natten2dqkrpb``, ``natten2dqk``, ``natten2dav``,
      their 1-D forms, ``na2d_qk``/``na2d_av``, ...) are added to the real ``natten.functional``;
      names it has are left alone. Returns ``"patched"``.
    * No NATTEN: a minimal ``natten`` package is registered in ``sys.modules`` with
      ``natten.functional`` (those names) and ``natten.NeighborhoodAttention2D`` (the legacy
      module, :class:`timm_nat.compat.NeighborhoodAttention2D`). Returns ``"shim"``.

    Args:
        replace_module: With NATTEN >= 0.20 also replace ``natten.NeighborhoodAttention2D`` (whose
            0.20+ form has no RPB and other arguments) by the legacy module, for code such as the
            original NAT repository's ``from natten import NeighborhoodAttention2D``.
    """
    current = sys.modules.get("natten")
    if current is not None and getattr(current, "__timm_nat_shim__", False):
        return "shim"
    try:
        import natten
    except ImportError:
        sys.modules["natten"] = package = _make_shim()
        sys.modules["natten.functional"] = package.functional
        _logger.info("NATTEN is not installed: registered timm_nat.compat's legacy 'natten' shim")
        return "shim"

    version = getattr(natten, "__version__", "0.0")
    if _version_tuple(version) < FIRST_NEW_NATTEN:
        _logger.info("NATTEN %s still has the legacy ops: timm_nat.compat.install() changes nothing", version)
        return "natten"
    import natten.functional as natten_functional
    added = [name for name in LEGACY_FUNCTIONAL_NAMES if not hasattr(natten_functional, name)]
    for name in added:
        setattr(natten_functional, name, getattr(functional, name))
    if replace_module and natten.NeighborhoodAttention2D is not NeighborhoodAttention2D:
        natten.NeighborhoodAttention2D = NeighborhoodAttention2D
        _logger.warning("NATTEN %s: natten.NeighborhoodAttention2D replaced by timm_nat.compat's legacy module "
                        "(install(replace_module=True))", version)
    if added:
        _logger.info("NATTEN %s: added timm_nat.compat's %s", version, ", ".join(added))
    return "patched"
