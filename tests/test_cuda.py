"""CUDA: the golden op and model cases on every CUDA backend, training under AMP and compile,
detection-size backbones. Run with ``pytest -m cuda`` on a CUDA machine with time to spare (the
lease-sized check is tools/gpu_check.py); skipped without a GPU.

Low-precision bounds (max abs error over max(1, max|golden|), per tensor): the inputs are rounded
to bf16 (unit roundoff 2**-8) or fp16 (2**-11), which moves unit-scale logits by about
``u * sqrt(head_dim)`` and outputs by about ``u``; the CPU measurement of that (README: about
1e-2 bf16, 2e-3 fp16) sets the forward bounds 3e-2 / 4e-3, as on CPU. Gradients pass through two
more products of rounded operands (``dP = dO V^T``, ``dS = P (dP - delta)``), so they get twice that.
"""
import time

import pytest
import timm
import torch

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.attention import flex, na2d, use_backend

from conftest import (
    GOLDEN_HF_TINY, GOLDEN_ORIGINAL_ONLY_TINY, golden_arch_and_kwargs, golden_checkpoint, golden_outputs)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"),
]

GRADS = ("dq", "dk", "dv", "drpb")
LOW_PRECISION = {torch.bfloat16: (3e-2, 6e-2), torch.float16: (4e-3, 8e-3)}  # (forward, gradients)
FP32 = 1e-5  # as on CPU (tests/test_attention.py)
ATOL_MODEL = 1e-4  # golden README: ~1e-6 expected in fp32, above 1e-4 is a bug


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 operands to 10 bits; the fp32 bounds are about exact arithmetic."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _natten_layout(x):  # golden [B, heads, H, W, D] -> [B, H, W, heads, D]
    return x.permute(0, 2, 3, 1, 4).contiguous()


def _golden_layout(x):
    return x.permute(0, 3, 1, 2, 4)


def _check(name, ours, expected, bound):
    scaled = bound * max(1.0, expected.abs().max().item())
    err = (ours.float().cpu() - expected).abs().max().item()
    assert err <= scaled, f"{name}: max abs diff {err:.3g} > {scaled:.3g}"


def _run(case, t, backend, dtype, with_rpb=True):
    q, k, v = (_natten_layout(t[n]).cuda().to(dtype).requires_grad_() for n in "qkv")
    rpb = t["rpb"].cuda().to(dtype).requires_grad_() if with_rpb else None
    with use_backend(backend):
        out = na2d(q, k, v, case["kernel_size"], tuple(case["dilation"]), rpb=rpb, scale=case["scale"])
    (out * _natten_layout(t["grad_out"]).cuda().to(dtype)).sum().backward()
    grads = dict(dq=_golden_layout(q.grad), dk=_golden_layout(k.grad), dv=_golden_layout(v.grad))
    if with_rpb:
        grads["drpb"] = rpb.grad
    return _golden_layout(out), grads


def _backend_available(backend):
    if backend == "natten":
        pytest.importorskip("natten", reason="NATTEN is not installed on this machine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["flex", "tiled"])
def test_golden_op_with_rpb(golden_cases, backend, dtype):
    """Forward and the four gradients of every golden case, with RPB."""
    forward_bound, grad_bound = (FP32, FP32) if dtype == torch.float32 else LOW_PRECISION[dtype]
    for case, t in golden_cases:
        out, grads = _run(case, t, backend, dtype)
        assert out.dtype == dtype
        _check(f"case{case['case']}.out", out, t["out"], forward_bound)
        for name in GRADS:
            _check(f"case{case['case']}.{name}", grads[name], t[name], grad_bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["flex", "tiled", "natten"])
def test_golden_op_without_rpb(golden_cases, backend, dtype):
    """``out_norpb`` of every case; gradients against tiled's in fp32 (the golden file has none)."""
    _backend_available(backend)
    forward_bound, grad_bound = (FP32, FP32) if dtype == torch.float32 else LOW_PRECISION[dtype]
    for case, t in golden_cases:
        if backend == "natten" and case["head_dim"] < 8:  # NATTEN's rule: head_dim a power of two >= 8
            continue
        out, grads = _run(case, t, backend, dtype, with_rpb=False)
        _check(f"case{case['case']}.out_norpb", out, t["out_norpb"], forward_bound)
        _, expected = _run(case, t, "tiled", torch.float32, with_rpb=False)
        for name in ("dq", "dk", "dv"):
            _check(f"case{case['case']}.{name} (no RPB, vs tiled fp32)", grads[name], expected[name].cpu(), grad_bound)


GOLDEN_FAMILIES = [*GOLDEN_HF_TINY, *GOLDEN_ORIGINAL_ONLY_TINY]


@pytest.mark.parametrize("name", GOLDEN_FAMILIES)
def test_golden_models_on_cuda(name):
    """Every family's golden logits on CUDA (flex with RPB, the CUDA default), all five inputs;
    the original checkpoint through timm's pretrained path, as the CPU golden tests load it."""
    arch, kwargs = golden_arch_and_kwargs(name)
    model = timm.create_model(arch, pretrained=True, num_classes=10, **kwargs, pretrained_cfg_overlay=dict(
        file=str(golden_checkpoint(name)), num_classes=10)).cuda().eval()
    outputs = golden_outputs(name)
    with torch.no_grad():
        for j in range(sum(key.startswith("input") for key in outputs)):
            diff = (model(outputs[f"input{j}"].cuda()).cpu() - outputs[f"logits{j}"]).abs().max().item()
            assert diff <= ATOL_MODEL, f"{name} input{j}: max abs diff {diff:.3e} > {ATOL_MODEL}"


def _train_step(model, images, labels, compile_=False, amp=False):
    step_model = torch.compile(model) if compile_ else model
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(step_model(images), labels)
    loss.backward()
    return loss.detach().float()


def _dinat_mini_and_batch(batch=8):
    torch.manual_seed(0)
    model = timm.create_model("dinat_mini", num_classes=10).cuda().train()
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 10, (batch,), device="cuda")
    return model, images, labels


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dinat_mini_train_step_autocast_bf16():
    model, images, labels = _dinat_mini_and_batch()
    reference_loss = _train_step(model, images, labels)
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = _train_step(model, images, labels, amp=True)
    grads = _grads(model)
    assert torch.isfinite(loss) and abs(loss - reference_loss) <= 2e-2 * reference_loss  # bf16: ~1e-2 per op
    assert grads.keys() == reference.keys() and any("rpb" in n for n in grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference[name].flatten(), dim=0)
        assert cosine >= 0.95, f"{name}: bf16 gradient direction {cosine:.4f} vs fp32"


def test_dinat_mini_train_step_compiled():
    model, images, labels = _dinat_mini_and_batch()
    eager_loss = _train_step(model, images, labels)
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled_loss = _train_step(model, images, labels, compile_=True)
    compiled = _grads(model)
    assert abs(compiled_loss - eager_loss) <= 1e-4 * eager_loss
    for name, grad in eager.items():
        _check(f"compiled grad {name}", compiled[name], grad.cpu(), 1e-3)


def test_features_only_at_detection_size():
    """800x1333 -> a 200x334 stage-1 map: the flex plan builds in seconds, in O(tokens * k^2)
    memory (the old N x N create_block_mask could not allocate it), and matches tiled."""
    torch.manual_seed(0)
    backbone = timm.create_model("dinat_mini", features_only=True, out_indices=(0, 1, 2, 3)).cuda().eval()
    images = torch.randn(1, 3, 800, 1333, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    flex.flex_plan(200, 334, (7, 7), (1, 1), images.device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    build_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert build_s < 10, f"block-mask build took {build_s:.1f} s"
    assert build_mb < 64, f"block-mask build held {build_mb:.0f} MB on the GPU"
    with torch.no_grad():
        maps = backbone(images)
        with use_backend("tiled"):
            expected = backbone(images)
    assert [tuple(m.shape[-2:]) for m in maps] == [(200, 334), (100, 167), (50, 84), (25, 42)]
    for i, (ours, ref) in enumerate(zip(maps, expected)):
        assert torch.isfinite(ours).all()
        _check(f"stage {i}", ours, ref.cpu(), 1e-4)
    print(f"\nflex plan 200x334 k7: {build_s * 1e3:.0f} ms, {build_mb:.1f} MB on the GPU")
