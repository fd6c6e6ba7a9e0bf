"""The flex backend on CPU: block mask, token order, compile cache, non-finite inputs.

The compiled-kernel parity against the golden cases is in test_attention.py
(``test_golden_flex_compiled``); here compilation is counted with dynamo's ``eager`` backend,
which traces and guards exactly as inductor does without generating code.
"""
import collections

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask

from timm_nat.attention import flex
from timm_nat.attention.flex import block_sparsity, flex_plan, na2d_flex
from timm_nat.attention.reference import na2d_reference
from benchmarks.common import peak_tensor_bytes

# (height, width, kernel, dilation): borders, rectangles, per-axis dilation, DiNAT stage shapes.
SHAPES = [(23, 17, (3, 3), (3, 2)), (20, 20, (5, 5), (1, 1)), (30, 41, (7, 5), (2, 4)),
          (56, 56, (7, 7), (8, 8)), (28, 28, (7, 7), (4, 4)), (14, 14, (7, 7), (2, 2)), (7, 9, (7, 3), (1, 3))]
SHAPE_IDS = [f"{h}x{w}-k{k[0]}x{k[1]}-d{d[0]}x{d[1]}" for h, w, k, d in SHAPES]
CPU = torch.device("cpu")


@pytest.fixture
def fresh_caches(monkeypatch):
    """Empty plan and compile caches, dynamo reset, graphs counted with an ``eager`` backend that
    records which graphs got symbolic sizes (yielded: one bool per graph)."""
    symbolic = []

    def recording_eager(graph, example_inputs):
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        symbolic.append(any(isinstance(size, torch.SymInt) for v in values if isinstance(v, torch.Tensor)
                            for size in v.shape))
        return graph.forward

    monkeypatch.setattr(flex, "_COMPILE_BACKEND", recording_eager)
    monkeypatch.setattr(flex, "_PLANS", collections.OrderedDict())
    flex._compiled_flex.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    yield symbolic
    flex._compiled_flex.cache_clear()
    torch._dynamo.reset()


@pytest.mark.parametrize("regroup", [False, True], ids=["raster", "regrouped"])
@pytest.mark.parametrize("height, width, kernel, dilation", SHAPES, ids=SHAPE_IDS)
def test_block_mask_equals_create_block_mask(height, width, kernel, dilation, regroup):
    """Counted from neighbours, the block mask is exactly what create_block_mask derives from N x N."""
    plan = flex_plan(height, width, kernel, dilation, CPU, regroup)
    tokens = height * width
    expected = create_block_mask(plan.block_mask.mask_mod, None, None, tokens, tokens, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(plan.block_mask, name), getattr(expected, name)), name


@pytest.mark.parametrize("regroup", [False, True], ids=["raster", "regrouped"])
@pytest.mark.parametrize("height, width, kernel, dilation", SHAPES, ids=SHAPE_IDS)
def test_flex_matches_reference(height, width, kernel, dilation, regroup):
    gen = torch.Generator().manual_seed(height * width)
    q, k, v = (torch.randn(1, height, width, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen, dtype=torch.float64)
    for bias in (rpb, None):
        out = na2d_flex(q, k, v, kernel, dilation, bias, 0.3, compile=False, regroup=regroup)
        torch.testing.assert_close(out, na2d_reference(q, k, v, kernel, dilation, bias, 0.3), rtol=1e-12, atol=1e-12)


def test_regrouped_order_is_a_permutation_grouped_by_dilation():
    plan = flex_plan(30, 41, (7, 5), (2, 4), CPU)
    assert torch.equal(plan.order.sort().values, torch.arange(30 * 41))
    assert torch.equal(plan.order[plan.inverse], torch.arange(30 * 41))
    rows, cols = plan.order // 41, plan.order % 41
    group = (rows % 2) * 4 + cols % 4
    assert torch.all(group[1:] >= group[:-1]), "dilation groups must be contiguous"


@pytest.mark.parametrize("height, width, dilation, raster, regrouped", [
    (56, 56, 8, 0.654, 0.117),  # DiNAT stage 1: regrouping makes each group a plain 7x7 NA
    (28, 28, 4, 1.000, 0.388),
    (200, 336, 1, 0.028, 0.013),  # detection map: 8-column strips instead of raster rows
    (56, 56, 1, 0.194, 0.194),  # NAT stage 1: raster rows are already the best order
])
def test_token_order_sparsity(height, width, dilation, raster, regrouped):
    """Share of non-empty 128x128 blocks (the work flex does), raster vs the chosen order."""
    before = block_sparsity(flex_plan(height, width, (7, 7), (dilation, dilation), CPU, regroup=False).block_mask)
    after = block_sparsity(flex_plan(height, width, (7, 7), (dilation, dilation), CPU).block_mask)
    assert before["nonempty"] == pytest.approx(raster, abs=5e-4)
    assert after["nonempty"] == pytest.approx(regrouped, abs=5e-4)


def test_plan_made_in_inference_mode_is_a_normal_tensor_cache(fresh_caches):
    """Plans are cached: made under inference_mode they would break later training at that size."""
    with torch.inference_mode():
        plan = flex_plan(30, 41, (7, 5), (2, 4), CPU)
    assert not any(t.is_inference() for t in (plan.order, plan.inverse, plan.rows, plan.block_mask.kv_indices))


@pytest.mark.parametrize("height, width", [(128, 128), (200, 336)])
def test_block_mask_memory_is_linear_in_tokens(height, width):
    """The old create_block_mask call (no _compile) took +6.9 GB at 128x128 and could not allocate
    200x336; the plan needs O(tokens * kh * kw) (about 25 and 105 MB here)."""
    tokens, neighbours = height * width, 49
    peak = peak_tensor_bytes(lambda: flex._build_plan(height, width, (7, 7), (1, 1), CPU, True), "cpu")
    assert peak <= 6 * tokens * neighbours * 8, f"plan build peak {peak / 2**20:.0f} MB"
    assert peak < tokens * tokens / 8  # an eighth of even a boolean N x N mask


DINAT_MINI_ATTENTION = [(4, 1), (4, 8), (8, 1), (8, 4), (16, 1), (16, 2), (32, 1)]  # (stride, dilation)


def _dinat_mini_like_shapes(image_size):
    return [(image_size // stride, dilation) for stride, dilation in DINAT_MINI_ATTENTION]


def test_compiled_flex_two_input_sizes_stay_compiled(fresh_caches):
    """dinat_mini's 7 attention shapes at 224 and at 256: 14 keys, one graph each, no recompile
    limit hit (one shared compiled callable made all 14 graphs count against a limit of 8)."""
    gen = torch.Generator().manual_seed(0)
    shapes = _dinat_mini_like_shapes(224) + _dinat_mini_like_shapes(256)
    with torch.no_grad():
        for size, dilation in shapes:
            q, k, v = (torch.randn(2, size, size, 1, 4, generator=gen) for _ in range(3))
            rpb = torch.randn(1, 13, 13, generator=gen)
            out = na2d_flex(q, k, v, (7, 7), (dilation, dilation), rpb, 0.5)
            torch.testing.assert_close(out, na2d_reference(q, k, v, (7, 7), (dilation, dilation), rpb, 0.5),
                                       rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == len(shapes) == 14
    assert flex._compiled_flex.cache_info().currsize == 14
    # Each copy keeps its own automatic-dynamic state: no plan is compiled with symbolic sizes
    # because another plan had other ones (inductor's CPU flex template fails on those).
    assert fresh_caches == [False] * 14


def test_compiled_flex_batch_sizes_recompile_once(fresh_caches):
    """A second batch size makes the batch dynamic: one recompile, none for the third."""
    gen = torch.Generator().manual_seed(1)
    rpb = torch.randn(2, 5, 5, generator=gen)
    with torch.no_grad():
        for batch in (2, 3, 5):
            q, k, v = (torch.randn(batch, 12, 12, 2, 4, generator=gen) for _ in range(3))
            torch.testing.assert_close(na2d_flex(q, k, v, (3, 3), (2, 2), rpb, 0.5),
                                       na2d_reference(q, k, v, (3, 3), (2, 2), rpb, 0.5), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    assert fresh_caches == [False, True]  # the second graph: dynamic batch


def test_compiled_flex_recompile_limit_raises(fresh_caches):
    """Past the recompile limit flex would run uncompiled (every score materialised): it raises."""
    rpb = torch.zeros(2, 5, 5)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        na2d_flex(*(torch.randn(2, 12, 12, 2, 4) for _ in range(3)), (3, 3), (1, 1), rpb, 0.5)
        with pytest.raises(RuntimeError, match=r"12x12, kernel \(3, 3\).*recompile_limit \(1\) reached"):
            na2d_flex(*(torch.randn(3, 12, 12, 2, 4) for _ in range(3)), (3, 3), (1, 1), rpb, 0.5)


def test_flex_inside_a_compiled_caller(fresh_caches):
    """In a caller's fullgraph compile the plan is built eagerly while tracing, then reused."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 20, 20, 2, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 9, 9, generator=gen)
    layer = torch.compile(lambda q, k, v, rpb: na2d_flex(q, k, v, (5, 5), (2, 1), rpb, 0.3),
                          fullgraph=True, backend="eager")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(q, k, v, rpb), na2d_reference(q, k, v, (5, 5), (2, 1), rpb, 0.3),
                                       rtol=1e-5, atol=1e-5)
    assert len(flex._PLANS) == 1 and counters["stats"]["unique_graphs"] == 1


def _poisoned(name, value, position=(0, 10, 10, 1, 2)):
    gen = torch.Generator().manual_seed(3)
    tensors = dict(q=torch.randn(1, 20, 20, 2, 8, generator=gen), k=torch.randn(1, 20, 20, 2, 8, generator=gen),
                   v=torch.randn(1, 20, 20, 2, 8, generator=gen), rpb=torch.randn(2, 5, 5, generator=gen))
    tensors[name][position if name != "rpb" else (1, 2, 2)] = value
    return tensors


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name, value", [("q", float("nan")), ("k", float("nan")), ("v", float("nan")),
                                         ("v", float("inf")), ("k", float("-inf")), ("rpb", float("nan"))])
def test_non_finite_inputs_match_reference(name, value, compile):
    """Compiled flex turned a NaN query into 0.0 and spread a NaN value to 384 of 400 outputs;
    NaN/Inf must land exactly where legacy NATTEN (the reference) puts them."""
    t = _poisoned(name, value)
    out = na2d_flex(t["q"], t["k"], t["v"], (3, 3), (1, 1), t["rpb"], 0.35, compile=compile)
    expected = na2d_reference(t["q"], t["k"], t["v"], (3, 3), (1, 1), t["rpb"], 0.35)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert expected.isnan().any() or expected.isinf().any()  # the case is not vacuous


def test_finite_inputs_do_not_take_the_exact_path(monkeypatch):
    def fail(*args):
        raise AssertionError("finite input routed to the reference path")
    monkeypatch.setattr(flex, "na2d_reference", fail)
    t = _poisoned("q", 0.0)
    na2d_flex(t["q"], t["k"], t["v"], (3, 3), (1, 1), t["rpb"], 0.35, compile=False)


class OutOfResources(Exception):
    """Stands in for triton.runtime.errors.OutOfResources (not a ValueError/TypeError)."""


def test_flex_failure_falls_back_to_tiled_once_per_shape(monkeypatch, caplog):
    """Automatic choice: a flex compile/launch failure runs the next backend with one warning
    naming the shape and the error, and flex is not tried again for that shape; forced flex raises."""
    from timm_nat.attention import backends, na2d
    monkeypatch.setattr(backends, "_PREFERENCE", {"cpu": ("flex", "tiled", "reference")})
    monkeypatch.setitem(backends.BACKENDS, "flex", backends.FlexBackend())  # an empty failure memo
    calls = []

    def failing_flex(*args, **kwargs):
        calls.append(args[0].shape)
        raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    monkeypatch.setattr(flex, "na2d_flex", failing_flex)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 11, 2, 8, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen)
    expected = na2d_reference(q, k, v, (3, 3), (2, 3), rpb, 8 ** -0.5)
    with caplog.at_level("WARNING", logger="timm_nat.attention.backends"):
        first = na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb)
        second = na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1, "flex must not be retried for a shape it failed on"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "query [2, 9, 11, 2, 8] float32, kernel (3, 3), dilation (2, 3), with RPB" in warnings[0]
    assert "OutOfResources: out of resource: shared memory" in warnings[0]
    with pytest.raises(ValueError, match="'flex' refused this input: flex failed for query"):
        na2d(q, k, v, 3, dilation=(2, 3), rpb=rpb, backend="flex")


def test_flex_does_not_swallow_a_callers_mistake(monkeypatch):
    from timm_nat.attention import backends, na2d
    monkeypatch.setattr(backends, "_PREFERENCE", {"cpu": ("flex", "tiled", "reference")})
    monkeypatch.setitem(backends.BACKENDS, "flex", backends.FlexBackend())

    def bad_argument(*args, **kwargs):
        raise ValueError("a caller's mistake")

    monkeypatch.setattr(flex, "na2d_flex", bad_argument)
    q = torch.randn(1, 7, 7, 1, 8)
    with pytest.raises(ValueError, match="a caller's mistake"):
        na2d(q, q, q, 3)
