"""The fused CPU na2d kernel against the legacy NATTEN golden cases and the gather reference.

The extension must build here (CI has a C++ compiler): a build failure fails these tests.
"""
import contextlib
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_nat.attention import available_backends, cpu_fused, na2d
from timm_nat.attention.cpu_fused import na2d_cpu_fused
from timm_nat.attention.reference import na2d_reference

from conftest import assert_close as _assert_close

_ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("batch,height,dilation", [(1, 40, (1, 1)), (1, 37, (2, 3)), (3, 23, (3, 1)), (1, 9, (1, 2))])
def test_backward_is_the_same_at_every_thread_count(batch, height, dilation):
    """The backward splits (image, row dilation group) into bands of key rows when they are fewer
    than the threads, each band recomputing its halo query rows' (p, dlogits) pairs in a ring: dq,
    dk, dv are bitwise the same at 1-5 threads (each element has one owner and one summation order)
    and equal the fp64 reference; drpb is summed per band, so only to rounding."""
    gen = torch.Generator().manual_seed(8)
    kernel = (3, 5)
    q, k, v, grad_out = (torch.randn(batch, height, 31, 2, 16, generator=gen) for _ in range(4))
    rpb = torch.randn(2, 5, 9, generator=gen)
    inputs = [t.requires_grad_() for t in (q, k, v, rpb)]
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results[threads] = _forward_and_grads(*inputs[:3], kernel, dilation, inputs[3], 0.25, grad_out)
    finally:
        torch.set_num_threads(previous)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    ref = _forward_and_grads(*wide[:3], kernel, dilation, wide[3], 0.25, grad_out.double(), na2d_reference)
    for threads, ours in results.items():
        for name, a, b, single in zip(("out", "dq", "dk", "dv", "drpb"), ours, ref, results[1]):
            _assert_close(f"{threads} threads {name}", a.double(), b)
            if name != "drpb":
                assert torch.equal(a, single), f"{name} at {threads} threads differs from 1 thread"


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


def test_no_compiler_means_one_log_line_and_no_kernel(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    reason = cpu_fused._load.__wrapped__()
    assert reason == "no C++ compiler ('no-such-compiler-here' not on PATH)"
    monkeypatch.setattr(cpu_fused, "_load", lambda: reason)
    monkeypatch.setattr(cpu_fused, "_availability", None)
    with caplog.at_level(logging.WARNING, logger="timm_nat.attention.cpu_fused"):
        assert not cpu_fused.is_available() and not cpu_fused.is_available()
        assert "cpu_fused" not in available_backends("cpu", has_rpb=True, needs_grad=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"na2d: fused CPU kernel unavailable ({reason}); the 'tiled' backend is used instead"]


def test_a_compiler_command_with_arguments_is_a_compiler(monkeypatch):
    """CXX="ccache g++": only the first word must be on PATH (env stands in for ccache here)."""
    monkeypatch.setenv("CXX", "env c++")
    built = []
    monkeypatch.setattr(cpu_fused, "_load_library", lambda *args: built.append(args))
    assert cpu_fused._load.__wrapped__() is None
    assert len(built) == 1


def test_a_failed_load_means_unavailable_and_na2d_falls_back_to_tiled(monkeypatch):
    """A library that loads but does not run the ops (here: the smoke call fails) is "unavailable",
    never an "operator does not exist" from na2d."""
    def no_kernel():
        raise NotImplementedError("Could not run 'timm_nat_na2d::forward' with arguments from the 'CPU' backend.")
    monkeypatch.setattr(cpu_fused, "_smoke_test", no_kernel)
    reason = cpu_fused._load.__wrapped__()
    assert reason is not None and "Could not run 'timm_nat_na2d::forward'" in reason
    monkeypatch.setattr(cpu_fused, "_load", lambda: reason)
    monkeypatch.setattr(cpu_fused, "_availability", None)
    assert available_backends("cpu", has_rpb=True, needs_grad=True) == ["tiled", "reference"]
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 9, 8, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen)
    torch.testing.assert_close(na2d(q, k, v, 3, rpb=rpb), na2d_reference(q, k, v, (3, 3), (1, 1), rpb, 8 ** -0.5),
                               rtol=0, atol=2e-6)


def test_build_name_hashes_source_flags_compiler():
    name = cpu_fused._extension_name(b"source", ["-O3"], "c++")
    assert name.startswith("timm_nat_na2d_cpu_") and name == cpu_fused._extension_name(b"source", ["-O3"], "c++")
    others = {cpu_fused._extension_name(b"source2", ["-O3"], "c++"), cpu_fused._extension_name(b"source", ["-O2"], "c++"),
              cpu_fused._extension_name(b"source", ["-O3", "-mavx2"], "c++"),
              cpu_fused._extension_name(b"source", ["-O3"], "ccache c++")}
    assert len(others) == 4 and name not in others


def _run_python(code, extensions_dir, prefix=()):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), PYTHONPATH=str(_ROOT),
               CUDA_HOME=str(extensions_dir))  # a CUDA_HOME on a machine without a GPU: torch would say so
    return subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


_RUN_NA2D_ONCE = """
import os, torch
from timm_nat.attention import cpu_fused, na2d
q = torch.randn(1, 9, 9, 2, 8, requires_grad=True)
na2d(q, q, q, 3).sum().backward()
assert cpu_fused.is_available(), cpu_fused._load()
print("OK")
"""
_CACHE_IS_READ_ONLY = """
import os
root = os.environ["TORCH_EXTENSIONS_DIR"]
assert not any(os.access(d, os.W_OK) for d in (root, *(os.path.join(root, n) for n in os.listdir(root)))), \
    "could not make the cache read-only"
"""


@contextlib.contextmanager
def _read_only(directory):
    """A command prefix under which ``directory`` is read-only: file modes for a normal user; for
    root, whom modes do not stop, a read-only bind mount in a private user and mount namespace."""
    if os.geteuid() == 0:
        yield ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
               str(directory)]
        return
    paths = [directory, *directory.iterdir()]
    modes = {path: path.stat().st_mode for path in paths}
    try:
        for path in paths:
            path.chmod(0o555)
        yield []
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_first_build_says_so_then_a_read_only_cache_is_loaded(tmp_path):
    """In fresh processes: a first build logs one WARNING naming its directory (and no torch
    "No CUDA runtime" line); then, with the directory read-only, the build is loaded as it is."""
    first = _run_python(_RUN_NA2D_ONCE, tmp_path)
    assert first.returncode == 0 and first.stdout.strip() == "OK", first.stderr
    (build,) = tmp_path.iterdir()
    assert (build / f"{build.name}.so").is_file()
    assert f"building the fused CPU attention kernel (about 20 s, once per torch version and kernel source); " \
           f"cached in {build}" in first.stderr
    assert first.stderr.count("building the fused CPU") == 1 and "No CUDA runtime" not in first.stderr
    with _read_only(tmp_path) as prefix:
        second = _run_python(_CACHE_IS_READ_ONLY + _RUN_NA2D_ONCE, tmp_path, prefix)
    assert second.returncode == 0 and second.stdout.strip() == "OK", second.stderr
    assert "building" not in second.stderr and "unavailable" not in second.stderr
    assert "No CUDA runtime" not in second.stderr


# --- the double backward ----------------------------------------------------------------------------

def _hessian_vector_products(fn, inputs, grad_out, directions):
    """d/d(inputs) of sum_i <d(out . grad_out)/d(input_i), direction_i> (a gradient penalty's form)."""
    q, k, v, rpb = inputs
    out = fn(q, k, v, (3, 2), (2, 1), rpb, 0.4)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs, create_graph=True)
    penalty = sum((g * d).sum() for g, d in zip(grads, directions))
    return torch.autograd.grad(penalty, inputs)


def test_double_backward_matches_reference():
    """create_graph=True then a second grad: equal to the gather reference's, for q, k, v and rpb
    (it was all zeros: the fused backward op has no autograd kernel)."""
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(2, 7, 5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    inputs.append(torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True))
    grad_out = torch.randn(2, 7, 5, 2, 3, generator=gen, dtype=torch.float64)
    directions = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
    ours = _hessian_vector_products(na2d_cpu_fused, inputs, grad_out, directions)
    expected = _hessian_vector_products(na2d_reference, inputs, grad_out, directions)
    for name, a, b in zip(("q", "k", "v", "rpb"), ours, expected):
        assert b.abs().max() > 0.1, name  # a real second derivative, not a vacuous zero
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gradgradcheck():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 4, 4, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *x: na2d_cpu_fused(*x[:3], (2, 2), (2, 1), x[3], 0.7), (q, k, v, rpb))


def test_bf16_double_backward_keeps_dtypes():
    """Through na2d (cpu_fused by default) with bf16 inputs and an fp32 rpb: first-order gradients in
    the inputs' dtypes, second order equal to fp32 math on the same values within bf16 rounding."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 6, 6, 2, 4, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, requires_grad=True)
    out = na2d(q, k, v, 3, rpb=rpb, backend="cpu_fused")
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, rpb), create_graph=True)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
    (second,) = torch.autograd.grad(sum(g.float().square().sum() for g in grads), rpb)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref_out = na2d_reference(*wide[:3], (3, 3), (1, 1), wide[3], 4 ** -0.5)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), wide, create_graph=True)
    (expected,) = torch.autograd.grad(sum(g.square().sum() for g in ref_grads), wide[3])
    assert second.abs().max() > 0.1
    torch.testing.assert_close(second.double(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


# --- the op's own argument checks -------------------------------------------------------------------

def _op_arguments(**changes):
    """Valid arguments of the forward and backward ops ([1, 9, 8, 2, 4] fp32, kernel (3, 2), dilation
    (2, 3)), with ``changes`` applied to both where they apply."""
    gen = torch.Generator().manual_seed(14)
    q, k, v, grad_out = (torch.randn(1, 9, 8, 2, 4, generator=gen) for _ in range(4))
    args = dict(query=q, key=k, value=v, rpb=torch.randn(2, 5, 3, generator=gen), kernel_size=[3, 2],
                dilation=[2, 3], scale=0.5)
    _, lse = torch.ops.timm_nat_na2d.forward(*args.values())
    args.update(changes)
    forward = [args[n] for n in ("query", "key", "value", "rpb", "kernel_size", "dilation", "scale")]
    backward = dict(grad_out=grad_out, lse=lse, rpb_grad=True)
    backward.update({n: v for n, v in changes.items() if n in backward})
    backward_args = [backward["grad_out"], *forward[:3], backward["lse"], *forward[3:], backward["rpb_grad"]]
    return forward, backward_args


_BAD_OP_ARGUMENTS = {
    "rpb_too_small": (dict(rpb=torch.zeros(2, 3, 3)), r"rpb must be \[heads, 2\*kh-1, 2\*kw-1\] = \[2, 5, 3\], got \[2, 3, 3\]"),
    "rpb_other_dtype": (dict(rpb=torch.zeros(2, 5, 3, dtype=torch.float64)),
                        "rpb must be float32 or have query's dtype Float, got Double"),
    "key_other_shape": (dict(key=torch.zeros(1, 9, 8, 2, 5)), r"key must have query's shape \[1, 9, 8, 2, 4\]"),
    "value_other_dtype": (dict(value=torch.zeros(1, 9, 8, 2, 4, dtype=torch.float64)), "value must have query's dtype"),
    "query_4d": (dict(query=torch.zeros(9, 8, 2, 4)), r"query must be \[B, H, W, heads, D\]"),
    "query_int": (dict(query=torch.zeros(1, 9, 8, 2, 4, dtype=torch.int32)),
                  "query must be float32, float64, bfloat16 or float16, got Int"),
    "dilation_0": (dict(dilation=[0, 1]), r"dilation must be >= 1, got \[0, 1\]"),
    "kernel_0": (dict(kernel_size=[0, 2]), r"kernel_size must be >= 1, got \[0, 2\]"),
    "kernel_negative": (dict(kernel_size=[3, -1]), r"kernel_size must be >= 1, got \[3, -1\]"),
    "kernel_times_dilation_overflows": (dict(kernel_size=[2, 2], dilation=[2**62 + 1, 1]),
                                        "height 9 is smaller than kernel_size \\* dilation"),
    "kernel_times_dilation_too_wide": (dict(dilation=[2, 5]), "width 8 is smaller than kernel_size \\* dilation"),
    "kernel_triple": (dict(kernel_size=[3, 2, 1]), "kernel_size must have 2 entries"),
}
_BAD_BACKWARD_ARGUMENTS = {
    "lse_other_shape": (dict(lse=torch.zeros(1, 9, 8, 1)), r"lse must be \[B, H, W, heads\] = \[1, 9, 8, 2\], got \[1, 9, 8, 1\]"),
    "lse_strided": (dict(lse=torch.zeros(1, 9, 8, 4)[..., ::2]), "lse must be contiguous"),
    "lse_other_dtype": (dict(lse=torch.zeros(1, 9, 8, 2, dtype=torch.float64)),
                        "lse must be a CPU tensor of query's accumulation dtype Float, got Double"),
    "grad_out_other_shape": (dict(grad_out=torch.zeros(1, 9, 7, 2, 4)), r"grad_out must have query's shape \[1, 9, 8, 2, 4\]"),
    "grad_out_other_dtype": (dict(grad_out=torch.zeros(1, 9, 8, 2, 4, dtype=torch.float64)), "grad_out must have query's dtype"),
}


@pytest.mark.parametrize("case", list(_BAD_OP_ARGUMENTS), ids=str)
def test_op_checks_its_arguments(case):
    """Called directly (the op is public), a bad argument is a RuntimeError naming it, in both ops."""
    changes, message = _BAD_OP_ARGUMENTS[case]
    forward, backward = _op_arguments(**changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.timm_nat_na2d.forward(*forward)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.timm_nat_na2d.backward(*backward)


@pytest.mark.parametrize("case", list(_BAD_BACKWARD_ARGUMENTS), ids=str)
def test_backward_op_checks_its_arguments(case):
    changes, message = _BAD_BACKWARD_ARGUMENTS[case]
    _, backward = _op_arguments(**changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.timm_nat_na2d.backward(*backward)


def test_op_accepts_kernel_one():
    """kernel 1 (below na2d's legacy minimum of 2) is still valid math for the op: each query sees its own key."""
    forward, _ = _op_arguments(kernel_size=[1, 1], rpb=torch.zeros(2, 1, 1))
    out, _ = torch.ops.timm_nat_na2d.forward(*forward)
    torch.testing.assert_close(out, forward[2], rtol=0, atol=0)


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


# --- bf16 / fp16: the native path ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", _random_configs(6, dims=[32, 12, 16, 5], seed=21), ids=lambda c: _CONFIG_ID(**c))
def test_low_precision_is_the_fp32_kernel_rounded_once(dtype, config):
    """bf16/fp16 q, k, v, grad_out (rpb fp32, as under autocast) are read as they are and computed in
    fp32: out, dq, dk, dv are exactly the fp32 kernel's results on the same values, rounded once, and
    drpb (fp32) is exactly its drpb; register (32, 16) and buffer (12, 5) head_dims, dilations, rectangles."""
    q, k, v, rpb, grad_out = _inputs(config, torch.float32, 22)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    args = (config["kernel"], config["dilation"])
    scale = config["dim"] ** -0.5
    low = _forward_and_grads(*(t.clone().requires_grad_() for t in (q, k, v)), *args, rpb.clone().requires_grad_(),
                             scale, grad_out)
    wide = _forward_and_grads(*(t.float().requires_grad_() for t in (q, k, v)), *args, rpb.clone().requires_grad_(),
                              scale, grad_out.float())
    assert [t.dtype for t in low] == [dtype] * 4 + [torch.float32]
    for name, a, b in zip(("out", "dq", "dk", "dv"), low, wide):
        assert torch.equal(a, b.to(dtype)), f"{name}: max abs diff {(a.float() - b.to(dtype).float()).abs().max():.3g}"
    assert torch.equal(low[4], wide[4]), "drpb"
    reference = _forward_and_grads(*(t.double().requires_grad_() for t in (q, k, v)), *args,
                                   rpb.double().requires_grad_(), scale, grad_out.double(), na2d_reference)
    half_ulp = 2**-9 if dtype == torch.bfloat16 else 2**-12  # relative rounding bound, plus fp32 noise
    for name, a, b in zip(("out", "dq", "dk", "dv"), low, reference):
        err = (a.double() - b).abs()
        assert (err <= 2 * half_ulp * b.abs() + 1e-5).all(), f"{name}: max abs diff {err.max().item():.3g}"


@pytest.mark.parametrize("rpb_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_makes_no_widened_copies(rpb_dtype):
    """bf16 q, k, v with an fp32 (autocast's parameter) or bf16 rpb: forward and backward copy no
    tensor of q's shape to another dtype (the kernel used to widen q, k, v, grad_out to fp32 and
    round its outputs back)."""
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 9, 10, 2, 16, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen).to(rpb_dtype).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = na2d_cpu_fused(q, k, v, (3, 3), (2, 1), rpb, 0.25)
        grads = torch.autograd.grad(out, (q, k, v, rpb), torch.ones_like(out))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [rpb_dtype]
    copies = [e for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_") and list(q.shape) in e.input_shapes]
    assert not copies, [(e.name, e.input_shapes) for e in copies]


def test_op_takes_low_precision_maps_with_an_fp32_or_own_dtype_rpb():
    """The op itself: bf16/fp16 maps, rpb fp32 or the maps' dtype, logsumexp fp32; outputs in the maps'
    dtype, drpb in rpb's."""
    gen = torch.Generator().manual_seed(24)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, grad_out = (torch.randn(1, 9, 8, 2, 4, generator=gen).to(dtype) for _ in range(4))
        for rpb in (torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen).to(dtype)):
            out, lse = torch.ops.timm_nat_na2d.forward(q, k, v, rpb, [3, 2], [2, 3], 0.5)
            assert out.dtype == dtype and lse.dtype == torch.float32
            grads = torch.ops.timm_nat_na2d.backward(grad_out, q, k, v, lse, rpb, [3, 2], [2, 3], 0.5, True)
            assert [g.dtype for g in grads] == [dtype] * 3 + [rpb.dtype]
            expected = na2d_reference(q.float(), k.float(), v.float(), (3, 2), (2, 3), rpb.float(), 0.5)
            torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-5)


_BF16 = dict(query=torch.zeros(1, 9, 8, 2, 4, dtype=torch.bfloat16), key=torch.zeros(1, 9, 8, 2, 4, dtype=torch.bfloat16),
             value=torch.zeros(1, 9, 8, 2, 4, dtype=torch.bfloat16), grad_out=torch.zeros(1, 9, 8, 2, 4, dtype=torch.bfloat16),
             lse=torch.zeros(1, 9, 8, 2))
_BAD_LOW_PRECISION_ARGUMENTS = {
    "rpb_fp16_with_bf16_query": (dict(_BF16, rpb=torch.zeros(2, 5, 3, dtype=torch.float16)),
                                 "rpb must be float32 or have query's dtype BFloat16, got Half"),
    "rpb_fp64_with_bf16_query": (dict(_BF16, rpb=torch.zeros(2, 5, 3, dtype=torch.float64)),
                                 "rpb must be float32 or have query's dtype BFloat16, got Double"),
    "key_fp16_with_bf16_query": (dict(_BF16, key=torch.zeros(1, 9, 8, 2, 4, dtype=torch.float16)),
                                 "key must have query's dtype BFloat16, got Half"),
    "value_fp32_with_bf16_query": (dict(_BF16, value=torch.zeros(1, 9, 8, 2, 4)), "value must have query's dtype BFloat16"),
}


@pytest.mark.parametrize("case", list(_BAD_LOW_PRECISION_ARGUMENTS), ids=str)
def test_op_checks_low_precision_arguments(case):
    changes, message = _BAD_LOW_PRECISION_ARGUMENTS[case]
    forward, backward = _op_arguments(**changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.timm_nat_na2d.forward(*forward)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.timm_nat_na2d.backward(*backward)


@pytest.mark.parametrize("lse_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_backward_op_wants_an_fp32_lse_for_bf16_maps(lse_dtype):
    _, backward = _op_arguments(**dict(_BF16, rpb=torch.zeros(2, 5, 3), lse=torch.zeros(1, 9, 8, 2, dtype=lse_dtype)))
    with pytest.raises(RuntimeError, match=f"lse must be a CPU tensor of query's accumulation dtype Float, got "
                                           f"{'BFloat16' if lse_dtype == torch.bfloat16 else 'Double'}"):
        torch.ops.timm_nat_na2d.backward(*backward)


def test_fake_kernels_give_the_logsumexp_in_the_compute_dtype():
    """torch.compile's shapes: the fake forward's logsumexp is fp32 for bf16 maps, as the kernel's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(1, 9, 8, 2, 4, dtype=torch.bfloat16)
        out, lse = torch.ops.timm_nat_na2d.forward(q, q, q, torch.empty(2, 5, 3), [3, 2], [2, 3], 0.5)
        grads = torch.ops.timm_nat_na2d.backward(q, q, q, q, lse, torch.empty(2, 5, 3), [3, 2], [2, 3], 0.5, True)
    assert (out.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
