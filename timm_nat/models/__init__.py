"""timm model families of timm-nat: one module each, its checkpoint layouts beside the model, ending in its
declaration (``FAMILY``, see :mod:`._family`). Importing this package imports every family module in it (a
new family is one new module) and so registers them with timm."""
import importlib
import pkgutil

from ._family import ModelFamily, model_families

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_module.name}')

from .isotropic import NatIsotropic, RelPosGlobalAttention  # noqa: E402
from .nat import Nat, checkpoint_filter_fn  # noqa: E402
from .dinat_s import swin_patch_stem  # noqa: E402
