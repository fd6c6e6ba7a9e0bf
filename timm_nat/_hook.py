"""Import hook that registers timm-nat's models in programs that import only timm.

Installed as the top-level module ``_timm_nat_hook`` and started by ``timm_nat.pth`` in
site-packages (Python runs ``.pth`` import lines at start-up). Start-up cost is one tiny
module and one entry on ``sys.meta_path``: nothing is imported until the program itself
imports ``timm``; right after timm finishes loading, ``timm_nat`` is imported so that its
``@register_model`` functions run, and the hook removes itself.

Probes are harmless: ``importlib.util.find_spec("timm")`` (how transformers and others check
that timm is available) gets a spec whose loader would register on use, and the hook stays in
place until timm is really loaded.

Off switch: ``TIMM_NAT_AUTOREGISTER=0`` (then ``import timm_nat`` registers explicitly).
"""
import os
import sys
import threading

ENV_VAR = "TIMM_NAT_AUTOREGISTER"


class _RegisterAfterTimm:
    """Meta-path finder that only watches for the top-level ``timm`` import."""

    def __init__(self):
        self._searching = threading.local()  # our own look-up of timm must not come back here

    def find_spec(self, name, path=None, target=None):
        """Spec of ``timm`` as the other finders give it, its loader set to register after loading."""
        if name != "timm" or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = self._spec_from_other_finders(name, path, target)
        except Exception:  # never break `import timm`: let the import system look it up itself
            return None
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        self._register_after_loading(spec.loader)
        return spec

    def _spec_from_other_finders(self, name, path, target):
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def _register_after_loading(self, loader):
        """Wrap this spec's loader (a fresh one per look-up, so probes that drop it change nothing)."""
        load_timm = loader.exec_module

        def exec_module(module):
            load_timm(module)
            self._uninstall()
            try:
                import timm_nat  # noqa: F401  (registers the models)
            except Exception as error:  # never break `import timm` itself
                import warnings

                warnings.warn(f"timm-nat could not register its models with timm: {error!r}", stacklevel=2)

        loader.exec_module = exec_module

    def _uninstall(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install():
    """Add the finder unless disabled, timm is already imported, or it is installed."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "timm" in sys.modules or any(type(f).__name__ == "_RegisterAfterTimm" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterTimm())
