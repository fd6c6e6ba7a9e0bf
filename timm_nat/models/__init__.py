"""timm model families of timm-nat: one module each, its checkpoint layouts beside the model, ending in its
declaration (``FAMILY``, see :mod:`._family`). Importing this package imports every family module in it (a
new family is one new module), which registers them with timm, and re-exports each module's ``__all__``
(its classes and entrypoints: ``Nat``, ``NatIsotropic``, ``dinat_mini``, ...)."""
import importlib
import pkgutil

from ._family import ModelFamily, model_families

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith('_'):
        _module = importlib.import_module(f'{__name__}.{_info.name}')
        globals().update({name: getattr(_module, name) for name in _module.__all__})
