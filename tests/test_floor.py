"""The fast subset that CI also runs against the lowest supported torch / timm (``pytest -m floor``,
in ``.ci/run``): registration by a plain ``import timm``, golden parity through timm's pretrained
path, the head / feature API whose timm signatures changed across releases, and a training step
through timm's optimizer factory with layer-wise decay."""
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

import timm_nat  # noqa: F401  (registers the models)
from timm_nat._timm_compat import reset_classifier_head
from conftest import assert_close

pytestmark = pytest.mark.floor

ATOL = 1e-4  # golden README: ~1e-6 expected in fp32, above 1e-4 is a bug
TINY = "dinat_test_tiny"  # golden tiny DiNAT, a shrunken dinat_mini with 10 classes


def _tiny_pretrained(golden, tiny_model_kwargs, **kwargs):
    file = golden / "hf" / TINY / "pytorch_model.bin"
    return timm.create_model(
        "dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=10),
        num_classes=10, **tiny_model_kwargs(TINY), **kwargs)


@pytest.mark.timeout(400)  # its subprocess has 300 s
def test_plain_import_timm_registers_the_models():
    """The installed start-up hook: a fresh interpreter that never imports timm_nat finds the models."""
    code = textwrap.dedent("""
        import sys, timm
        assert "timm_nat" in sys.modules, "the hook did not import timm_nat"
        model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
        print(type(model).__name__, sorted(timm.list_models("dinat_mini*")))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split(" ", 1) == ["Nat", "['dinat_mini']\n"]


def test_golden_logits_through_pretrained_path(golden, tiny_model_kwargs):
    model = _tiny_pretrained(golden, tiny_model_kwargs).eval()
    outputs = load_file(golden / "hf" / TINY / "golden.safetensors")
    with torch.no_grad():
        diffs = [(model(outputs[f"input{j}"]) - outputs[f"logits{j}"]).abs().max().item() for j in range(5)]
    assert max(diffs) <= ATOL, f"max abs diff vs golden logits {diffs}"


def test_golden_features_only(golden, tiny_model_kwargs):
    """features_only prunes the head through reset_classifier (the call timm < 1.0.31 broke)."""
    model = _tiny_pretrained(golden, tiny_model_kwargs, features_only=True).eval()
    outputs = load_file(golden / "hf" / TINY / "golden.safetensors")
    with torch.no_grad():
        features = model(outputs["input2"])
    assert len(features) == 4
    for stage, feature in enumerate(features):
        expected = outputs[f"feature2.{stage}"]
        assert feature.shape == expected.shape
        assert (feature - expected).abs().max().item() <= ATOL, f"stage {stage}"


def test_reset_classifier_keeps_pooled_features(golden, tiny_model_kwargs):
    model = _tiny_pretrained(golden, tiny_model_kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(3)
        assert model(x).shape == (1, 3) and model.head.fc.in_features == pooled.shape[1]
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)


def test_reset_classifier_head_shim_sets_width_device_dtype_and_mode():
    head = timm.layers.ClassifierHead(8, 5, pool_type="avg", input_fmt="NHWC").eval()
    reset_classifier_head(head, 3, None, 6, dtype=torch.float64)
    assert (head.fc.in_features, head.fc.out_features, head.num_features) == (6, 3, 6)
    assert head.fc.weight.dtype == torch.float64 and not head.fc.training


def test_training_step_with_layer_decay_lowers_the_loss(golden, tiny_model_kwargs):
    torch.manual_seed(0)
    model = _tiny_pretrained(golden, tiny_model_kwargs).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len({group["lr_scale"] for group in optimizer.param_groups}) > 2  # per-layer scales
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 3, 5, 9])
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses


@pytest.mark.floor
def test_compiled_na2d_gradients_equal_eager():
    """torch.compile through na2d's backend choice: on torch < 2.15 the fused CPU op traces with zero
    gradients, so the chooser leaves it out under compile there; on any torch the gradients are eager's."""
    from timm_nat.attention import na2d

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 10, 9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=gen, requires_grad=True)
    grad_out = torch.randn(1, 10, 9, 2, 16, generator=gen)

    def grads(fn):
        out = fn(q, k, v, (3, 3), (2, 1), rpb, 0.25)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v, rpb), grad_out)]

    def attend(q, k, v, kernel_size, dilation, rpb, scale):
        return na2d(q, k, v, kernel_size, dilation, rpb=rpb, scale=scale)

    eager = grads(attend)
    compiled = grads(torch.compile(attend, backend="aot_eager"))
    # Eager runs the fused kernel (threads sum drpb in another order), compiled runs tiled: the golden
    # bound (1e-5 of max(1, max|expected|)); the zero gradients this guards against fail it by far.
    for name, ours, expected in zip(("out", "dq", "dk", "dv", "drpb"), compiled, eager):
        assert_close(name, ours, expected)
