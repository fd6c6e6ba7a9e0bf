"""The fused CPU na2d kernel against the legacy NATTEN golden cases and the gather reference.

The extension must build here (CI has a C++ compiler): a build failure fails these tests.
"""
import logging
import random

import pytest
import torch

from timm_nat.attention import cpu_fused
from timm_nat.attention.cpu_fused import na2d_cpu_fused
from timm_nat.attention.reference import na2d_reference

from conftest import assert_close as _assert_close


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build (or load) the extension once per session; fail, never skip, if it does not build."""
    if not cpu_fused.is_available():
        pytest.fail(f"fused CPU na2d extension did not build: {cpu_fused._load()}")


def _forward_and_grads(q, k, v, kernel, dilation, rpb, scale, grad_out, fn=na2d_cpu_fused):
    """Output and the gradients of (out * grad_out).sum() w.r.t. q, k, v (and rpb, if given)."""
    out = fn(q, k, v, kernel, dilation, rpb, scale)
    inputs = (q, k, v) + ((rpb,) if rpb is not None else ())
    return (out, *torch.autograd.grad((out * grad_out).sum(), inputs))


def test_golden_forward_and_gradients(golden_cases):
    to_ours = lambda x: x.permute(0, 2, 3, 1, 4).contiguous()  # golden [B, heads, H, W, D]
    to_golden = lambda x: x.permute(0, 3, 1, 2, 4)
    for case, t in golden_cases:
        kernel, dilation = (case["kernel_size"],) * 2, tuple(case["dilation"])
        q, k, v = (to_ours(t[n]).requires_grad_() for n in "qkv")
        rpb = t["rpb"].clone().requires_grad_()
        out, dq, dk, dv, drpb = _forward_and_grads(q, k, v, kernel, dilation, rpb, case["scale"],
                                                   to_ours(t["grad_out"]))
        for name, ours, expected in (("out", to_golden(out), t["out"]), ("dq", to_golden(dq), t["dq"]),
                                     ("dk", to_golden(dk), t["dk"]), ("dv", to_golden(dv), t["dv"]),
                                     ("drpb", drpb, t["drpb"])):
            _assert_close(f"case{case['case']}.{name}", ours, expected)
        with torch.no_grad():
            out_norpb = na2d_cpu_fused(q, k, v, kernel, dilation, None, case["scale"])
        _assert_close(f"case{case['case']}.out_norpb", to_golden(out_norpb), t["out_norpb"])


def _random_configs(count, dims, seed):
    """Rectangular maps, per-axis kernels and dilations, maps exactly kernel*dilation (every 4th),
    sizes that are not multiples of the dilation."""
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kernel = (rng.choice([2, 3, 5, 7]), rng.choice([3, 4, 5, 9]))
        dilation = (rng.randint(1, 4), rng.randint(1, 3))
        size = [k * d + (0 if i % 4 == 0 else rng.randint(1, 9)) for k, d in zip(kernel, dilation)]
        configs.append(dict(batch=rng.randint(1, 2), height=size[0], width=size[1], heads=rng.randint(1, 3),
                            dim=dims[i % len(dims)], kernel=kernel, dilation=dilation))
    return configs


def _inputs(config, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (config["batch"], config["height"], config["width"], config["heads"], config["dim"])
    q, k, v, grad_out = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4))
    kh, kw = config["kernel"]
    rpb = torch.randn(config["heads"], 2 * kh - 1, 2 * kw - 1, generator=gen, dtype=dtype)
    return q, k, v, rpb, grad_out


_CONFIG_ID = "{height}x{width}-k{kernel}-d{dilation}-dim{dim}".format


@pytest.mark.parametrize("config", _random_configs(16, dims=[4, 8, 5, 16], seed=1), ids=lambda c: _CONFIG_ID(**c))
def test_matches_reference_fp64(config):
    """fp64 (the any-head_dim path, incl. a head_dim that is no multiple of the vector width)."""
    q, k, v, rpb, grad_out = (t.requires_grad_(i < 4) for i, t in enumerate(_inputs(config, torch.float64, 2)))
    scale = config["dim"] ** -0.5
    ours = _forward_and_grads(q, k, v, config["kernel"], config["dilation"], rpb, scale, grad_out)
    ref = _forward_and_grads(q, k, v, config["kernel"], config["dilation"], rpb, scale, grad_out, na2d_reference)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("config", _random_configs(8, dims=[16, 32, 64, 12], seed=3), ids=lambda c: _CONFIG_ID(**c))
def test_matches_reference_fp32(config):
    """fp32, whose head_dims 16/32/64 run the register paths (1, 2, 4 AVX-512 vectors), 12 the buffer path;
    against the fp64 reference, the golden bound."""
    q, k, v, rpb, grad_out = (t.requires_grad_(i < 4) for i, t in enumerate(_inputs(config, torch.float32, 4)))
    scale = config["dim"] ** -0.5
    ours = _forward_and_grads(q, k, v, config["kernel"], config["dilation"], rpb, scale, grad_out)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = _forward_and_grads(*wide[:3], config["kernel"], config["dilation"], wide[3], scale, grad_out.double(),
                             na2d_reference)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref):
        _assert_close(name, a.double(), b)


def test_gradcheck():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 7, 6, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: na2d_cpu_fused(*x[:3], (3, 2), (2, 3), x[3], 0.7), (q, k, v, rpb))


def test_strided_inputs_and_optional_grads():
    """q, k, v as views of one fused qkv tensor (what the model passes); rpb without grad, and no rpb."""
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 11, 10, 3, 2, 32, generator=gen, requires_grad=True)
    rpb = torch.randn(2, 9, 9, generator=gen)
    grad_out = torch.randn(2, 11, 10, 2, 32, generator=gen)
    for table in (rpb, None):
        out = na2d_cpu_fused(*qkv.unbind(3), (5, 5), (2, 1), table, 0.2)
        (grad,) = torch.autograd.grad((out * grad_out).sum(), qkv)
        dense = qkv.detach().contiguous().requires_grad_()
        ref = na2d_reference(*dense.unbind(3), (5, 5), (2, 1), table, 0.2)
        (ref_grad,) = torch.autograd.grad((ref * grad_out).sum(), dense)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=2e-5)


def test_bf16_within_one_rounding():
    """bf16 inputs are widened, computed in fp32 and rounded once: against fp32 math on the same
    (bf16) values, every element is within half a bf16 ulp (<= 2**-8 relative) plus fp32 noise."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, grad_out = (torch.randn(2, 15, 13, 2, 32, generator=gen).bfloat16() for _ in range(4))
    rpb = torch.randn(2, 9, 9, generator=gen)  # fp32, as under autocast (a parameter)
    low = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    ours = _forward_and_grads(*low[:3], (5, 5), (2, 1), low[3], 0.25, grad_out)
    assert [t.dtype for t in ours] == [torch.bfloat16] * 4 + [torch.float32]
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = _forward_and_grads(*wide[:3], (5, 5), (2, 1), wide[3], 0.25, grad_out.double(), na2d_reference)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref):
        err = (a.double() - b).abs()
        assert (err <= 2**-8 * b.abs() + 1e-5).all(), f"{name}: max abs diff {err.max().item():.3g}"


@pytest.mark.parametrize("tensor", ["query", "key", "value"])
def test_nan_exactly_where_the_window_holds_one(tensor):
    gen = torch.Generator().manual_seed(8)
    inputs = dict(zip(("query", "key", "value"), (torch.randn(1, 12, 11, 2, 8, generator=gen) for _ in range(3))))
    inputs[tensor][0, 0, 5, 1, 3] = float("nan")
    inputs[tensor][0, 9, 10, 0, 0] = float("nan")
    rpb = torch.randn(2, 5, 5, generator=gen)
    ours = na2d_cpu_fused(*inputs.values(), (3, 3), (2, 1), rpb, 0.3)
    ref = na2d_reference(*inputs.values(), (3, 3), (2, 1), rpb, 0.3)
    assert ours.isnan().any()
    assert torch.equal(ours.isnan(), ref.isnan())
    torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num(), rtol=0, atol=1e-6)


def test_empty_batch():
    q, k, v = (torch.zeros(0, 9, 9, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.zeros(2, 5, 5, requires_grad=True)
    out = na2d_cpu_fused(q, k, v, (3, 3), (1, 1), rpb, 0.5)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(rpb.grad, torch.zeros_like(rpb))


def test_can_run():
    q = torch.zeros(1, 9, 9, 2, 8)
    assert cpu_fused.can_run(q, has_rpb=True, needs_grad=True)
    assert cpu_fused.can_run(q.bfloat16(), has_rpb=False, needs_grad=False)
    assert not cpu_fused.can_run(q.to("meta"), has_rpb=True, needs_grad=False)
    assert not cpu_fused.can_run(q.to(torch.complex64), has_rpb=True, needs_grad=False)


def test_no_compiler_means_one_log_line_and_no_kernel(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    reason = cpu_fused._load.__wrapped__()
    assert reason == "no C++ compiler ('no-such-compiler-here' not on PATH)"
    monkeypatch.setattr(cpu_fused, "_load", lambda: reason)
    monkeypatch.setattr(cpu_fused, "_availability", None)
    with caplog.at_level(logging.WARNING, logger="timm_nat.attention.cpu_fused"):
        assert not cpu_fused.is_available() and not cpu_fused.is_available()
        assert not cpu_fused.can_run(torch.zeros(1, 9, 9, 2, 8), has_rpb=True, needs_grad=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"na2d: fused CPU kernel unavailable ({reason}); the 'tiled' backend is used instead"]


def test_torch_compile_fullgraph():
    """The op traces (fake kernels registered, availability a constant): compiled fwd+bwd equals eager."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 10, 9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, requires_grad=True)
    grad_out = torch.randn(1, 10, 9, 2, 16, generator=gen)
    compiled = torch.compile(na2d_cpu_fused, fullgraph=True, backend="aot_eager")
    ours = _forward_and_grads(q, k, v, (3, 3), (2, 1), rpb, 0.25, grad_out, fn=compiled)
    eager = _forward_and_grads(q, k, v, (3, 3), (2, 1), rpb, 0.25, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), ours, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
