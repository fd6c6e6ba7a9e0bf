"""The registered NAT/DiNAT models reproduce the golden outputs of the legacy stack (NATTEN 0.17 +
transformers 4.40) on the golden tiny checkpoints, loaded through timm's public pretrained path,
in both published layouts (transformers ``pytorch_model.bin`` and the original ``.pth``)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.models.nat import checkpoint_filter_fn
from timm_nat.pretrained import load_registry

ATOL = 1e-4  # README: ~1e-6 expected in fp32, above 1e-4 is a bug
NUM_INPUTS = 5  # input0..input4, several with maps smaller than kernel x dilation
NUM_STAGES = 4

# golden tiny checkpoint -> registered architecture it is a shrunken copy of
TINY_CHECKPOINTS = {"nat_test_tiny": "nat_mini", "dinat_test_tiny": "dinat_mini"}
LAYOUTS = ("transformers", "original")


def _checkpoint_path(golden, name: str, layout: str):
    if layout == "transformers":
        return golden / "hf" / name / "pytorch_model.bin"
    return golden / "orig" / f"{name}.pth"


def _golden_outputs(golden, name: str, layout: str) -> dict:
    if layout == "transformers":
        return load_file(golden / "hf" / name / "golden.safetensors")
    return load_file(golden / "orig" / f"{name}.golden.safetensors")


def _create(golden, tiny_model_kwargs, name: str, layout: str, **kwargs) -> torch.nn.Module:
    """The public path: timm.create_model(..., pretrained=True) with the checkpoint file as source."""
    path = _checkpoint_path(golden, name, layout)
    model = timm.create_model(
        TINY_CHECKPOINTS[name],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        num_classes=10,
        **tiny_model_kwargs(name),
        **kwargs,
    )
    return model.eval()


def _max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != golden {tuple(expected.shape)}"
    return (actual - expected).abs().max().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = _max_abs_diff(actual, expected)
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3e} > {ATOL}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_logits_match_golden(golden, tiny_model_kwargs, name, layout):
    model = _create(golden, tiny_model_kwargs, name, layout)
    outputs = _golden_outputs(golden, name, layout)
    for j in range(NUM_INPUTS):
        with torch.no_grad():
            logits = model(outputs[f"input{j}"])
        _assert_close(logits, outputs[f"logits{j}"], f"{name} ({layout}) logits{j}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_features_only_match_golden(golden, tiny_model_kwargs, name, layout):
    model = _create(golden, tiny_model_kwargs, name, layout, features_only=True)
    # the original-layout weights are the same as the Hub ones, so the Hub feature maps apply
    outputs = _golden_outputs(golden, name, "transformers")
    for j in range(NUM_INPUTS):
        with torch.no_grad():
            features = model(outputs[f"input{j}"])
        assert len(features) == NUM_STAGES
        for s, feature in enumerate(features):
            _assert_close(feature, outputs[f"feature{j}.{s}"], f"{name} ({layout}) feature{j}.{s}")


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_forward_intermediates_match_golden(golden, tiny_model_kwargs, name):
    model = _create(golden, tiny_model_kwargs, name, "transformers")
    outputs = _golden_outputs(golden, name, "transformers")
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
    model = _create(golden, tiny_model_kwargs, name, "transformers")
    outputs = _golden_outputs(golden, name, "transformers")
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
    outputs = _golden_outputs(golden, name, "transformers")
    padded = False
    for j in range(NUM_INPUTS):
        for s in range(NUM_STAGES):
            height, width = outputs[f"feature{j}.{s}"].shape[-2:]
            window = kwargs["kernel_size"] * max(dilations[s])
            padded |= height < window or width < window
    assert padded


# --- key layouts of every published checkpoint (shapes/*.json), checked on the meta device ---

# original-repo registrations whose ImageNet-22k weights timm-nat files under another architecture
# (weights/checkpoints.toml: dinat_large.in22k, dinat_large_384_11x11.in22k)
ORIGINAL_NAME_TO_ARCH = {"dinat_large_21k": "dinat_large", "dinat_large_21k_11x11": "dinat_large_384_11x11"}
OTHER_FAMILIES = ("orig_dinat_s_", "isotropic", "vitrpb")  # covered by another issue


def _nat_family_layouts(golden) -> list:
    paths = sorted((golden / "shapes").glob("*.json"))
    selected = [
        p for p in paths
        if p.name.startswith(("nat-", "dinat-", "orig_nat_", "orig_dinat_"))
        and not any(tag in p.name for tag in OTHER_FAMILIES)
    ]
    assert selected, f"no NAT/DiNAT layout files in {golden / 'shapes'}"
    return selected


def _architecture_for_layout(layout: dict) -> str:
    if layout["format"] == "transformers":
        return _architecture_for_hub_id(layout["repo"])
    return ORIGINAL_NAME_TO_ARCH.get(layout["model"], layout["model"])


def _architecture_for_hub_id(hub_id: str) -> str:
    models = {e["model"] for e in load_registry() if e.get("hf_hub_id") == hub_id}
    assert len(models) == 1, f"{hub_id} should name exactly one registered architecture, got {models}"
    return models.pop()


def test_layout_files_cover_every_published_checkpoint(golden):
    """Guard on the selection: every Hub repo in the registry has a layout file, and every
    registered architecture has an original-layout file."""
    layouts = [json.loads(p.read_text()) for p in _nat_family_layouts(golden)]
    registered = set(timm.list_models(module="nat"))
    hub_ids = {e["hf_hub_id"] for e in load_registry() if e["model"] in registered and "hf_hub_id" in e}
    assert {layout["repo"] for layout in layouts if layout["format"] == "transformers"} == hub_ids
    original_archs = {_architecture_for_layout(layout) for layout in layouts if layout["format"] == "original"}
    assert original_archs == registered


def test_every_published_layout_maps_onto_its_registered_model(golden):
    for path in _nat_family_layouts(golden):
        layout = json.loads(path.read_text())
        arch = _architecture_for_layout(layout)
        assert arch in timm.list_models(module="nat"), f"{path.name}: {arch} is not registered"
        head_key = "classifier.weight" if layout["format"] == "transformers" else "head.weight"
        num_classes = layout["keys"][head_key][0]
        model = timm.create_model(arch, device="meta", num_classes=num_classes)
        checkpoint = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}

        converted = checkpoint_filter_fn(checkpoint, model)

        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert sorted(set(got) - set(expected)) == [], f"{path.name}: left over"
        assert sorted(set(expected) - set(got)) == [], f"{path.name}: missing"
        assert got == expected, f"{path.name}: shapes differ"
        num_params = sum(p.numel() for p in model.parameters())
        assert num_params == layout["num_params"], f"{path.name}: {num_params} params != {layout['num_params']}"
        model.load_state_dict(converted, strict=True, assign=True)
