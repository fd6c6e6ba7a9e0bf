"""timm_nat.compat: the legacy NATTEN API against the golden legacy outputs, the legacy module,
install(), and attention maps of the timm models."""
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

import timm_nat  # noqa: F401  (registers the models)
import timm_nat.compat
from timm_nat.attention import neighborhood_1d
from benchmarks.common import peak_tensor_bytes
from timm_nat.attention_maps import attention_maps, record_attention_maps
from timm_nat.compat import (
    NeighborhoodAttention2D, na2d_av, na2d_qk, natten1dav, natten1dqk, natten1dqkrpb, natten2dav, natten2dqk,
    natten2dqkrpb)
from timm_nat.layers import NeighborhoodAttention2d, NeighborhoodAttentionBlock
from timm_nat.models.isotropic import RelPosGlobalAttention

from conftest import assert_close as _assert_close

REPO = Path(__file__).resolve().parents[1]


def _window(case):
    return case["kernel_size"], tuple(case["dilation"])


# --- 1. legacy ops against the golden legacy NATTEN outputs -------------------------------------------------


def test_golden_qkrpb_logits(golden_cases):
    """natten2dqkrpb(q * scale, k, rpb) is the legacy op's logits (the query is scaled by the caller)."""
    for case, t in golden_cases:
        logits = natten2dqkrpb(t["q"] * case["scale"], t["k"], t["rpb"], *_window(case))
        _assert_close(f"case{case['case']}.logits", logits, t["logits"])


def test_golden_av_and_value_gradient(golden_cases):
    """natten2dav on the golden softmax weights gives the golden output, and d(value) (which depends on
    the weights only) the golden dv."""
    for case, t in golden_cases:
        value = t["v"].clone().requires_grad_()
        out = natten2dav(t["logits"].softmax(-1), value, *_window(case))
        _assert_close(f"case{case['case']}.out", out, t["out"])
        (out * t["grad_out"]).sum().backward()
        _assert_close(f"case{case['case']}.dv", value.grad, t["dv"])


def test_golden_qk_softmax_av_gradients(golden_cases):
    """The legacy chain qk -> softmax -> av, backpropagated: every input's gradient is the golden one."""
    for case, t in golden_cases:
        q, k, v, rpb = (t[n].clone().requires_grad_() for n in ("q", "k", "v", "rpb"))
        logits = natten2dqkrpb(q * case["scale"], k, rpb, *_window(case))
        out = natten2dav(logits.softmax(dim=-1), v, *_window(case))
        _assert_close(f"case{case['case']}.out", out, t["out"])
        (out * t["grad_out"]).sum().backward()
        for name, tensor in (("dq", q), ("dk", k), ("dv", v), ("drpb", rpb)):
            _assert_close(f"case{case['case']}.{name}", tensor.grad, t[name])


def test_golden_without_rpb(golden_cases):
    """natten2dqk (and natten2dqkrpb with rpb=None, and na2d_qk) give the golden no-RPB attention."""
    for case, t in golden_cases:
        kernel, dilation = _window(case)
        q = t["q"] * case["scale"]
        logits = natten2dqk(q, t["k"], kernel, dilation)
        torch.testing.assert_close(natten2dqkrpb(q, t["k"], None, kernel, dilation), logits, rtol=0, atol=0)
        torch.testing.assert_close(na2d_qk(q, t["k"], kernel, dilation), logits, rtol=0, atol=0)
        _assert_close(f"case{case['case']}.out_norpb", natten2dav(logits.softmax(-1), t["v"], kernel, dilation),
                      t["out_norpb"])


def test_natten_0144_signatures(golden_cases):
    """NATTEN <= 0.14.4 (and transformers code of that time) called natten2dqkrpb(q, k, rpb, dilation)
    and natten2dav(attn, v, dilation)."""
    case, t = next((c, t) for c, t in golden_cases if c["dilation"][0] == c["dilation"][1] > 1)
    kernel, (dilation, _) = _window(case)
    logits = natten2dqkrpb(t["q"], t["k"], t["rpb"], dilation)
    torch.testing.assert_close(logits, natten2dqkrpb(t["q"], t["k"], t["rpb"], kernel, dilation), rtol=0, atol=0)
    attn = logits.softmax(-1)
    torch.testing.assert_close(natten2dav(attn, t["v"], dilation), natten2dav(attn, t["v"], kernel, dilation),
                               rtol=0, atol=0)


def test_gradcheck_every_input():
    """Float64 gradcheck of the hand-written backward: query, key, rpb, weights and value, 2-D and 1-D,
    with per-axis dilation, a non-square map and window clamping at the borders."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    q, k, v = rand(1, 2, 6, 4, 2), rand(1, 2, 6, 4, 2), rand(1, 2, 6, 4, 2)
    rpb, attn = rand(2, 5, 5), rand(1, 2, 6, 4, 9)
    check = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert check(lambda q, k, rpb: natten2dqkrpb(q, k, rpb, 3, (2, 1)), (q, k, rpb))
    assert check(lambda a, v: natten2dav(a, v, 3, (2, 1)), (attn, v))
    q1, k1, v1, rpb1, attn1 = rand(1, 2, 9, 2), rand(1, 2, 9, 2), rand(1, 2, 9, 2), rand(2, 7), rand(1, 2, 9, 4)
    assert check(lambda q, k, rpb: natten1dqkrpb(q, k, rpb, 4, 2), (q1, k1, rpb1))
    assert check(lambda a, v: natten1dav(a, v, 4, 2), (attn1, v1))


def test_1d_ops_match_independent_gather():
    """natten1dqkrpb / natten1dav against an explicit gather of neighborhood_1d's windows."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 23, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(3, 9, generator=gen)
    keys, bias_index = neighborhood_1d(23, 5, 3)                     # [L, K]
    expected = torch.einsum("bnld,bnlkd->bnlk", q, k[:, :, keys]) + rpb[:, bias_index]
    logits = natten1dqkrpb(q, k, rpb, 5, 3)
    _assert_close("1d logits", logits, expected)
    torch.testing.assert_close(natten1dqk(q, k, 5, 3), expected - rpb[:, bias_index], rtol=1e-5, atol=1e-5)
    attn = logits.softmax(-1)
    _assert_close("1d out", natten1dav(attn, v, 5, 3), torch.einsum("bnlk,bnlkd->bnld", attn, v[:, :, keys]))


@pytest.mark.parametrize("where, planted", [("v", float("nan")), ("v", float("inf")), ("k", float("nan"))])
def test_one_nonfinite_input_reaches_only_its_windows(where, planted):
    """Issue 20 #2: one NaN/Inf in v (or k) reaches only the outputs (and dq entries) whose windows
    hold it, as legacy NATTEN computed them (an Inf in v gives Inf there, no NaN), not whole tiles."""
    gen = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(1, 2, 16, 13, 4, generator=gen, dtype=torch.float64) for name in "qkv"}
    tensors[where][0, 1, 7, 6, 2] = planted
    q, k, v = (tensors[name].requires_grad_() for name in "qkv")
    rpb = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    out = natten2dav(natten2dqkrpb(q, k, rpb, 3, (1, 2)).softmax(-1), v, 3, (1, 2))
    (dq,) = torch.autograd.grad(out.sum(), q)
    # independent: the window of every query, gathered explicitly
    rows, row_bias = neighborhood_1d(16, 3, 1)
    cols, col_bias = neighborhood_1d(13, 3, 2)
    window_k = k[:, :, rows[:, None, :, None], cols[None, :, None, :]].flatten(4, 5)    # [1, 2, 16, 13, 9, 4]
    window_v = v[:, :, rows[:, None, :, None], cols[None, :, None, :]].flatten(4, 5)
    bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]].flatten(3, 4)  # [2, 16, 13, 9]
    attn = (torch.einsum("bnhwd,bnhwkd->bnhwk", q, window_k) + bias).softmax(-1)
    expected = torch.einsum("bnhwk,bnhwkd->bnhwd", attn, window_v)
    (expected_dq,) = torch.autograd.grad(expected.sum(), q)
    assert 0 < (~expected.isfinite()).sum() < expected.numel() / 4  # a few windows, not the map
    for ours, theirs in ((out, expected), (dq, expected_dq)):
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("batch, heads", [(0, 2), (2, 0)])
def test_empty_batch_or_heads(batch, heads):
    """An empty batch (or no heads) gives empty logits and outputs and zero gradients, as ``na2d``
    does (the legacy ops used to fail reshaping an empty tensor with a -1 dimension)."""
    q, k, v = (torch.randn(batch, heads, 6, 7, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, 5, 5, requires_grad=True)
    logits = natten2dqkrpb(q, k, rpb, 3, 1)
    out = natten2dav(logits.softmax(-1), v, 3, 1)
    assert logits.shape == (batch, heads, 6, 7, 9) and out.shape == q.shape
    for grad, tensor in zip(torch.autograd.grad(out.sum(), (q, k, v, rpb)), (q, k, v, rpb)):
        assert grad.shape == tensor.shape and not grad.any()


def test_unfused_ops_do_not_gather_kernel_squared_copies():
    """qk's peak memory stays near its output: a gather of K*K keys per query (head_dim 32) would
    hold 32x the logits."""
    q, k = torch.randn(8, 2, 28, 28, 32), torch.randn(8, 2, 28, 28, 32)
    rpb = torch.randn(2, 13, 13)
    logits_bytes = 8 * 2 * 28 * 28 * 49 * 4
    peak = peak_tensor_bytes(lambda: natten2dqkrpb(q, k, rpb, 7, 1), "cpu")
    assert peak < 4 * logits_bytes, f"peak {peak / 2**20:.1f} MB vs logits {logits_bytes / 2**20:.1f} MB"


def test_plans_built_under_inference_mode_serve_autograd_later():
    """The cached index plans must not be inference tensors (autograd saves them for backward)."""
    with torch.inference_mode():
        natten2dav(natten2dqkrpb(torch.randn(1, 1, 11, 13, 4), torch.randn(1, 1, 11, 13, 4), torch.randn(1, 5, 5),
                                 3, 3).softmax(-1), torch.randn(1, 1, 11, 13, 4), 3, 3)
    q = torch.randn(1, 1, 11, 13, 4, requires_grad=True)
    natten2dav(natten2dqkrpb(q, q, torch.zeros(1, 5, 5), 3, 3).softmax(-1), q, 3, 3).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match=r"height 8 is smaller than kernel_size \* dilation = 3 \* 3 = 9"):
        natten2dqkrpb(q, q, None, 3, 3)
    with pytest.raises(ValueError, match=r"rpb must have shape \[heads, 2\*kh-1, 2\*kw-1\] = \[2, 5, 5\], got \(2, 7, 7\)"):
        natten2dqkrpb(q, q, torch.zeros(2, 7, 7), 3, 1)
    with pytest.raises(ValueError, match=r"attn must have shape .* = \[1, 2, 8, 8, 9\], got \(1, 2, 8, 8, 8\)"):
        na2d_av(torch.zeros(1, 2, 8, 8, 8), q, 3)
    with pytest.raises(ValueError, match="5-D"):
        natten2dqkrpb(q[0], q[0], None, 3, 1)
    with pytest.raises(NotImplementedError, match="causal"):
        na2d_qk(q, q, 3, is_causal=True)


# --- 2. the legacy module, and a legacy-style block against timm-nat's ---------------------------------------


DINAT_TINY = "dinat_test_tiny"


@pytest.fixture(scope="module")
def legacy_dinat(golden, tiny_model_kwargs):
    """The golden DiNAT tiny model through timm-nat, and its original-layout (NATTEN module) state dict."""
    model = timm.create_model(
        "dinat_mini", pretrained=True, num_classes=10, **tiny_model_kwargs(DINAT_TINY),
        pretrained_cfg_overlay=dict(file=str(golden / "orig" / f"{DINAT_TINY}.pth"), num_classes=10)).eval()
    state_dict = torch.load(golden / "orig" / f"{DINAT_TINY}.pth", map_location="cpu", weights_only=True)
    return model, state_dict, load_file(golden / "orig" / f"{DINAT_TINY}.golden.safetensors")


def _swap_in_legacy_attention(model, state_dict, **module_kwargs):
    """Replace every attention module by the legacy NATTEN module, loaded strictly from the original
    repository's keys ``levels.{i}.blocks.{j}.attn.*`` (the layout NATTEN's module gave them)."""
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            old = block.attn
            prefix = f"levels.{i}.blocks.{j}.attn."
            legacy = NeighborhoodAttention2D(
                old.qkv.in_features, old.num_heads, kernel_size=old.kernel_size[0], dilation=old.dilation,
                rel_pos_bias=True, **module_kwargs)
            legacy.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
            block.attn = legacy
    return model


def test_legacy_module_state_dict_names():
    module = NeighborhoodAttention2D(32, 4, 7, dilation=2, bias=True)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        "qkv.weight": (96, 32), "qkv.bias": (96,), "rpb": (4, 13, 13), "proj.weight": (32, 32), "proj.bias": (32,)}
    assert NeighborhoodAttention2D(32, 4, 7, rel_pos_bias=False).rpb is None
    assert NeighborhoodAttention2D(32, 4, 7, dilation=None).dilation == (1, 1)  # the original NATLayer's default
    with pytest.raises(ValueError, match="disagree"):
        NeighborhoodAttention2D(32, 4, 7, bias=True, rel_pos_bias=False)


@pytest.mark.parametrize("path", ["fused", "unfused"])
def test_legacy_module_loads_original_checkpoint_and_reproduces_golden(legacy_dinat, path):
    """Every attention of the golden DiNAT replaced by the legacy module, loaded from the original .pth:
    golden logits on every input (several need padding). 'unfused': attn_drop > 0 in training mode
    (p = 1e-12: nothing is dropped, the 1/(1-p) rescale is 1 in fp32) runs natten2dqkrpb -> softmax -> natten2dav."""
    model, state_dict, golden = legacy_dinat
    kwargs = dict(attn_drop=1e-12) if path == "unfused" else {}
    model = _swap_in_legacy_attention(model, state_dict, **kwargs).eval()
    legacy_modules = [m for m in model.modules() if isinstance(m, NeighborhoodAttention2D)]
    assert len(legacy_modules) == 8
    if path == "unfused":
        for module in legacy_modules:
            module.train()
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: called.append(m) if isinstance(m, NeighborhoodAttention2D) else None)
    try:
        for j in range(5):
            with torch.no_grad():
                _assert_close(f"logits{j}", model(golden[f"input{j}"]), golden[f"logits{j}"])
    finally:
        handle.remove()
    assert len(called) == 5 * 8


def test_legacy_module_dropout_path_applies_dropout():
    """With attn_drop > 0 in training, the weights really are dropped (same seed: a hand-written chain)."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(8, 2, 3, dilation=2, attn_drop=0.5).train()
    x = torch.randn(2, 9, 7, 8)
    torch.manual_seed(1)
    out = module(x)
    torch.manual_seed(1)
    q, k, v = module.qkv(x).reshape(2, 9, 7, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    attn = torch.dropout(natten2dqkrpb(q * module.scale, k, module.rpb, 3, 2).softmax(-1), 0.5, train=True)
    expected = module.proj(natten2dav(attn, v, 3, 2).permute(0, 2, 3, 1, 4).reshape(2, 9, 7, 8))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - module.eval()(x)).abs().max() > 1e-2


class LegacyNATBlock(nn.Module):
    """A NAT block written the way code for NATTEN <= 0.14 was (the original repository's NATLayer with
    its NeighborhoodAttention), using only the legacy calls."""

    def __init__(self, dim, num_heads, kernel_size, dilation, mlp_ratio=2., layer_scale=None):
        super().__init__()
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.scale = (dim // num_heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None

    def attention(self, x):
        batch, height, width, channels = x.shape
        window = self.kernel_size * self.dilation
        pad_r, pad_b = max(0, window - width), max(0, window - height)
        x = nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(batch, h, w, 3, self.num_heads, channels // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation)
        attn = attn.softmax(dim=-1)
        x = natten2dav(attn, v, self.kernel_size, self.dilation)
        x = x.permute(0, 2, 3, 1, 4).reshape(batch, h, w, channels)[:, :height, :width, :]
        return self.proj(x)

    def forward(self, x):
        attn = self.attention(self.norm1(x))
        x = x + (attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return x + (mlp if self.gamma2 is None else self.gamma2 * mlp)


def _legacy_names(timm_key):
    return {"attn.qkv.weight": "qkv.weight", "attn.qkv.bias": "qkv.bias", "attn.rpb": "rpb",
            "attn.proj.weight": "proj.weight", "attn.proj.bias": "proj.bias", "mlp.fc1.weight": "fc1.weight",
            "mlp.fc1.bias": "fc1.bias", "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
            "ls1.gamma": "gamma1", "ls2.gamma": "gamma2"}.get(timm_key, timm_key)


@pytest.mark.parametrize("size,dilation,layer_scale", [((13, 11), 1, None), ((9, 14), 2, 0.5), ((5, 7), 3, None)])
def test_legacy_style_block_equals_timm_block(size, dilation, layer_scale):
    """The legacy block and timm-nat's NeighborhoodAttentionBlock with the same weights: same output and
    input gradient (the last map is smaller than kernel x dilation: both pad)."""
    torch.manual_seed(0)
    timm_block = NeighborhoodAttentionBlock(16, 2, kernel_size=3, dilation=dilation, mlp_ratio=2.,
                                            ls_init_value=layer_scale).eval()
    for p in timm_block.parameters():
        nn.init.normal_(p, std=0.3)  # every weight random, so that each one matters
    legacy = LegacyNATBlock(16, 2, 3, dilation, layer_scale=layer_scale)
    legacy.load_state_dict({_legacy_names(k): v for k, v in timm_block.state_dict().items()})
    x = torch.randn(2, *size, 16, requires_grad=True)
    x_legacy = x.detach().clone().requires_grad_()
    out, out_legacy = timm_block(x), legacy(x_legacy)
    _assert_close("block out", out_legacy, out)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_legacy.backward(grad)
    _assert_close("block d(input)", x_legacy.grad, x.grad)


# --- 3. install(): natten imports resolve to ours where NATTEN is absent or new ---------------------------------


def _run(code: str, extra_path: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(REPO)) if p))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_install_with_new_natten_adds_only_missing_names():
    out = _run("""
        import natten, natten.functional
        assert natten.__version__ >= "0.20", natten.__version__
        assert not hasattr(natten.functional, "natten2dqkrpb")
        new_na2d, new_module = natten.functional.na2d, natten.NeighborhoodAttention2D
        import timm_nat.compat as compat
        assert compat.install() == "patched" and compat.install() == "patched"
        from natten.functional import natten2dqkrpb, natten2dav, natten1dqkrpb, na2d_qk
        assert natten2dqkrpb is compat.natten2dqkrpb and natten2dav is compat.natten2dav and na2d_qk is compat.na2d_qk
        assert natten.functional.na2d is new_na2d and natten.NeighborhoodAttention2D is new_module
        compat.install(replace_module=True)
        from natten import NeighborhoodAttention2D
        assert NeighborhoodAttention2D is compat.NeighborhoodAttention2D
        print("ok")
    """)
    assert out.strip() == "ok"


_BLOCK_NATTEN = """
    import importlib.abc, sys
    class BlockNatten(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "natten" or name.startswith("natten."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, BlockNatten())
"""


def test_install_without_natten_registers_a_shim():
    """NATTEN absent (blocked by a meta-path finder): install() provides natten.functional and the legacy
    module, code written for the original repository runs, and timm-nat's own backends still work."""
    out = _run(_BLOCK_NATTEN + """
    try:
        import natten
        raise SystemExit("natten still importable")
    except ModuleNotFoundError:
        pass
    import torch, timm_nat.compat as compat
    from timm_nat.attention import na2d, use_backend
    assert compat.install() == "shim" and compat.install() == "shim"
    import natten
    from natten.functional import natten2dqkrpb, natten2dav
    from natten import NeighborhoodAttention2D
    assert natten2dqkrpb is compat.natten2dqkrpb and NeighborhoodAttention2D is compat.NeighborhoodAttention2D
    # the original repository's check: no natten.context -> it passes bias=True (NATTEN <= 0.14 style)
    extra = {"rel_pos_bias": True} if hasattr(natten, "context") else {"bias": True}
    attn = NeighborhoodAttention2D(16, kernel_size=3, dilation=2, num_heads=2, qkv_bias=True, qk_scale=None,
                                   attn_drop=0.0, proj_drop=0.0, **extra)
    assert attn(torch.randn(1, 5, 5, 16)).shape == (1, 5, 5, 16) and attn.rpb is not None
    q = torch.randn(1, 8, 8, 2, 4)
    out = na2d(q, q, q, 3)  # automatic backend: unaffected by the shim
    try:
        with use_backend("natten"):
            na2d(q, q, q, 3)
        raise SystemExit("forced natten backend ran on the shim")
    except ValueError as error:  # the shim is not NATTEN: the backend says NATTEN is missing
        assert "needs NATTEN" in str(error) and "not installed" in str(error), error
    print("ok")
    """)
    assert out.strip() == "ok"


def test_install_leaves_a_working_old_natten_alone(tmp_path):
    """A NATTEN < 0.20 (a stand-in package here) keeps its own ops: nothing is shadowed."""
    package = tmp_path / "natten"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "0.17.4"\n')
    (package / "functional.py").write_text("def natten2dqkrpb(*args):\n    return 'old natten'\n")
    out = _run("""
        import natten.functional, timm_nat.compat as compat
        assert compat.install() == "natten"
        from natten.functional import natten2dqkrpb
        assert natten2dqkrpb() == "old natten" and not hasattr(natten.functional, "natten2dav")
        print("ok")
    """, extra_path=str(tmp_path))
    assert out.strip() == "ok"


# --- 4. attention maps of the timm models ---------------------------------------------------------------------


def _independent_neighborhood_weights(module, x):
    """softmax(q * scale . k + rpb) over each query's window, gathered with neighborhood_1d (as the
    reference backend gathers), on the module's zero-padded input; [B, heads, H, W, kh*kw]."""
    batch, height, width, _ = x.shape
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    x = nn.functional.pad(x, (0, 0, 0, max(0, kw * dw - width), 0, max(0, kh * dh - height)))
    h, w = x.shape[1:3]
    q, k, v = module.qkv(x).reshape(batch, h, w, 3, module.num_heads, module.head_dim).unbind(3)
    rows, row_bias = neighborhood_1d(h, kh, dh)
    cols, col_bias = neighborhood_1d(w, kw, dw)
    keys = k[:, rows[:, None, :, None], cols[None, :, None, :]]                 # [B, h, w, kh, kw, heads, D]
    logits = torch.einsum("bhwnd,bhwijnd->bnhwij", q * module.scale, keys)
    logits = logits + module.rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
    weights = logits.reshape(batch, module.num_heads, h, w, kh * kw).softmax(-1)
    values = v[:, rows[:, None, :, None], cols[None, :, None, :]].reshape(batch, h, w, kh * kw, module.num_heads, -1)
    out = torch.einsum("bnhwk,bhwknd->bhwnd", weights, values).reshape(batch, h, w, -1)[:, :height, :width]
    return weights[:, :, :height, :width], module.proj(out)


def _independent_global_weights(module, x):
    """ViT-RPB: softmax(q * scale . k^T + bias) over all keys, bias[i, j; m, n] = table[m - i + H - 1, n - j + W - 1]
    (the table is the module's rpb resized to this map, as its forward resizes it)."""
    batch, height, width, _ = x.shape
    q, k, v = module.qkv(x).reshape(batch, height * width, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    table = module.rel_pos_bias_table((height, width))
    bias = table[:, rows[None, :] - rows[:, None] + height - 1, cols[None, :] - cols[:, None] + width - 1]
    weights = (q * module.scale @ k.transpose(-1, -2) + bias).softmax(-1)       # [B, heads, N, N]
    out = (weights @ v).transpose(1, 2).reshape(batch, height, width, -1)
    return weights.reshape(batch, module.num_heads, height, width, height * width), module.proj(out)


MAP_MODELS = {  # family: (arch, kwargs, input size)
    "nat": ("nat_mini", dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=5), 64),
    "dinat": ("dinat_mini", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3,
                                 dilations=((1, 8), (1, 4), (1, 2), (1, 1))), 64),
    "dinat_s": ("dinat_s_tiny", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3,
                                     dilations=((1, 8), (1, 4), (1, 2), (1, 1))), 64),
    "nat_isotropic": ("nat_isotropic_small", dict(img_size=128, embed_dim=32, depth=2, num_heads=4, kernel_size=3), 128),
    "dinat_isotropic": ("dinat_isotropic_small", dict(img_size=128, embed_dim=32, depth=2, num_heads=4, kernel_size=3), 128),
    "vitrpb": ("vitrpb_small", dict(img_size=128, embed_dim=32, depth=2, num_heads=4), 128),
}


@pytest.mark.parametrize("family", list(MAP_MODELS))
def test_attention_maps_match_independent_softmax(family):
    """Every attention module's map equals softmax(qk + rpb) computed independently on the module's
    input, and those weights reproduce the module's own (fused) output: they are what the model used."""
    arch, kwargs, size = MAP_MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    for name, p in model.named_parameters():
        if name.endswith("rpb"):
            nn.init.normal_(p, std=1.0)  # make the bias matter
    inputs, outputs = {}, {}
    kinds = (NeighborhoodAttention2d, RelPosGlobalAttention)

    def keep(name, module, args, output):
        inputs[name], outputs[name] = args[0], output

    handles = [m.register_forward_hook(functools.partial(keep, n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    x = torch.randn(2, 3, size, size - 16)  # non-square; DiNAT's late stages need padding
    with torch.no_grad():
        maps = attention_maps(model, x)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    assert set(maps) == set(inputs) and len(maps) >= 2
    for name, weights in maps.items():
        module = modules[name]
        independent = _independent_global_weights if isinstance(module, RelPosGlobalAttention) \
            else _independent_neighborhood_weights
        with torch.no_grad():
            expected, module_out = independent(module, inputs[name])
        _assert_close(f"{name} weights", weights, expected)
        _assert_close(f"{name} output from weights", module_out, outputs[name])


def test_attention_maps_live_next_to_the_layers_and_compat_re_exports_them():
    """``timm_nat.attention_maps`` is their home; ``timm_nat.compat`` (their old place, which the
    README named) re-exports the same functions."""
    import timm_nat.attention_maps as maps
    for name in ("attention_maps", "record_attention_maps", "neighborhood_weights", "global_weights"):
        assert getattr(timm_nat.compat, name) is getattr(maps, name)
        assert getattr(maps, name).__module__ == "timm_nat.attention_maps"


def test_record_attention_maps_any_forward_and_logits():
    """The recorder works on forward_intermediates too, gives logits on request, carries autograd,
    and removes its hooks afterwards."""
    arch, kwargs, size = MAP_MODELS["dinat"]
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with record_attention_maps(model, logits=True) as logits:
        model.forward_intermediates(x, intermediates_only=True)
    with record_attention_maps(model) as weights:
        model.forward_features(x)
    assert set(logits) == set(weights) == {n for n, m in model.named_modules() if isinstance(m, NeighborhoodAttention2d)}
    for name in weights:
        _assert_close(name, logits[name].softmax(-1), weights[name])
    assert all(not m._forward_hooks for m in model.modules())
    weights["stages.0.blocks.1.attn"][..., 0].sum().backward()
    assert model.stages[0].blocks[1].attn.rpb.grad is not None
    with pytest.raises(ValueError, match="no NeighborhoodAttention2d"):
        attention_maps(nn.Linear(2, 2), torch.zeros(2))
