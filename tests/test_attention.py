"""The na2d operator against the legacy NATTEN golden cases and the gather reference."""
import logging
import random
import zlib

import pytest
import timm
import torch

from timm_nat.attention import available_backends, backends, functional, na2d, select_backend, tiled, use_backend
from timm_nat.attention.flex import na2d_flex
from timm_nat.attention.reference import na2d_reference
from timm_nat.attention.windows import neighborhood_1d, subgrid_length, window_start

from conftest import assert_close as _assert_close

GRADS = ("dq", "dk", "dv", "drpb")


def _to_natten_layout(x):  # golden [B, heads, H, W, D] -> [B, H, W, heads, D]
    return x.permute(0, 2, 3, 1, 4).contiguous()


def _to_golden_layout(x):
    return x.permute(0, 3, 1, 2, 4)


def _run_case(case, t, backend, with_rpb=True, backward=True):
    q, k, v = (_to_natten_layout(t[n]).requires_grad_(backward) for n in "qkv")
    rpb = t["rpb"].clone().requires_grad_(backward) if with_rpb else None
    with use_backend(backend):
        out = na2d(q, k, v, case["kernel_size"], tuple(case["dilation"]), rpb=rpb, scale=case["scale"])
    if not backward:
        return out, None
    (out * _to_natten_layout(t["grad_out"])).sum().backward()
    grads = dict(dq=_to_golden_layout(q.grad), dk=_to_golden_layout(k.grad), dv=_to_golden_layout(v.grad), drpb=rpb.grad)
    return out, grads


@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_golden_forward_and_gradients(golden_cases, backend):
    for case, t in golden_cases:
        out, grads = _run_case(case, t, backend)
        _assert_close(f"case{case['case']}.out", _to_golden_layout(out), t["out"])
        for name in GRADS:
            _assert_close(f"case{case['case']}.{name}", grads[name], t[name])
        out_norpb, _ = _run_case(case, t, backend, with_rpb=False, backward=False)
        _assert_close(f"case{case['case']}.out_norpb", _to_golden_layout(out_norpb), t["out_norpb"])


@pytest.mark.parametrize("backend", ["flex", "natten"])
def test_golden_forward_inference_backends(golden_cases, backend):
    """Flex (eager here; compiled below) and NATTEN run on CPU without autograd only."""
    for case, t in golden_cases:
        if backend == "natten" and case["head_dim"] < 8:  # NATTEN's own rule: head_dim a power of two >= 8
            with pytest.raises(ValueError, match="refused this input.*head_dim=4"):
                _run_case(case, t, backend, with_rpb=False, backward=False)
            out_norpb, _ = _run_case(case, t, None, with_rpb=False, backward=False)  # automatic: falls back
            _assert_close(f"case{case['case']}.out_norpb (fallback)", _to_golden_layout(out_norpb), t["out_norpb"])
            continue
        if backend == "flex":  # eager: na2d's flex is compiled, which test_golden_flex_compiled covers
            q, k, v = (_to_natten_layout(t[n]) for n in "qkv")
            window = ((case["kernel_size"],) * 2, tuple(case["dilation"]))
            out = na2d_flex(q, k, v, *window, t["rpb"], case["scale"], compile=False)
            _assert_close(f"case{case['case']}.out", _to_golden_layout(out), t["out"])
            out_norpb = na2d_flex(q, k, v, *window, None, case["scale"], compile=False)
        else:
            out_norpb, _ = _run_case(case, t, backend, with_rpb=False, backward=False)
        _assert_close(f"case{case['case']}.out_norpb", _to_golden_layout(out_norpb), t["out_norpb"])


@pytest.mark.parametrize("case_id", [3, 7, 11])  # borders + RPB, dilation 3 on 23x17, per-axis dilation
def test_golden_flex_compiled(golden_cases, case_id):
    """The compiled flex kernel (what CUDA runs) on CPU: ~15 s of compilation per case."""
    case, t = golden_cases[case_id]
    q, k, v = (_to_natten_layout(t[n]) for n in "qkv")
    out = na2d_flex(q, k, v, (case["kernel_size"],) * 2, tuple(case["dilation"]), t["rpb"], case["scale"], compile=True)
    _assert_close(f"case{case_id}.out", _to_golden_layout(out), t["out"])


def _random_configs(count, seed=0):
    """Random shapes incl. rectangular maps, per-axis kernels and maps exactly kernel*dilation."""
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kernel = (rng.choice([2, 3, 5, 7]), rng.choice([3, 4, 5, 9]))
        dilation = (rng.randint(1, 4), rng.randint(1, 3))
        exact = i % 4 == 0
        size = [k * d + (0 if exact else rng.randint(0, 9)) for k, d in zip(kernel, dilation)]
        configs.append(dict(batch=rng.randint(1, 2), height=size[0], width=size[1], heads=rng.randint(1, 3),
                            dim=rng.choice([4, 8, 16]), kernel=kernel, dilation=dilation))
    return configs


@pytest.mark.parametrize("config", _random_configs(24), ids=lambda c: "{height}x{width}-k{kernel}-d{dilation}".format(**c))
def test_tiled_matches_reference(config):
    gen = torch.Generator().manual_seed(zlib.crc32(str(config).encode()))  # hash() of a str varies per process
    shape = (config["batch"], config["height"], config["width"], config["heads"], config["dim"])
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kh, kw = config["kernel"]
    rpb = torch.randn(config["heads"], 2 * kh - 1, 2 * kw - 1, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for backend in ("tiled", "reference"):
        with use_backend(backend):
            out = na2d(q, k, v, config["kernel"], config["dilation"], rpb=rpb)
        results.append((out, *torch.autograd.grad((out * grad_out).sum(), (q, k, v, rpb))))
    for name, ours, ref in zip(("out", "dq", "dk", "dv", "drpb"), *results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision(dtype, tolerance):
    """Documented tolerances: bf16 3e-2, fp16 4e-3 (max abs vs fp32 reference, unit-scale inputs)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 15, 13, 2, 16, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 9, 9, generator=gen)
    ref = na2d_reference(q, k, v, (5, 5), (2, 1), rpb, 0.25)
    ours = na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, (2, 1), rpb=rpb.to(dtype), scale=0.25)
    assert ours.dtype == dtype
    assert (ours.float() - ref).abs().max().item() <= tolerance
    q.requires_grad_()
    na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5, (2, 1), rpb=rpb.to(dtype)).float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _qkv(shape=(1, 9, 9, 2, 8), dtype=torch.float32):
    return tuple(torch.randn(shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("call, error, words", [
    (lambda q, k, v: na2d(q[0], k[0], v[0], 3), ValueError, ["query", "5-D", "(9, 9, 2, 8)"]),
    (lambda q, k, v: na2d(q, k[:, :8], v, 3), ValueError, ["same shape", "(1, 8, 9, 2, 8)"]),
    (lambda q, k, v: na2d(q, k, v, 1), ValueError, ["kernel_size", ">= 2", "1"]),
    (lambda q, k, v: na2d(q, k, v, 3, dilation=0), ValueError, ["dilation", ">= 1", "0"]),
    (lambda q, k, v: na2d(q, k, v, (3, 3, 3)), TypeError, ["kernel_size", "(3, 3, 3)"]),
    (lambda q, k, v: na2d(q, k, v, 5, dilation=2), ValueError, ["height 9", "5 * 2 = 10", "pad"]),
    (lambda q, k, v: na2d(q.long(), k.long(), v.long(), 3), TypeError, ["query", "floating", "torch.int64"]),
    (lambda q, k, v: na2d(q, k.double(), v, 3), TypeError, ["dtype", "torch.float64"]),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(3, 5, 5)), ValueError, ["rpb", "[2, 5, 5]", "[3, 5, 5]"]),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3)), ValueError, ["rpb", "[2, 5, 5]", "[2, 3, 3]"]),
    (lambda q, k, v: na2d(q, k, v, 1.0), TypeError, ["kernel_size", "1.0", "float"]),
    (lambda q, k, v: na2d(q, k, v, 3, dilation=1.5), TypeError, ["dilation", "1.5"]),
    (lambda q, k, v: na2d(q[..., :0], k[..., :0], v[..., :0], 3), ValueError, ["head_dim", ">= 1", "(1, 9, 9, 2, 0)"]),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5, device="meta")), ValueError, ["rpb", "meta", "cpu"]),
    (lambda q, k, v: na2d(q, k.to("meta"), v, 3), ValueError, ["one device", "meta"]),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.long)), TypeError, ["rpb", "int64"]),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call(*_qkv())
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_backend_choice_and_overrides(monkeypatch, caplog):
    monkeypatch.setattr(functional, "_logged_choices", set())
    q, k, v = _qkv()
    rpb = torch.zeros(2, 5, 5)
    assert available_backends("cpu", has_rpb=True, needs_grad=True) == ["cpu_fused", "tiled", "reference"]
    assert available_backends("cuda", has_rpb=True)[0] == "flex"
    assert available_backends("cuda", has_rpb=False)[0] == "natten"
    with caplog.at_level(logging.INFO, logger="timm_nat.attention.functional"):
        expected = na2d_reference(q, k, v, (3, 3), (1, 1), rpb, 8 ** -0.5)
        with use_backend("reference"):
            torch.testing.assert_close(na2d(q, k, v, 3, rpb=rpb), expected, rtol=0, atol=0)
            na2d(q, k, v, 3, rpb=rpb)
    assert sum("'reference'" in r.getMessage() for r in caplog.records) == 1  # logged once
    monkeypatch.setenv("TIMM_NAT_ATTENTION_BACKEND", "natten")
    with pytest.raises(ValueError, match="no relative positional bias"):
        na2d(q, k, v, 3, rpb=rpb)
    with use_backend("tiled"):  # the context manager beats the environment
        na2d(q, k, v, 3, rpb=rpb)
    monkeypatch.setenv("TIMM_NAT_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        na2d(q, k, v, 3)
    monkeypatch.delenv("TIMM_NAT_ATTENTION_BACKEND")
    with use_backend("flex"), pytest.raises(ValueError, match="cannot run on cpu with autograd"):
        na2d(q.requires_grad_(), k, v, 3, rpb=rpb)


# --- odd inputs: empty dims, non-finite values, other rpb dtypes ------------------------------------

@pytest.mark.parametrize("shape", [(0, 9, 9, 2, 8), (2, 9, 9, 0, 8), (0, 9, 9, 0, 8)], ids=["batch0", "heads0", "both0"])
@pytest.mark.parametrize("backend", [None, "tiled", "reference"])
def test_empty_batch_or_heads(shape, backend):
    """An empty batch or no heads gives the empty result (and empty gradients), never a crash."""
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    rpb = torch.randn(shape[3], 5, 7, requires_grad=True)
    out = na2d(q, k, v, (3, 4), dilation=(2, 1), rpb=rpb, backend=backend)
    assert out.shape == shape and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == shape and not q.grad.any()
    assert rpb.grad is None or not rpb.grad.any()  # None: autograd's zero


@pytest.mark.parametrize("backend", ["natten", "flex"])
def test_empty_input_on_fused_backends_is_refused_clearly(backend):
    """Forced, they refuse (compiled CPU flex would kill the process); automatic choice skips them."""
    q = torch.randn(0, 9, 9, 2, 8)
    with pytest.raises(ValueError, match=rf"'{backend}' \(from the backend argument\) cannot run an empty input"
                                         r".*\(0, 9, 9, 2, 8\).*available: \['cpu_fused', 'tiled', 'reference'\]"):
        na2d(q, q, q, 3, backend=backend)


def test_empty_batch_through_a_model():
    model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                              kernel_size=3, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 5)
    model.train()
    model(torch.randn(0, 3, 64, 64)).sum().backward()


def _assert_same_with_nans(ours, expected, atol=1e-6):
    assert torch.equal(ours.isnan(), expected.isnan()), (
        f"NaN at {ours.isnan().sum().item()} places, expected {expected.isnan().sum().item()}")
    torch.testing.assert_close(ours, expected, rtol=0, atol=atol, equal_nan=True)


@pytest.mark.parametrize("backend, with_rpb", [("tiled", True), ("tiled", False), ("natten", False)])
def test_nonfinite_stays_in_its_windows(backend, with_rpb):
    """Issue 10 #2: one NaN in v[10, 10] on a 20x20 map, kernel 3, spoils the 9 outputs whose window
    holds it (legacy NATTEN, reference), not the 100 of dense tiles; likewise Inf in k and NaN in q."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 20, 2, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen) if with_rpb else None
    v[0, 10, 10, 0, 3] = float("nan")
    out = na2d(q, k, v, 3, rpb=rpb, backend=backend)
    spoiled = out.isnan().any(-1)  # [1, 20, 20, heads]
    assert spoiled.sum().item() == 9 and spoiled[0, 9:12, 9:12, 0].all()
    _assert_same_with_nans(out, na2d_reference(q, k, v, (3, 3), (1, 1), rpb, 8 ** -0.5))
    k[0, 0, 19, 1, 0] = float("inf")  # a corner: its window is clamped inwards
    k[0, 5, 5, 0, 1] = -float("inf")
    q[0, 15, 3, 1, 2] = float("nan")
    out = na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend=backend)
    _assert_same_with_nans(out, na2d_reference(q, k, v, (3, 3), (2, 1), rpb, 8 ** -0.5))
    assert 0 < out.isnan().sum().item() < out.numel() // 10


def test_gradients_around_a_nan_match_reference():
    """Gradients are the reference's too: exact away from the NaN (the zeroed copy passes them
    through), NaN exactly where the reference's backward (0 * NaN) makes them NaN."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, 12, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        v[0, 6, 6, 0, 0] = float("nan")
    grads = []
    for backend in ("tiled", "reference"):
        out = na2d(q, k, v, 3, backend=backend)
        grads.append(torch.autograd.grad(out[0, :3, :3].sum() + out[0, 5, 7].sum(), (q, k)))
    for ours, expected in zip(*grads):
        assert torch.equal(ours.isnan(), expected.isnan())
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert grads[0][0][0, :3, :3].abs().min() > 0


@pytest.mark.parametrize("backend", ["tiled", "reference", "flex"])
@pytest.mark.parametrize("rpb_dtype", [torch.float64, torch.bfloat16])
def test_rpb_of_another_dtype_is_cast(backend, rpb_dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 9, 9, 2, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen).to(rpb_dtype)
    expected = na2d_reference(q, k, v, (3, 3), (1, 1), rpb.float(), 8 ** -0.5)
    if backend == "flex":  # eager: the compiled kernel is covered by test_golden_flex_compiled
        out = na2d_flex(q, k, v, (3, 3), (1, 1), rpb, 8 ** -0.5, compile=False)
    else:
        out = na2d(q, k, v, 3, rpb=rpb, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# --- cached index plans ----------------------------------------------------------------------------

@pytest.fixture
def empty_plan_cache():
    tiled.grid_plan.cache_clear()
    tiled.axis_plan.cache_clear()
    yield
    tiled.grid_plan.cache_clear()
    tiled.axis_plan.cache_clear()


def _grads(out, *inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


def test_training_after_inference_mode_at_the_same_size(empty_plan_cache):
    """Issue 10 #4: plans cached under inference_mode must not be inference tensors."""
    q, k, v = (torch.randn(2, 11, 13, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 5, 5)
    with torch.inference_mode():
        na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb)
    q.requires_grad_()
    rpb.requires_grad_()
    ours = _grads(na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb, backend="tiled"), q, rpb)
    expected = _grads(na2d_reference(q, k, v, (3, 3), (2, 3), rpb, 8 ** -0.5), q, rpb)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_model_trains_after_an_inference_mode_run(empty_plan_cache):
    model = timm.create_model("dinat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                              kernel_size=3, dilations=((2,), (1,), (1,), (1,)), num_classes=5)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_meta_forward_gives_meta_output_and_leaves_the_cache_usable(empty_plan_cache):
    with torch.device("meta"):
        q = torch.randn(2, 14, 10, 2, 8)
        out = na2d(q, q, q, 5, dilation=2, rpb=torch.randn(2, 9, 9))
    assert out.device.type == "meta" and out.shape == q.shape
    q, k, v = (torch.randn(2, 14, 10, 2, 8) for _ in range(3))
    rpb = torch.randn(2, 9, 9)
    # each output is a softmax-weighted mean of 25 values of v (|v| < 5), summed in another order than the
    # reference: a few float32 ulps of max |v| (1.2e-6 at worst over 200 seeds), so fp32's defaults hold
    torch.testing.assert_close(na2d(q, k, v, 5, dilation=2, rpb=rpb, backend="tiled"),
                               na2d_reference(q, k, v, (5, 5), (2, 2), rpb, 8 ** -0.5), rtol=1.3e-6, atol=1e-5)


# --- backend choice -----------------------------------------------------------------------------------

def test_use_backend_blocks_nest_and_may_leave_out_of_order(monkeypatch):
    monkeypatch.setenv("TIMM_NAT_ATTENTION_BACKEND", "reference")
    assert select_backend("cpu", has_rpb=True) == "reference"
    outer, inner = use_backend("flex"), use_backend("tiled")
    outer.__enter__()
    inner.__enter__()
    assert select_backend("cpu", has_rpb=True) == "tiled"
    outer.__exit__(None, None, None)  # left first: the inner block stays in force
    assert select_backend("cpu", has_rpb=True) == "tiled"
    inner.__exit__(None, None, None)  # nothing forced is left behind
    assert select_backend("cpu", has_rpb=True) == "reference"


def test_use_backend_none_is_automatic_despite_the_environment(monkeypatch):
    monkeypatch.setenv("TIMM_NAT_ATTENTION_BACKEND", "natten")
    q = torch.randn(1, 9, 9, 2, 8)
    rpb = torch.zeros(2, 5, 5)
    with pytest.raises(ValueError, match=r"'natten' \(from \$TIMM_NAT_ATTENTION_BACKEND\) has no relative"):
        na2d(q, q, q, 3, rpb=rpb)
    with use_backend(None):
        assert select_backend("cpu", has_rpb=True) == "cpu_fused"
        na2d(q, q, q, 3, rpb=rpb)
        with use_backend("reference"), use_backend(None):  # also beats an outer block
            assert select_backend("cpu", has_rpb=True) == "cpu_fused"


def test_backend_argument_beats_use_backend_and_environment(monkeypatch):
    monkeypatch.setenv("TIMM_NAT_ATTENTION_BACKEND", "flex")
    q, k, v = _qkv()
    rpb = torch.randn(2, 5, 5)
    expected = na2d_reference(q, k, v, (3, 3), (1, 1), rpb, 8 ** -0.5)
    with use_backend("natten"):
        torch.testing.assert_close(na2d(q, k, v, 3, rpb=rpb, backend="reference"), expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"unknown attention backend 'fast' \(from the backend argument\)"):
            na2d(q, k, v, 3, backend="fast")


def test_refused_backend_falls_back_to_the_next_that_can_run(monkeypatch):
    """Preference natten, flex, tiled, reference with autograd on CPU: natten and flex cannot run;
    when tiled refuses the input, the next one that can run is reference (not available[1])."""
    monkeypatch.setattr(backends, "_PREFERENCE", {"cpu": ("natten", "flex", "tiled", "reference")})
    refused = []

    def refuse(*args):
        refused.append("tiled")
        raise backends.Unsupported("no kernel for this shape")

    monkeypatch.setattr(backends.BACKENDS["tiled"], "run", refuse)
    q, k, v = (t.requires_grad_() for t in _qkv())
    assert available_backends("cpu", has_rpb=False, needs_grad=True) == ["tiled", "reference"]
    out = na2d(q, k, v, 3)
    assert refused == ["tiled"]
    torch.testing.assert_close(out, na2d_reference(q, k, v, (3, 3), (1, 1), None, 8 ** -0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'tiled' refused this input: no kernel for this shape"):
        na2d(q, k, v, 3, backend="tiled")


def test_every_backend_has_a_can_run_check():
    names = set(backends.BACKENDS)
    assert names == {"natten", "flex", "cpu_fused", "tiled", "reference"}
    for device in ("cpu", "cuda", "meta"):
        assert set(backends.preference(torch.device(device))) == names
    empty = torch.empty(0, 9, 9, 1, 8)
    assert [n for n in names if backends.BACKENDS[n].can_run(empty, False, False)] == sorted(
        ["cpu_fused", "tiled", "reference"], key=[n for n in names].index)
    assert available_backends("meta", has_rpb=True) == ["tiled", "reference"]


# --- the window rule ---------------------------------------------------------------------------------

def test_window_start_takes_int_or_tensor_sub_length():
    """One rule for tiled, reference and flex (which passes tensors): centred, clamped inwards."""
    for length, kernel, dilation in [(9, 3, 1), (23, 3, 3), (17, 5, 2), (10, 5, 2)]:
        pos = torch.arange(length)
        group, sub = pos % dilation, pos // dilation
        tensor_rule = window_start(sub, subgrid_length(length, dilation, group), kernel)
        for g in range(dilation):
            n = subgrid_length(length, dilation, g)
            assert torch.equal(window_start(sub[group == g], n, kernel), tensor_rule[group == g])
            expected = [min(max(p - kernel // 2, 0), n - kernel) for p in range(n)]
            assert tensor_rule[group == g].tolist() == expected
        keys, _ = neighborhood_1d(length, kernel, dilation)
        assert torch.equal(keys[:, 0], group + dilation * tensor_rule)


def test_axis_plan_called_under_inference_mode_caches_plain_tensors(empty_plan_cache):
    with torch.inference_mode():
        plan = tiled.axis_plan(13, 3, 2, 4)
    assert not any(t.is_inference() for t in plan)
    assert all(t.device.type == "cpu" for t in plan)


# --- scale: one rule for every backend ---------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "cpu_fused", "tiled", "reference", "natten", "flex"])
@pytest.mark.parametrize("scale", [torch.tensor(0.5), torch.tensor(0.5, requires_grad=True), "0.5", True],
                         ids=["tensor", "tensor_with_grad", "str", "bool"])
def test_scale_must_be_a_real_number(backend, scale):
    """Checked up front, whichever backend would run: a tensor scale lost its gradient on cpu_fused,
    raised on tiled, was differentiated by the reference; a string was accepted."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"scale must be None or a real number \(int or float\), "
                                        rf"got .*\({type(scale).__name__}\)"):
        na2d(q, k, v, 3, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", [None, "cpu_fused", "tiled", "reference"])
def test_scale_may_be_an_int_or_numpy_float(backend):
    import numpy as np
    gen = torch.Generator().manual_seed(20)
    q, k, v = (torch.randn(1, 9, 9, 2, 8, generator=gen) for _ in range(3))
    expected = na2d_reference(q, k, v, (3, 3), (1, 1), None, 2.0)
    for scale in (2, np.float64(2.0)):
        torch.testing.assert_close(na2d(q, k, v, 3, scale=scale, backend=backend), expected, rtol=0, atol=2e-6)
