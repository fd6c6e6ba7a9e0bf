"""Export and compile of every model family: torch.jit.trace, torch.export (dynamic batch), ONNX
(TorchScript and dynamo exporters, through timm's own ``onnx_export``, run in onnxruntime) and
``torch.compile(fullgraph=True)``, all from a cold plan cache, against eager outputs.

Index plans are constants of a traced graph, built for its height and width: a dynamic spatial
size is an export-time error (torch.export, dynamo ONNX), and a jit-traced graph run at another
size fails instead of answering wrong.
"""
import pytest
import timm
import torch

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.attention import tiled, tiling

from conftest import tiny_kwargs

FAMILIES = {  # family: (arch, kwargs, input size); tiny configs, one per model class / attention kind
    "nat": ("nat_mini", tiny_kwargs("nat_mini", kernel_size=5), 64),
    "dinat": ("dinat_mini", tiny_kwargs("dinat_mini", kernel_size=3), 64),
    "dinat_s": ("dinat_s_tiny", tiny_kwargs("dinat_s_tiny", kernel_size=3), 64),
    "dinat_isotropic": (
        "dinat_isotropic_small", tiny_kwargs("dinat_isotropic_small", img_size=128, depth=2, kernel_size=3), 128),
    "vitrpb": ("vitrpb_small", tiny_kwargs("vitrpb_small", img_size=128, depth=2), 128),
}
BATCHES = (1, 2, 4)
EXPORT_BATCH = 2  # torch.export specialises a size-1 dim; timm's onnx_export traces at >= 2 too


@pytest.fixture
def several_chunks(monkeypatch):
    """Eager runs split the tiles into several chunks even on tiny models, as at real sizes: the
    chunk count depends on the batch size and must not reach a traced graph (it once did)."""
    monkeypatch.setattr(tiling, "CHUNK_BYTES", 2**12)


def _model(family: str) -> torch.nn.Module:
    arch, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=10, **kwargs).eval()


def _inputs(family: str, size=None) -> dict:
    size = size or (FAMILIES[family][2],) * 2
    torch.manual_seed(1)
    return {b: torch.randn(b, 3, *size) for b in BATCHES}


def _cold_plans() -> None:
    """Empty the index-plan caches, as in a fresh process."""
    tiled.grid_plan.cache_clear()
    tiled.axis_plan.cache_clear()


def _max_abs_diff(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _assert_matches_eager(model, run, inputs, atol=1e-4) -> None:
    for batch, x in inputs.items():
        with torch.no_grad():
            expected = model(x)
        assert _max_abs_diff(run(x), expected) < atol, f"batch {batch}"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.usefixtures("several_chunks")
def test_torch_export_cold_with_dynamic_batch(family):
    model, inputs = _model(family), _inputs(family)
    _cold_plans()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (inputs[EXPORT_BATCH],), dynamic_shapes=({0: batch},))
    _assert_matches_eager(model, program.module(), inputs)


def test_torch_export_leaves_the_plan_cache_usable():
    """Regression: a cold export once cached fake tensors, and the next eager forward failed."""
    model, inputs = _model("dinat"), _inputs("dinat")
    _cold_plans()
    torch.export.export(model, (inputs[2],))
    plan = tiled.grid_plan(16, 16, (3, 3), (1, 1), (8, 8))
    assert all(type(t) is torch.Tensor for t in plan[:-1])
    with torch.no_grad():
        assert torch.isfinite(model(inputs[4])).all()


def test_torch_export_with_dynamic_spatial_size_raises_clearly():
    model, x = _model("dinat"), _inputs("dinat")[2]
    side = torch.export.Dim("side", min=64, max=256)
    with pytest.raises(Exception, match="cannot be exported with a dynamic height or width"):
        torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch"), 2: side, 3: side},))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.usefixtures("several_chunks")
def test_jit_trace_matches_eager_at_every_batch(family):
    model, inputs = _model(family), _inputs(family)
    _cold_plans()
    with torch.no_grad():
        traced = torch.jit.trace(model, (inputs[EXPORT_BATCH],))
    _assert_matches_eager(model, traced, inputs)


def test_jit_trace_run_at_another_size_fails_instead_of_answering_wrong():
    model = _model("dinat")
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(2, 3, 64, 64),))
        for size in ((96, 96), (64, 96), (128, 32)):  # larger, wider, same token count in another shape
            with pytest.raises(RuntimeError, match="out of range"):
                traced(torch.randn(2, 3, *size))


def _onnx_session(model, path, size, dynamo: bool, dynamic_size: bool = False):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra 'frameworks')")
    pytest.importorskip("onnx", reason="onnx not installed (extra 'frameworks')")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    from timm.utils.onnx import onnx_export  # what timm's onnx_export.py calls
    _cold_plans()
    onnx_export(model, str(path), batch_size=EXPORT_BATCH, input_size=(3, *size), use_dynamo=dynamo,
                dynamic_size=dynamic_size)
    session = onnxruntime.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.usefixtures("several_chunks")
def test_onnx_matches_eager_at_every_batch(family, dynamo, tmp_path):
    model, inputs = _model(family), _inputs(family)
    size = (FAMILIES[family][2],) * 2
    _assert_matches_eager(model, _onnx_session(model, tmp_path / "model.onnx", size, dynamo), inputs)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.usefixtures("several_chunks")
def test_onnx_at_a_second_input_size(dynamo, tmp_path):
    """One graph per input size: another (non-square) size exports and matches too."""
    model, size = _model("dinat"), (96, 80)
    _assert_matches_eager(model, _onnx_session(model, tmp_path / "model.onnx", size, dynamo), _inputs("dinat", size))


def test_onnx_torchscript_dynamic_size_graph_refuses_other_sizes(tmp_path):
    """timm's ``--dynamic-size`` declares H/W dynamic; the graph is right at the traced size and
    fails (never answers wrong) at another."""
    model = _model("dinat")
    run = _onnx_session(model, tmp_path / "model.onnx", (64, 64), dynamo=False, dynamic_size=True)
    _assert_matches_eager(model, run, _inputs("dinat"))
    with pytest.raises(Exception, match="out of data bounds"):
        run(torch.randn(2, 3, 96, 96))


def test_onnx_dynamo_dynamic_size_raises_at_export(tmp_path):
    with pytest.raises(Exception, match="cannot be exported with a dynamic height or width"):
        _onnx_session(_model("dinat"), tmp_path / "model.onnx", (64, 64), dynamo=True, dynamic_size=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_fullgraph_cold_forward_backward(family):
    """No graph break anywhere (fullgraph) from a cold plan cache, training mode, forward and
    backward equal to eager. aot_eager: the same captured graphs as inductor, without its
    minute-long CPU codegen per model (inductor itself: see test_compile_inductor_fullgraph)."""
    model, x = _model(family).train(), _inputs(family)[2]
    _cold_plans()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    assert _max_abs_diff(out.detach(), expected.detach()) < 1e-5
    for (name, p), grad in zip(model.named_parameters(), grads):
        assert _max_abs_diff(grad, p.grad) < 1e-5, name


def test_compiled_graph_is_one_graph_with_constant_plans():
    """No graph break and no plan building (``.unique()``) in the graph, also without fullgraph."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model, x = _model("dinat"), _inputs("dinat")[2]
    _cold_plans()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record)(x)
    assert len(graphs) == 1
    assert "unique" not in graphs[0].code


def test_compile_inductor_fullgraph():
    """Inductor, cold, fullgraph, eval forward of one family (CPU codegen is slow)."""
    model, inputs = _model("dinat_isotropic"), _inputs("dinat_isotropic")
    _cold_plans()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert _max_abs_diff(compiled(inputs[2]), model(inputs[2])) < 1e-5


def test_torchscript_scripting_raises_clearly():
    """Not scriptable (as timm's models that its torchscript test excludes): a scripted model's
    attention raises, saying what to use instead."""
    scripted = torch.jit.script(_model("nat"))
    with pytest.raises(Exception, match="na2d is not scriptable"):
        scripted(_inputs("nat")[2])


def test_forcing_a_fused_backend_while_exporting_raises_clearly():
    """flex and NATTEN cannot be exported; tiled (the CPU default, and what export picks on CUDA) can."""
    from timm_nat.attention import na2d, use_backend
    q = torch.randn(1, 8, 8, 1, 8)
    with use_backend("flex"), pytest.raises(ValueError, match="cannot be exported"):
        torch.jit.trace(lambda q: na2d(q, q, q, 3), (q,))
