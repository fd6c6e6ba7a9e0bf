"""The attention layers of ``timm_nat.layers`` (the models' only route to the operator), their
build-time checks of hyper-parameters through every model family, and the package's shape
(import graph, public API, docstrings)."""
import ast
import re
import sys
import types
import inspect
from pathlib import Path

import pytest
import timm
import torch

import timm_nat
from timm_nat.attention import na2d
from timm_nat.layers import NeighborhoodAttention2d, QkvAttention2d, RelPosGlobalAttention, global_attention_dense

from conftest import max_abs_diff

PACKAGE = Path(timm_nat.__file__).resolve().parent


# --- NeighborhoodAttention2d ------------------------------------------------------------------------

def test_attention_without_rpb_equals_zero_rpb():
    torch.manual_seed(0)
    with_rpb = NeighborhoodAttention2d(16, num_heads=2, kernel_size=3, dilation=2)
    without = NeighborhoodAttention2d(16, num_heads=2, kernel_size=3, dilation=2, rel_pos_bias=False)
    assert without.rpb is None and "rpb" not in dict(without.named_parameters())
    without.load_state_dict({k: v for k, v in with_rpb.state_dict().items() if k != "rpb"})
    x = torch.randn(2, 5, 9, 16)  # smaller than 3x2 on the height axis: padded
    with torch.no_grad():
        assert max_abs_diff(with_rpb(x), without(x)) > 1e-4  # the bias matters
        with_rpb.rpb.zero_()
        assert max_abs_diff(with_rpb(x), without(x)) <= 1e-6


def test_attention_accepts_per_axis_kernel_and_dilation():
    attention = NeighborhoodAttention2d(12, num_heads=3, kernel_size=(3, 5), dilation=(2, 1))
    assert attention.rpb.shape == (3, 5, 9)
    assert attention(torch.randn(1, 4, 4, 12)).shape == (1, 4, 4, 12)


# --- RelPosGlobalAttention ------------------------------------------------------------------------

def test_global_attention_is_na2d_with_a_whole_map_kernel():
    """The dense fallback (maps 1 wide, where na2d cannot run) computes what na2d does."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, 8) for _ in range(3))
    table = torch.randn(4, 5, 9)
    dense = global_attention_dense(q, k, v, table, scale=0.3)
    assert max_abs_diff(dense, na2d(q, k, v, kernel_size=(3, 5), rpb=table, scale=0.3)) <= 1e-5
    # and the bias is indexed key - query: shifting the table changes the output
    assert max_abs_diff(dense, global_attention_dense(q, k, v, table.flip(1, 2), scale=0.3)) > 1e-3


def test_global_attention_runs_on_one_wide_maps():
    torch.manual_seed(0)
    attention = RelPosGlobalAttention(8, num_heads=2, feat_size=(4, 4)).eval()
    x = torch.randn(1, 1, 6, 8)  # 1 x 6: the dense fallback, with the table resized to (1, 6)
    with torch.no_grad():
        out = attention(x)
        q, k, v = attention.split_qkv(x)
        table = attention.rel_pos_bias_table((1, 6))
        expected = attention.merge_heads(global_attention_dense(q, k, v, table, attention.scale))
    assert table.shape == (2, 1, 11)
    assert max_abs_diff(out, expected) == 0.0


# --- one base, one set of constructor checks ------------------------------------------------------

@pytest.mark.parametrize("layer, extra", [
    (NeighborhoodAttention2d, {}), (RelPosGlobalAttention, dict(feat_size=(4, 4)))], ids=["na", "global"])
def test_attention_layers_share_the_base_checks(layer, extra):
    attention = layer(16, num_heads=4, qk_scale=0.5, **extra)
    assert isinstance(attention, QkvAttention2d)
    assert (attention.head_dim, attention.scale) == (4, 0.5)
    assert layer(16, num_heads=4, **extra).scale == 4 ** -0.5
    with pytest.raises(NotImplementedError, match="dropout") as info:
        layer(16, num_heads=2, attn_drop=0.1, **extra)
    assert layer.published_models in str(info.value)
    with pytest.raises(ValueError, match="dim 15 is not a multiple of num_heads 2"):
        layer(15, num_heads=2, **extra)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        layer(16, num_heads=0, **extra)
    with pytest.raises(ValueError, match="dim must be an int >= 1, got 0"):
        layer(0, num_heads=1, **extra)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(kernel_size=1), ValueError, "kernel_size must be >= 2 on each axis, got 1"),
    (dict(kernel_size=(3, 1)), ValueError, r"kernel_size must be >= 2 on each axis, got \(3, 1\)"),
    (dict(kernel_size=-3), ValueError, "kernel_size must be >= 2 on each axis, got -3"),
    (dict(kernel_size=1.0), TypeError, "kernel_size must be an int or a pair of ints, got 1.0"),
    (dict(kernel_size="7"), TypeError, "kernel_size must be an int or a pair of ints, got '7'"),
    (dict(kernel_size=(3, 3, 3)), TypeError, r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    (dict(kernel_size=True), TypeError, "kernel_size must be an int or a pair of ints, got True"),
    (dict(dilation=0), ValueError, "dilation must be >= 1 on each axis, got 0"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1 on each axis, got \(1, 0\)"),
    (dict(dilation=1.5), TypeError, "dilation must be an int or a pair of ints, got 1.5"),
])
def test_neighborhood_attention_rejects_bad_kernel_or_dilation(kwargs, error, message):
    with pytest.raises(error, match=message):
        NeighborhoodAttention2d(16, num_heads=2, **kwargs)


@pytest.mark.parametrize("arch, kwargs, error, message", [
    ("nat_mini", dict(kernel_size=1), ValueError, "kernel_size must be >= 2 on each axis, got 1"),
    ("nat_mini", dict(kernel_size=1.0), TypeError, "kernel_size must be an int or a pair of ints, got 1.0"),
    ("dinat_mini", dict(dilations=((1, 0, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)), ValueError,
     "dilation must be >= 1 on each axis, got 0"),
    ("dinat_s_tiny", dict(kernel_size=1), ValueError, "kernel_size must be >= 2 on each axis, got 1"),
    ("dinat_s_tiny", dict(dilations=((1, 8), (1, 0), (1, 2) * 3, (1, 1))), ValueError,
     "dilation must be >= 1 on each axis, got 0"),
    ("nat_isotropic_small", dict(kernel_size=1), ValueError, "kernel_size must be >= 2 on each axis, got 1"),
    ("dinat_isotropic_small", dict(dilation=0), ValueError, "dilation must be >= 1 on each axis, got 0"),
    ("dinat_isotropic_small", dict(dilation=2.0), TypeError, "dilation must be an int or a pair of ints, got 2.0"),
    ("vitrpb_small", dict(num_heads=0), ValueError, "num_heads must be an int >= 1, got 0"),
])
def test_models_reject_bad_hyper_parameters_at_build_time(arch, kwargs, error, message):
    """Issue 10 #9: these used to build and fail at the first forward (or not at all)."""
    with pytest.raises(error, match=message):
        timm.create_model(arch, device="meta", **kwargs)


# --- the package's shape --------------------------------------------------------------------------

def _imports(path: Path) -> list:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_models_reach_the_operator_only_through_layers():
    for path in sorted((PACKAGE / "models").glob("*.py")):
        offending = [m for m in _imports(path) if m.lstrip(".").startswith("attention") or "timm_nat.attention" in m]
        assert offending == [], f"{path.name} imports {offending}"
    assert "..attention" not in str(_imports(PACKAGE / "models" / "isotropic.py"))
    assert ".attention" in _imports(PACKAGE / "layers.py")


def test_only_compat_knows_compat():
    """``timm_nat.compat`` is the legacy NATTEN API on top of the package: nothing else imports it or
    reads its markers (attention maps of our models live in ``timm_nat.attention_maps``; the NATTEN
    backend tells a stand-in ``natten`` module by its missing file, not by a compat flag)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if "compat" in path.relative_to(PACKAGE).parts:
            continue
        offending = [m for m in _imports(path) if m.split(".")[-1] == "compat" or ".compat." in m]
        assert offending == [], f"{path.relative_to(PACKAGE)} imports {offending}"
        assert "__timm_nat_shim__" not in path.read_text(), path


def test_natten_backend_ignores_a_stand_in_natten_module(monkeypatch):
    """A ``natten`` module registered in ``sys.modules`` without a file (a shim, whoever made it) is
    not NATTEN: the backend reports it missing instead of calling it."""
    from timm_nat.attention import backends
    monkeypatch.setitem(sys.modules, "natten", types.ModuleType("natten"))
    assert not backends.natten_importable()
    assert "not installed" in backends.BACKENDS["natten"].why_not(torch.device("cpu"), False, False)


_GRAPH_MODE_CHECK = re.compile(
    r"torch\.(compiler\.is_compiling|compiler\.is_exporting|jit\.is_tracing|onnx\.is_in_onnx_export)\b"
    r"|TorchVersion|_get_tracing_state|_len_torch_dispatch_stack")


def test_torch_mode_is_asked_in_one_place():
    """Compiling, exporting, jit/ONNX tracing, dispatch modes and torch-version gates are read only
    in ``timm_nat.attention.graph_mode``; everything else asks it (``torch.jit.is_scripting`` stays
    literal: TorchScript recognises only that call)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "graph_mode.py":
            assert not _GRAPH_MODE_CHECK.search(path.read_text()), path.relative_to(PACKAGE)


def test_package_exports_only_the_public_api():
    assert sorted(timm_nat.__all__) == sorted([
        "na2d", "use_backend", "available_backends", "BACKEND_ENV_VAR",
        "NeighborhoodAttention2d", "RelPosGlobalAttention", "NeighborhoodAttentionBlock", "Nat", "NatIsotropic",
        "models",
    ])
    assert all(hasattr(timm_nat, name) for name in timm_nat.__all__)
    import timm_nat.pretrained as pretrained
    assert not hasattr(pretrained, "model_table_markdown")  # README rendering lives in tools/


@pytest.mark.parametrize("module_name", [
    "timm_nat", "timm_nat.layers", "timm_nat.attention_maps", "timm_nat.pretrained", "timm_nat.models",
    "timm_nat.models._helpers",
    "timm_nat.models.nat", "timm_nat.models.dinat_s", "timm_nat.models.isotropic"])
def test_every_public_function_has_a_docstring(module_name):
    module = __import__(module_name, fromlist=["_"])
    assert module.__doc__
    undocumented = []
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value) and not value.__doc__:
            undocumented.append(name)
        if inspect.isclass(value):
            undocumented += [f"{name}.{m}" for m, f in vars(value).items()
                             if inspect.isfunction(f) and not m.startswith("_") and m != "forward" and not f.__doc__]
    assert undocumented == []
