"""The start-up import hook (``_timm_nat_hook``): registers timm-nat's models whenever timm is
imported, survives availability probes (``importlib.util.find_spec``, as transformers does), can be
switched off, and never breaks ``import timm``.

Every case runs in a fresh interpreter. The hook under test is this checkout's ``timm_nat/_hook.py``,
copied as ``_timm_nat_hook.py`` into a directory that comes first on ``PYTHONPATH``, so it is the one
the installed ``timm_nat.pth`` imports at start-up (and the one the snippet starts explicitly when the
package is not installed).
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_HOOK = "import _timm_nat_hook; _timm_nat_hook.install()\n"
IS_REGISTERED = "import timm; print('registered' if 'dinat_mini' in timm.list_models() else 'not registered')\n"


@pytest.fixture
def hook_dir(tmp_path) -> Path:
    """A directory holding this checkout's hook under its installed name."""
    shutil.copy(REPO / "timm_nat" / "_hook.py", tmp_path / "_timm_nat_hook.py")
    return tmp_path


# every test starts one or two interpreters, each limited to 120 s
pytestmark = pytest.mark.timeout(300)


def _run(hook_dir: Path, code: str, then: str = "", first_on_path=(), **env) -> subprocess.CompletedProcess:
    """Run ``code`` then ``then`` (after starting the hook) in a fresh interpreter with this checkout importable."""
    python_path = [str(p) for p in first_on_path] + [str(hook_dir), str(REPO), os.environ.get("PYTHONPATH", "")]
    full_env = {k: v for k, v in os.environ.items() if k != "TIMM_NAT_AUTOREGISTER"}
    full_env.update(PYTHONPATH=os.pathsep.join(python_path), **env)
    check_hook = f"assert _timm_nat_hook.__file__.startswith({str(hook_dir)!r}), _timm_nat_hook.__file__\n"
    result = subprocess.run(
        [sys.executable, "-c", START_HOOK + check_hook + textwrap.dedent(code) + then],
        capture_output=True, text=True, env=full_env, timeout=120, cwd=hook_dir)
    assert result.returncode == 0, result.stderr
    return result


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_import_timm_registers_and_removes_the_hook(hook_dir):
    result = _run(hook_dir, """
        import sys
        assert 'timm_nat' not in sys.modules
        import timm
        assert not any(type(f).__name__ == '_RegisterAfterTimm' for f in sys.meta_path)
        print('registered' if 'dinat_mini' in timm.list_models() else 'not registered')
    """)
    assert _last_line(result) == "registered"


def test_find_spec_probe_does_not_consume_the_hook(hook_dir):
    """Probing twice (and dropping the specs) leaves the hook in place for the real import."""
    result = _run(hook_dir, """
        import importlib.util, sys
        assert importlib.util.find_spec('timm') is not None
        assert importlib.util.find_spec('timm') is not None
        assert 'timm' not in sys.modules and 'timm_nat' not in sys.modules
    """, then=IS_REGISTERED)
    assert _last_line(result) == "registered"


@pytest.mark.parametrize("order", ["transformers first", "timm first"])
def test_transformers_and_timm_in_either_order(hook_dir, order):
    """transformers probes timm with find_spec at import; registration must still happen."""
    pytest.importorskip("transformers", reason="transformers is an optional test dependency (extra 'frameworks')")
    imports = "import transformers\nimport timm\n" if order == "transformers first" else "import timm\nimport transformers\n"
    result = _run(hook_dir, imports + "assert transformers.utils.is_timm_available()\n", then=IS_REGISTERED)
    assert _last_line(result) == "registered"


def test_transformers_timm_backbone_without_importing_timm(hook_dir):
    """Only transformers is imported: ``TimmBackbone`` builds a timm-nat model by name."""
    pytest.importorskip("transformers", reason="transformers is an optional test dependency (extra 'frameworks')")
    result = _run(hook_dir, """
        from transformers import TimmBackbone, TimmBackboneConfig
        config = TimmBackboneConfig(backbone='dinat_mini', use_pretrained_backbone=False, out_indices=(1, 2, 3))
        backbone = TimmBackbone(config)
        print(type(backbone._backbone).__name__, backbone.channels)
    """)
    assert _last_line(result) == "FeatureGetterNet [128, 256, 512]"


@pytest.mark.parametrize("value", ["0", "off"])
def test_off_switch(hook_dir, value):
    result = _run(hook_dir, """
        import sys
        assert not any(type(f).__name__ == '_RegisterAfterTimm' for f in sys.meta_path)
        import timm
        assert 'timm_nat' not in sys.modules
    """, then=IS_REGISTERED, TIMM_NAT_AUTOREGISTER=value)
    assert _last_line(result) == "not registered"


def test_broken_timm_nat_never_breaks_import_timm(hook_dir, tmp_path_factory):
    """A timm_nat that fails to import costs a warning, not ``import timm``."""
    broken = tmp_path_factory.mktemp("broken")
    (broken / "timm_nat").mkdir()
    (broken / "timm_nat" / "__init__.py").write_text("raise ImportError('simulated breakage')\n")
    result = _run(hook_dir, """
        import timm
        print(timm.__version__, 'dinat_mini' in timm.list_models())
    """, first_on_path=[broken])
    assert _last_line(result).endswith(" False")
    assert "timm-nat could not register its models with timm" in result.stderr
    assert "simulated breakage" in result.stderr
