"""Import hook that registers timm-nat's models in programs that import only timm.

Installed as the top-level module ``_timm_nat_hook`` and started by ``timm_nat.pth`` in
site-packages (Python runs ``.pth`` import lines at start-up). Start-up cost is one tiny
module and one entry on ``sys.meta_path``: nothing is imported until the program itself
imports ``timm``; right after timm finishes loading, ``timm_nat`` is imported so that its
``@register_model`` functions run, and the hook removes itself.

Off switch: ``TIMM_NAT_AUTOREGISTER=0`` (then ``import timm_nat`` registers explicitly).
"""
import os
import sys

ENV_VAR = "TIMM_NAT_AUTOREGISTER"


class _RegisterAfterTimm:
    """Meta-path finder that only watches for the top-level ``timm`` import."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load_timm = spec.loader.exec_module

        def exec_module(module):
            load_timm(module)
            try:
                import timm_nat  # noqa: F401  (registers the models)
            except Exception as error:  # never break `import timm` itself
                import warnings

                warnings.warn(f"timm-nat could not register its models with timm: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install():
    """Add the finder unless disabled, timm is already imported, or it is installed."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "timm" in sys.modules or any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterTimm())
