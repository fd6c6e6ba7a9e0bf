"""Golden tiny checkpoints (random weights, ``tests/golden/{hf,orig}``) through timm's public
pretrained path reproduce the outputs of the legacy stack (NATTEN 0.17 + transformers 4.40, and the
original repository's code): NAT/DiNAT in both published layouts (transformers ``pytorch_model.bin``
and the original ``.pth``), DiNAT_s and the isotropic models in the original layout. Also what
loading them promises: every layout accepted, bad checkpoints reported key by key, another head
size, another number of input channels."""
import pytest
import timm
import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models._manipulate import adapt_input_conv

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.models import dinat_s, isotropic, nat

from conftest import (
    GOLDEN_ATOL, GOLDEN_HF_TINY as TINY_CHECKPOINTS, GOLDEN_ORIGINAL_ONLY_TINY as ORIGINAL_ONLY_TINY, assert_close,
    golden_arch_and_kwargs, golden_checkpoint, golden_outputs, max_abs_diff,
)

NUM_INPUTS = 5  # hf/ goldens: input0..input4, several with maps smaller than kernel x dilation
NUM_STAGES = 4

LAYOUTS = ("transformers", "original")
def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_close(what, actual, expected, tol=GOLDEN_ATOL, relative=False)


GOLDEN_CASES = [(n, layout) for n in TINY_CHECKPOINTS for layout in LAYOUTS] + [(n, "original") for n in ORIGINAL_ONLY_TINY]
FILTERS = {"nat_test_tiny": nat, "dinat_test_tiny": nat, "dinat_s_test_tiny": dinat_s,
           "nat_isotropic_test_tiny": isotropic, "dinat_isotropic_test_tiny": isotropic, "vitrpb_test_tiny": isotropic}


def _create(name: str, layout: str, **kwargs) -> torch.nn.Module:
    """The public path: timm.create_model(..., pretrained=True) with the checkpoint file as source."""
    arch, arch_kwargs = golden_arch_and_kwargs(name)
    model = timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(golden_checkpoint(name, layout)), num_classes=10),
        **{**arch_kwargs, "num_classes": 10, **kwargs},
    )
    return model.eval()


@pytest.mark.parametrize("name, layout", GOLDEN_CASES)
def test_logits_match_golden(golden, tiny_model_kwargs, name, layout):
    model = _create(name, layout)
    outputs = golden_outputs(name, layout)
    num_inputs = sum(k.startswith("input") for k in outputs)
    assert num_inputs == (NUM_INPUTS if name in TINY_CHECKPOINTS else 1)
    for j in range(num_inputs):
        with torch.no_grad():
            logits = model(outputs[f"input{j}"])
        _assert_close(logits, outputs[f"logits{j}"], f"{name} ({layout}) logits{j}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_features_only_match_golden(golden, tiny_model_kwargs, name, layout):
    model = _create(name, layout, features_only=True)
    # the original-layout weights are the same as the Hub ones, so the Hub feature maps apply
    outputs = golden_outputs(name, "transformers")
    for j in range(NUM_INPUTS):
        with torch.no_grad():
            features = model(outputs[f"input{j}"])
        assert len(features) == NUM_STAGES
        for s, feature in enumerate(features):
            _assert_close(feature, outputs[f"feature{j}.{s}"], f"{name} ({layout}) feature{j}.{s}")


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_forward_intermediates_match_golden(golden, tiny_model_kwargs, name):
    model = _create(name, "transformers")
    outputs = golden_outputs(name, "transformers")
    for j in range(NUM_INPUTS):
        with torch.no_grad():
            final, intermediates = model.forward_intermediates(outputs[f"input{j}"])
            logits = model.forward_head(final)
        assert len(intermediates) == NUM_STAGES
        for s, feature in enumerate(intermediates):
            _assert_close(feature, outputs[f"feature{j}.{s}"], f"{name} intermediate{j}.{s}")
        _assert_close(logits, outputs[f"logits{j}"], f"{name} forward_head(forward_intermediates) logits{j}")


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_hidden_states_match_golden(golden, tiny_model_kwargs, name):
    """transformers' reshaped_hidden_states: normed stem output, then each stage after its
    downsampler (= the input of timm's next stage after its downsample), then the last stage."""
    model = _create(name, "transformers")
    outputs = golden_outputs(name, "transformers")
    taps = [model.patch_embed] + [model.stages[s].downsample for s in range(1, NUM_STAGES)] + [model.stages[-1]]
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.permute(0, 3, 1, 2))) for m in taps]
    try:
        for j in range(NUM_INPUTS):
            captured.clear()
            with torch.no_grad():
                model(outputs[f"input{j}"])
            assert len(captured) == NUM_STAGES + 1
            for s, hidden in enumerate(captured):
                _assert_close(hidden, outputs[f"hidden{j}.{s}"], f"{name} hidden{j}.{s}")
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_golden_inputs_include_padding_cases(golden, tiny_model_kwargs, name):
    """Guard on the test data itself: some golden input must make a stage's map smaller than
    kernel x dilation, so the padding path is what the tests above verified."""
    kwargs = tiny_model_kwargs(name)
    dilations = kwargs.get("dilations") or [[1] * d for d in kwargs["depths"]]
    outputs = golden_outputs(name, "transformers")
    padded = False
    for j in range(NUM_INPUTS):
        for s in range(NUM_STAGES):
            height, width = outputs[f"feature{j}.{s}"].shape[-2:]
            window = kwargs["kernel_size"] * max(dilations[s])
            padded |= height < window or width < window
    assert padded


# --- ViT-RPB at other resolutions ----------------------------------------------------------------

def test_vitrpb_at_non_native_size_uses_timm_resized_table(golden, tiny_model_kwargs):
    native = _create("vitrpb_test_tiny", "original")  # 128 input: 8x8 map, 15x15 tables
    at_160 = _create("vitrpb_test_tiny", "original", img_size=160)  # tables resized on load
    original = torch.load(golden / "orig" / "vitrpb_test_tiny.pth", weights_only=True)
    for i, block in enumerate(at_160.blocks):
        expected = resize_rel_pos_bias_table(
            original[f"layers.{i}.attn.rpb"], new_window_size=(10, 10), new_bias_shape=(4, 19, 19))
        assert block.attn.rpb.shape == (4, 19, 19)
        assert torch.equal(block.attn.rpb, expected)
        assert torch.equal(native.blocks[i].attn.rel_pos_bias_table((10, 10)), expected)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        resized_at_run_time, resized_on_load = native(x), at_160(x)
    assert torch.isfinite(resized_at_run_time).all()
    assert max_abs_diff(resized_at_run_time, resized_on_load) <= 1e-6


# --- checkpoint filters -------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILTERS)
def test_filter_accepts_every_layout_wrapped_or_not(golden, tiny_model_kwargs, name):
    model = _create(name, "original")
    expected = model.state_dict()
    original = torch.load(golden / "orig" / f"{name}.pth", weights_only=True)
    sources = [original, {"state_dict": original}, {"model": original}, dict(expected)]  # the last: timm's own
    if name in TINY_CHECKPOINTS:
        hub = torch.load(golden / "hf" / name / "pytorch_model.bin", weights_only=True)
        # a headless transformers NatModel / DinatModel checkpoint has no 'nat.' / 'dinat.' prefix
        sources += [hub, {k.removeprefix("dinat.").removeprefix("nat."): v for k, v in hub.items()}]
    for source in sources:
        converted = FILTERS[name].checkpoint_filter_fn(source, model)
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], v) for k, v in expected.items())


@pytest.mark.parametrize("name, key, replacement, expected", [
    ("dinat_test_tiny", "levels.0.blocks.0.attn.relative_position_index", torch.zeros(3),
     "1 unexpected key(s): stages.0.blocks.0.attn.relative_position_index"),
    ("dinat_test_tiny", "levels.2.blocks.1.gamma2", None, "1 missing key(s): stages.2.blocks.1.ls2.gamma"),
    ("dinat_test_tiny", "levels.1.blocks.0.attn.rpb", torch.zeros(2, 7, 7),
     "stages.1.blocks.0.attn.rpb: checkpoint (2, 7, 7) vs model (2, 5, 5)"),
    ("dinat_s_test_tiny", "layers.2.downsample.norm.bias", None, "missing key(s): stages.3.downsample.norm.bias"),
    ("nat_isotropic_test_tiny", "layers.1.attn.rpb", torch.zeros(4, 7, 7),
     "blocks.1.attn.rpb: checkpoint (4, 7, 7) vs model (4, 5, 5)"),
])
def test_filter_lists_every_bad_key(golden, tiny_model_kwargs, name, key, replacement, expected):
    arch, kwargs = golden_arch_and_kwargs(name)
    model = timm.create_model(arch, num_classes=10, **kwargs)
    checkpoint = torch.load(golden / "orig" / f"{name}.pth", weights_only=True)
    if replacement is None:
        del checkpoint[key]
    else:
        checkpoint[key] = replacement
    with pytest.raises(RuntimeError, match="does not match the model") as info:
        FILTERS[name].checkpoint_filter_fn(checkpoint, model)
    assert expected in str(info.value)


@pytest.mark.parametrize("name, layout", [
    ("dinat_test_tiny", "transformers"), ("dinat_s_test_tiny", "original"), ("vitrpb_test_tiny", "original")])
def test_pretrained_with_another_head_size_reinitialises_only_the_head(golden, tiny_model_kwargs, name, layout):
    same = _create(name, layout)
    other = _create(name, layout, num_classes=5)
    assert other.get_classifier().out_features == 5
    same_state, other_state = same.state_dict(), other.state_dict()
    body = [k for k in same_state if not k.startswith("head.")]
    assert all(torch.equal(same_state[k], other_state[k]) for k in body)


@pytest.mark.parametrize("in_chans", [1, 4])
@pytest.mark.parametrize("name, layout", [
    ("dinat_test_tiny", "transformers"), ("nat_test_tiny", "original"), ("dinat_s_test_tiny", "original"),
    ("nat_isotropic_test_tiny", "original"), ("vitrpb_test_tiny", "original")])
def test_pretrained_with_other_input_channels_adapts_the_first_conv(golden, tiny_model_kwargs, name, layout, in_chans):
    """Issue 10 #6: ``in_chans != 3`` with pretrained weights failed the strict shape check for
    every family. timm's ``adapt_input_conv`` sums the RGB filters for one channel and repeats them
    scaled by 3/4 for four, so a grey image replicated to RGB, or an RGB image padded with a zero
    channel and scaled by 4/3, gives the 3-channel model's output."""
    rgb_model = _create(name, layout)
    model = _create(name, layout, in_chans=in_chans)
    first_conv = model.pretrained_cfg["first_conv"] + ".weight"
    rgb_weight = rgb_model.state_dict()[first_conv]
    assert torch.equal(model.state_dict()[first_conv], adapt_input_conv(in_chans, rgb_weight))
    body = [k for k in rgb_model.state_dict() if k != first_conv]
    assert all(torch.equal(model.state_dict()[k], rgb_model.state_dict()[k]) for k in body)
    rgb = golden_outputs(name, layout)["input0"]
    if in_chans == 1:
        x = rgb.mean(dim=1, keepdim=True)
        rgb = x.expand(-1, 3, -1, -1)
    else:
        x = torch.cat([rgb, torch.zeros_like(rgb[:, :1])], dim=1) * (4 / 3)
    with torch.no_grad():
        assert max_abs_diff(model(x), rgb_model(rgb)) <= 1e-5
