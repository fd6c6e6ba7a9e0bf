"""Property-based: every CPU backend equals ``reference`` (values and NaN positions) or raises a
clear error, over random shapes, per-axis kernels and dilations, dtypes, RPB or not, empty
batch/heads and non-finite values; ``tiled``'s gradients too; the legacy API (``compat``) against an
independent gather, NaN/Inf included. Runs in well under a minute
(fixed example counts, derandomized so CI is reproducible; no example database is written)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timm_nat.attention import na2d, neighborhood_1d
from timm_nat.attention.flex import na2d_flex
from timm_nat.attention import tiling
from timm_nat.attention.reference import na2d_reference
from timm_nat.compat import natten2dav, natten2dqkrpb

_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# bf16 keeps 8 significant bits (eps 2^-8 = 0.0039). Backend and reference both round the logits,
# probabilities and outputs to bf16, in different orders; with unit-scale inputs |out| <= max|v|
# ~ 4, so a few roundings of 4 * 2^-8 each stay within 3e-2 (the README's documented bf16 bound).
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
_NONFINITE = (math.nan, math.inf, -math.inf)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16), nonfinite=True, empty=True):
    kernel = (draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    height, width = (k * d + draw(st.integers(0, 5)) for k, d in zip(kernel, dilation))
    batch = draw(st.integers(0 if empty else 1, 2))
    heads = draw(st.integers(0 if empty else 1, 3))
    shape = (batch, height, width, heads, draw(st.sampled_from([1, 3, 8, 16])))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    rpb = None
    if draw(st.booleans()):
        rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen, dtype=torch.float64).to(dtype)
    if nonfinite and q.numel():
        for _ in range(draw(st.integers(0, 3))):
            target = draw(st.sampled_from([t for t in (q, k, v, rpb) if t is not None]))
            target.view(-1)[draw(st.integers(0, target.numel() - 1))] = draw(st.sampled_from(_NONFINITE))
    return dict(q=q, k=k, v=v, kernel=kernel, dilation=dilation, rpb=rpb, scale=shape[-1] ** -0.5)


def _reference(p):
    return na2d_reference(p["q"], p["k"], p["v"], p["kernel"], p["dilation"], p["rpb"], p["scale"])


def _assert_matches(ours, expected, dtype, what):
    assert ours.shape == expected.shape and ours.dtype == expected.dtype, what
    assert torch.equal(ours.isnan(), expected.isnan()), (
        f"{what}: NaN at {ours.isnan().sum().item()} places, reference at {expected.isnan().sum().item()}")
    tol = _TOLERANCE[dtype]
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _run_or_clear_error(backend, p):
    """The backend's output, or None when it refused with a clear error (a ValueError naming it)."""
    try:
        return na2d(p["q"], p["k"], p["v"], p["kernel"], p["dilation"], rpb=p["rpb"], scale=p["scale"], backend=backend)
    except ValueError as error:
        assert f"'{backend}'" in str(error), f"unclear error from {backend}: {error}"
        return None


@pytest.mark.parametrize("backend", ["cpu_fused", "tiled", "natten"])
@settings(max_examples=50, **_SETTINGS)
@given(p=problems())
def test_backend_equals_reference(backend, p):
    if backend == "natten":
        p["rpb"] = None  # NATTEN has no RPB (that refusal is tested in test_attention.py)
    ours = _run_or_clear_error(backend, p)
    if backend in ("cpu_fused", "tiled"):
        assert ours is not None, f"{backend} runs every valid input"
    if ours is not None:
        _assert_matches(ours, _reference(p), p["q"].dtype, backend)


@settings(max_examples=5, **_SETTINGS)
@given(p=problems(nonfinite=False, empty=False))
def test_flex_eager_equals_reference(p):
    """Eager flex (its compiled kernel costs ~15 s a shape; see test_golden_flex_compiled). Finite
    inputs and non-empty ones only: NaN handling and empty inputs on flex are issue 10 #3 (flex.py)
    and na2d's can_run check (test_empty_input_on_fused_backends_is_refused_clearly)."""
    ours = na2d_flex(p["q"], p["k"], p["v"], p["kernel"], p["dilation"], p["rpb"], p["scale"], compile=False)
    _assert_matches(ours, _reference(p), p["q"].dtype, "flex")


@settings(max_examples=30, **_SETTINGS)
@given(p=problems(dtypes=(torch.float64,)))
def test_gradients_equal_reference(p):
    """fp64 gradients of q, k, v and rpb on tiled and cpu_fused, NaN positions included (non-finite
    inputs make the reference's backward NaN exactly where 0 * NaN meets them; ours must agree)."""
    inputs = [t.requires_grad_() for t in (p["q"], p["k"], p["v"], p["rpb"]) if t is not None]
    grad_out = torch.randn(p["q"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for backend in ("cpu_fused", "tiled", "reference"):
        out = na2d(p["q"], p["k"], p["v"], p["kernel"], p["dilation"], rpb=p["rpb"], scale=p["scale"], backend=backend)
        results.append(torch.autograd.grad((out * grad_out).sum(), inputs, allow_unused=True))
    *ours_by_backend, expected_grads = results
    for backend, grads in zip(("cpu_fused", "tiled"), ours_by_backend):
        for index, (ours, expected) in enumerate(zip(grads, expected_grads)):
            if ours is None or expected is None:  # unused: empty input; autograd's zero either way
                assert not any(g is not None and g.any() for g in (ours, expected))
                continue
            _assert_matches(ours, expected, torch.float64, f"{backend} grad {index}")


@pytest.mark.parametrize("backend", ["tiled", "cpu_fused"])
def test_rows_whose_every_logit_is_minus_inf_are_nan(backend):
    """An RPB of -inf on one head makes every logit of its queries -inf: the reference's softmax is
    NaN there, and so must the backends' be (tiled's SDPA took such rows as fully masked: 0)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 8, 3, 4, generator=gen) for _ in range(3))
    rpb = torch.randn(3, 5, 5, generator=gen)
    rpb[1] = -math.inf
    rpb[2, 0, 0] = -math.inf  # one offset only: ordinary masking, finite outputs
    expected = na2d_reference(q, k, v, (3, 3), (1, 2), rpb, 0.5)
    assert expected[..., 1, :].isnan().all() and expected[..., (0, 2), :].isfinite().all()
    _assert_matches(na2d(q, k, v, 3, (1, 2), rpb=rpb, scale=0.5, backend=backend), expected, torch.float32, backend)


@pytest.mark.parametrize("backend", ["tiled", "cpu_fused", "reference"])
@pytest.mark.parametrize("batch, heads", [(0, 2), (2, 0)])
def test_empty_input_keeps_every_input_in_the_graph(backend, batch, heads):
    """An empty batch (or no heads) gives an empty output whose gradient w.r.t. q, k, v and rpb is
    zero, not an error (tiled's SDPA returned a result cut off from its inputs)."""
    q, k, v = (torch.randn(batch, 6, 7, heads, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, 5, 5, requires_grad=True)
    out = na2d(q, k, v, 3, 1, rpb=rpb, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v, rpb))
    for grad, tensor in zip(grads, (q, k, v, rpb)):
        assert grad.shape == tensor.shape and not grad.any()


# --- the legacy API (timm_nat.compat) against an independent gather of each query's window -------------------

@st.composite
def legacy_problems(draw):
    """fp64 ``[batch, heads, H, W, dim]`` q, k, v (and a grad_out) with NaN/Inf planted anywhere."""
    kernel = (draw(st.integers(2, 4)), draw(st.integers(2, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    height, width = (k * d + draw(st.integers(0, 4)) for k, d in zip(kernel, dilation))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), height, width, draw(st.sampled_from([1, 4])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    rpb = None
    if draw(st.booleans()):
        rpb = torch.randn(shape[1], 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen, dtype=torch.float64)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from([q, k, v, grad_out]))
        target.view(-1)[draw(st.integers(0, q.numel() - 1))] = draw(st.sampled_from(_NONFINITE))
    return dict(q=q, k=k, v=v, grad_out=grad_out, rpb=rpb, kernel=kernel, dilation=dilation)


def _gathered_windows(p):
    """Window keys of every query as [H, W, kh*kw] row and column positions, and the RPB indices."""
    height, width = p["q"].shape[2:4]
    rows, row_bias = neighborhood_1d(height, p["kernel"][0], p["dilation"][0])
    cols, col_bias = neighborhood_1d(width, p["kernel"][1], p["dilation"][1])
    grid = (height, width, *p["kernel"])

    def per_query(row_index, col_index):
        return (row_index[:, None, :, None].expand(grid).reshape(height, width, -1),
                col_index[None, :, None, :].expand(grid).reshape(height, width, -1))
    return per_query(rows, cols), per_query(row_bias, col_bias)


def _gather_qk(q, k, rpb, p):
    (rows, cols), (row_bias, col_bias) = _gathered_windows(p)
    logits = torch.einsum("bnhwd,bnhwkd->bnhwk", q, k[:, :, rows, cols])
    return logits if rpb is None else logits + rpb[:, row_bias, col_bias]


def _gather_av(attn, v, p):
    (rows, cols), _ = _gathered_windows(p)
    return torch.einsum("bnhwk,bnhwkd->bnhwd", attn, v[:, :, rows, cols])


@settings(max_examples=40, **_SETTINGS)
@given(p=legacy_problems())
def test_legacy_api_nonfinite_stays_in_the_window(p):
    """``natten2dqkrpb -> softmax -> natten2dav`` and its gradients (q, k, v, rpb, and the weights'
    own gradient through ``natten2dav`` alone) equal an explicit gather of each query's window,
    NaN and Inf positions included: a NaN/Inf reaches only the outputs whose windows hold it."""
    inputs = [t.requires_grad_() for t in (p["q"], p["k"], p["v"], p["rpb"]) if t is not None]
    results = []
    for qk, av in ((lambda q, k, rpb: natten2dqkrpb(q, k, rpb, p["kernel"], p["dilation"]),
                    lambda attn, v: natten2dav(attn, v, p["kernel"], p["dilation"])),
                   (lambda q, k, rpb: _gather_qk(q, k, rpb, p), lambda attn, v: _gather_av(attn, v, p))):
        logits = qk(p["q"], p["k"], p["rpb"])
        attn = logits.softmax(-1)
        out = av(attn, p["v"])
        grads = torch.autograd.grad((out * p["grad_out"]).sum(), inputs)
        weights = attn.detach().requires_grad_()
        grad_weights = torch.autograd.grad((av(weights, p["v"]) * p["grad_out"]).sum(), weights)
        results.append((logits, out, *grads, *grad_weights))
    names = ("logits", "out", "dq", "dk", "dv", "drpb")[:len(inputs) + 2] + ("dattn",)
    for name, ours, expected in zip(names, *results):
        _assert_matches(ours, expected, torch.float64, f"compat {name}")


@settings(max_examples=60, **_SETTINGS)
@given(kernel=st.tuples(st.integers(1, 5), st.integers(2, 5)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
       tile=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_tiling_holds_every_window(kernel, dilation, extra, tile):
    """The one tiling (``tiled`` and the legacy API): each query's slot and ``window_index`` entries
    address exactly its own window's keys (``neighborhood_1d``) in row-major order, and ``tiled``'s
    bias classes give those pairs their RPB index and every other pair of the tile ``MASKED``."""
    height, width = (k * d + e for k, d, e in zip(kernel, dilation, extra))
    args = (height, width, kernel, dilation, tile)
    plan, windows = tiling.grid_plan(*args), tiling.window_index(*args)
    tiles, tile_len, halo_len = plan.tile_shape
    query_slot, halo_slot = windows // halo_len, windows % halo_len
    rows, row_bias = neighborhood_1d(height, kernel[0], dilation[0])
    cols, col_bias = neighborhood_1d(width, kernel[1], dilation[1])
    positions = torch.arange(height * width)
    assert torch.equal(plan.query_index[plan.output_index], positions)
    assert torch.equal(query_slot.view(height * width, -1), plan.output_index[:, None].expand(-1, math.prod(kernel)))
    expected = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)
    assert torch.equal(plan.key_index[(query_slot // tile_len) * halo_len + halo_slot], expected)
    # tiled's additive bias: RPB index inside each window, MASKED elsewhere
    tile_of, slot = plan.output_index // tile_len, plan.output_index % tile_len
    row_class, col_class = plan.tile_class[tile_of] // len(plan.col_bias), plan.tile_class[tile_of] % len(plan.col_bias)
    bias_rows = plan.row_bias[row_class, slot // tile[1]]            # [H*W, Hkr]
    bias_cols = plan.col_bias[col_class, slot % tile[1]]             # [H*W, Hkc]
    inside = (bias_rows[:, :, None] != tiling.MASKED) & (bias_cols[:, None, :] != tiling.MASKED)
    assert torch.equal(inside.sum((1, 2)), torch.full((height * width,), math.prod(kernel)))
    in_window = inside.flatten(1).nonzero()[:, 1].view(height * width, -1)  # row-major halo slots
    assert torch.equal(in_window.reshape(-1), halo_slot)
    grid = (height, width, *kernel)
    expected_bias = (row_bias[:, None, :, None].expand(grid), col_bias[None, :, None, :].expand(grid))
    got_bias = (bias_rows.gather(1, in_window // plan.halo[1]), bias_cols.gather(1, in_window % plan.halo[1]))
    for got, want in zip(got_bias, expected_bias):
        assert torch.equal(got.view(-1), want.reshape(-1))
