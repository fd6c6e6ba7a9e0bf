"""The timm model contract, for every registered architecture (as timm's tests/test_models.py):
forward and head, backward, features_only, forward_intermediates, pruning, reset_classifier,
gradient checkpointing, weight-decay / layer-decay groups, any input size, torch.compile.

The contract runs on shrunken copies of each architecture (its kernel, dilations, stem, patch, MLP
ratio, layer scale and input size kept; fewer channels and blocks): what these tests check does not
depend on width or depth. Real sizes appear only where they are the point: every published key
layout (``shapes/*.json``) loads strictly into its architecture (and its exact parameter count), on
the meta device.
"""
import json

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.layers import QkvAttention2d, RelPosGlobalAttention
from timm_nat.models import model_families, nat
from timm_nat.pretrained import load_registry

from conftest import ARCHITECTURES, family_name, is_hierarchical, max_abs_diff, tiny_kwargs

SMALL_INPUT = (1, 3, 64, 64)
NUM_CLASSES = 10

def _narrow(arch: str, **kwargs) -> torch.nn.Module:
    """``arch`` with few channels and blocks (its kernel, dilations, stem, patch, MLP ratio, layer
    scale and default input size kept), random weights, eval."""
    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=NUM_CLASSES, **tiny_kwargs(arch, **kwargs)).eval()


def _trunk(model) -> torch.nn.Sequential:
    """The stages (hierarchical) or blocks (isotropic) whose outputs are the intermediates."""
    return model.stages if hasattr(model, "stages") else model.blocks


def _expected_map_sizes(arch: str, height: int, width: int, count: int) -> list:
    if not is_hierarchical(arch):  # patch embedding pads to a multiple of 16, then one resolution
        return [(-(-height // 16), -(-width // 16))] * count
    sizes = []
    for stage in range(count):
        stride = 4 if stage == 0 else 2  # the stem pads to a multiple of 4; each downsampler rounds up
        height, width = -(-height // stride), -(-width // stride)
        sizes.append((height, width))
    return sizes


# --- forward and head -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_at_default_size(arch):
    model = _narrow(arch)
    _, height, width = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, height, width))
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    reduction = model.feature_info[-1]["reduction"]
    assert features.shape == (1, height // reduction, width // reduction, model.num_features)
    assert tuple(features.shape[1:3]) == model.pretrained_cfg["pool_size"]
    assert max_abs_diff(pooled, features.mean(dim=(1, 2))) <= 1e-6
    assert max_abs_diff(logits, model.get_classifier()(pooled)) <= 1e-6
    assert logits.shape == (1, NUM_CLASSES) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_backward_reaches_every_parameter(arch):
    model = _narrow(arch).train()
    logits = model(torch.randn(*SMALL_INPUT))
    (logits * torch.randn_like(logits)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reset_classifier(arch):
    model = _narrow(arch)
    x = torch.randn(*SMALL_INPUT)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (1, 5)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_any_input_size(arch):
    model = _narrow(arch)
    for height, width in [(33, 47), (200, 120), (16, 16), (16, 160)]:
        with torch.no_grad():
            final, maps = model.forward_intermediates(torch.randn(1, 3, height, width))
            logits = model.forward_head(final)
        assert [tuple(m.shape[-2:]) for m in maps] == _expected_map_sizes(arch, height, width, len(maps))
        assert all(torch.isfinite(m).all() for m in maps)
        assert logits.shape == (1, NUM_CLASSES) and torch.isfinite(logits).all()


def test_torch_compile_full_graph():
    model = _narrow("dinat_mini")
    x = torch.randn(*SMALL_INPUT)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        assert max_abs_diff(compiled(x), model(x)) <= 1e-6


# --- features ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_intermediates_are_the_trunk_outputs(arch):
    model = _narrow(arch)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        hidden, manual = model.patch_embed(x), []
        for stage_or_block in _trunk(model):
            hidden = stage_or_block(hidden)
            manual.append(hidden.permute(0, 3, 1, 2))
        features = model.forward_features(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        normed_last = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NHWC", intermediates_only=True)
        normed_second = model.forward_intermediates(x, indices=[1], norm=True, output_fmt="NHWC", intermediates_only=True)
    assert len(intermediates) == len(_trunk(model)) == 4
    assert max(max_abs_diff(a, b) for a, b in zip(intermediates, manual)) <= 1e-6
    assert max_abs_diff(final, model.norm(manual[-1].permute(0, 2, 3, 1))) <= 1e-6
    assert max_abs_diff(final, features) == 0.0
    assert [max_abs_diff(a, b) for a, b in zip(last_two, intermediates[-2:])] == [0.0, 0.0]
    assert max_abs_diff(early[0], intermediates[0]) == 0.0
    assert max_abs_diff(normed_last[0], features) == 0.0
    # hierarchical: the final norm is sized for (and applied to) the last stage only; isotropic: every block
    second = intermediates[1].permute(0, 2, 3, 1)
    expected_second = second if is_hierarchical(arch) else model.norm(second)
    assert max_abs_diff(normed_second[0], expected_second) <= 1e-6


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_features_only_agrees_with_forward_intermediates(arch):
    model = _narrow(arch)
    x = torch.randn(1, 3, 96, 72)
    for out_indices in (None, (1, 3)):
        feature_model = _narrow(arch, features_only=True, **({} if out_indices is None else dict(out_indices=out_indices)))
        # share the weights; the feature model lost norm, head and the trunk after its last output
        result = feature_model.model.load_state_dict(model.state_dict(), strict=False)
        info = feature_model.feature_info
        trunk_name = "stages" if is_hierarchical(arch) else "blocks"
        assert result.missing_keys == []
        assert all(k.startswith(("norm.", "head.")) or (k.split(".")[0] == trunk_name and int(k.split(".")[1]) > max(info.out_indices))
                   for k in result.unexpected_keys)
        with torch.no_grad():
            maps = feature_model(x)
            intermediates = model.forward_intermediates(x, indices=info.out_indices, intermediates_only=True)
        default_count = 4 if is_hierarchical(arch) else 3  # every stage / the last 3 blocks
        assert len(maps) == len(intermediates) == (default_count if out_indices is None else 2)
        assert [max_abs_diff(a, b) for a, b in zip(maps, intermediates)] == [0.0] * len(maps)
        assert [m.shape[1] for m in maps] == info.channels()
        if is_hierarchical(arch):
            expected = [4, 8, 16, 32] if out_indices is None else [8, 32]
        else:
            expected = [16] * len(maps)
        assert info.reduction() == expected
        assert all(-(-x.shape[-1] // r) == m.shape[-1] for m, r in zip(maps, info.reduction()))
        if is_hierarchical(arch) and out_indices is not None:
            assert info.channels() == [32, 128]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prune_intermediate_layers_keeps_what_is_needed(arch):
    model = _narrow(arch)
    x = torch.randn(*SMALL_INPUT)
    with torch.no_grad():
        reference = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(_trunk(model)) == 2 and model.num_classes == 0
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
        output = model(x)
    assert [max_abs_diff(a, b) for a, b in zip(pruned, reference[:2])] == [0.0, 0.0]
    if is_hierarchical(arch):
        # as in timm's swin: no norm, no pooling, no classifier left, so forward gives the last kept map (NHWC)
        assert isinstance(model.norm, torch.nn.Identity)
        assert max_abs_diff(output, reference[1].permute(0, 2, 3, 1)) == 0.0


# --- training hooks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_grad_checkpointing_gives_same_outputs_and_grads(arch):
    x = torch.randn(*SMALL_INPUT)
    results = []
    for enable in (False, True):
        model = _narrow(arch).train()
        model.set_grad_checkpointing(enable)
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits_off, grads_off), (logits_on, grads_on) = results
    assert max_abs_diff(logits_on, logits_off) <= 1e-6
    assert max(max_abs_diff(a, b) for a, b in zip(grads_on, grads_off)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_weight_decay_and_layer_wise_lr_groups(arch):
    model = _narrow(arch)
    names = model.no_weight_decay()
    assert len(names) == sum(isinstance(m, QkvAttention2d) for m in model.modules()) > 0
    assert all(n.endswith(".attn.rpb") and model.get_parameter(n).dim() == 3 for n in names)
    # timm's optimizer factory reads group_matcher() and no_weight_decay() from the model
    groups = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5).param_groups
    owner = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = group
    assert len(owner) == len(list(model.parameters()))
    scale = {n: owner[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    if is_hierarchical(arch):
        first, last = "stages.0.blocks.0", f"stages.3.blocks.{len(model.stages[3].blocks) - 1}"
    else:
        first, last = "blocks.0", f"blocks.{len(model.blocks) - 1}"
    first_conv = model.pretrained_cfg["first_conv"] + ".weight"
    assert scale[first_conv] < scale[f"{first}.attn.qkv.weight"] < scale[f"{last}.attn.qkv.weight"]
    assert scale["head.fc.weight"] == 1.0
    assert all(owner[id(model.get_parameter(n))]["weight_decay"] == 0.0 for n in names)


# --- every published key layout at real size (shapes/*.json, meta device) ---------------------------

# original registrations whose weights timm-nat files as a tag of another architecture (registry)
ORIGINAL_NAME_TO_ARCH = {
    "dinat_large_21k": "dinat_large", "dinat_large_21k_11x11": "dinat_large_384_11x11",
    "dinat_s_large_21k": "dinat_s_large",
}
HUB_LAYOUT_TO_ARCH = {e["hf_hub_id"].split("/")[1]: e["model"] for e in load_registry() if "hf_hub_id" in e}
ORIGINAL_LAYOUT_TO_ARCH = {f"orig_{a}": a for a in ARCHITECTURES} | {f"orig_{n}": a for n, a in ORIGINAL_NAME_TO_ARCH.items()}
LAYOUT_TO_ARCH = HUB_LAYOUT_TO_ARCH | ORIGINAL_LAYOUT_TO_ARCH


def _load_layout(golden, layout_name: str, **kwargs):
    """Build the layout's architecture at real size on the meta device and load the layout's
    state dict (meta tensors: shapes only) strictly through the family's checkpoint filter."""
    layout = json.loads((golden / "shapes" / f"{layout_name}.json").read_text())
    arch = LAYOUT_TO_ARCH[layout_name]
    head_key = "classifier.weight" if layout["format"] == "transformers" else "head.weight"
    model = timm.create_model(arch, device="meta", num_classes=layout["keys"][head_key][0], **kwargs)
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}
    converted = model_families()[family_name(arch)].checkpoint_filter_fn(checkpoint, model)
    return model, layout, converted


def test_layout_files_are_every_published_checkpoint(golden):
    """Guard on the parametrisation: one layout file per Hub repo of the registry and per
    original registration, and nothing else."""
    assert {p.stem for p in (golden / "shapes").glob("*.json")} == set(LAYOUT_TO_ARCH)
    for name in LAYOUT_TO_ARCH:
        layout = json.loads((golden / "shapes" / f"{name}.json").read_text())
        if name in HUB_LAYOUT_TO_ARCH:
            assert layout["format"] == "transformers" and layout["repo"].endswith("/" + name)
        else:
            assert layout["format"] == "original" and layout["model"] == name.removeprefix("orig_")


@pytest.mark.parametrize("layout_name", sorted(LAYOUT_TO_ARCH))
def test_published_layout_loads_strictly(golden, layout_name):
    model, layout, converted = _load_layout(golden, layout_name)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(got) - set(expected)) == [], "left over"
    assert sorted(set(expected) - set(got)) == [], "missing"
    assert got == expected, "shapes differ"
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    model.load_state_dict(converted, strict=True, assign=True)
    if "vitrpb" in layout_name:  # the derived index buffer is dropped, not loaded
        assert any(k.endswith("relative_position_index") for k in layout["keys"])
        assert not any("relative_position_index" in k for k in model.state_dict())


def test_vitrpb_layout_loads_at_another_resolution(golden):
    model, _, converted = _load_layout(golden, "orig_vitrpb_small", img_size=384)
    model.load_state_dict(converted, strict=True, assign=True)
    tables = {tuple(m.rpb.shape) for m in model.modules() if isinstance(m, RelPosGlobalAttention)}
    assert tables == {(12, 47, 47)}  # 24x24 map at 384


# --- checkpoint plumbing shared by the families (models/_helpers.py) --------------------------------

def test_shared_renames_of_the_published_layouts():
    from timm_nat.models._helpers import downsample_to_next_stage, original_head_key
    assert downsample_to_next_stage("levels.2.downsample.norm.weight", "levels.") == "stages.3.downsample.norm.weight"
    assert downsample_to_next_stage("encoder.levels.0.downsample.reduction.weight", "encoder.levels.") == (
        "stages.1.downsample.reduction.weight")
    assert downsample_to_next_stage("layers.1.downsample.reduction.weight", "layers.") == "stages.2.downsample.reduction.weight"
    assert downsample_to_next_stage("levels.2.blocks.0.attn.rpb", "levels.") is None
    assert downsample_to_next_stage("xlevels.2.downsample.norm.weight", "levels.") is None
    assert original_head_key("head.weight") == "head.fc.weight"
    assert original_head_key("head.fc.bias") == "head.fc.bias" and original_head_key("norm.bias") == "norm.bias"


@pytest.mark.parametrize("family", sorted(model_families()))
def test_remap_checkpoint_is_pure(family):
    arch = {"nat": "dinat_mini", "dinat_s": "dinat_s_tiny", "isotropic": "vitrpb_small"}[family]
    state_dict = _narrow(arch).state_dict()
    keys_before = list(state_dict)
    remapped = model_families()[family].remap_checkpoint(state_dict)
    assert remapped is not state_dict and list(state_dict) == keys_before  # input untouched
    assert remapped.keys() == state_dict.keys()  # timm's own layout is returned as is
    assert all(remapped[k] is v for k, v in state_dict.items())


def test_incomplete_transformers_qkv_is_an_error():
    checkpoint = {"dinat.encoder.levels.0.layers.0.attention.self.query.weight": torch.zeros(4, 4),
                  "dinat.encoder.levels.0.layers.0.attention.self.key.weight": torch.zeros(4, 4)}
    with pytest.raises(RuntimeError, match=r"incomplete query/key/value for stages.0.blocks.0.attn.qkv.weight: "
                                           r"only \['key', 'query'\]"):
        nat.remap_checkpoint(checkpoint)


def test_state_dict_problems_and_input_conv_adaptation():
    from timm_nat.models._helpers import adapt_input_conv_weight, state_dict_problems
    model = _narrow("dinat_s_tiny")
    state_dict = model.state_dict()
    assert state_dict_problems(state_dict, model) == []
    grey = _narrow("dinat_s_tiny", in_chans=1)
    adapted = adapt_input_conv_weight(state_dict, grey, "patch_embed.proj")
    assert adapted is not state_dict and state_dict["patch_embed.proj.weight"].shape[1] == 3  # input untouched
    assert torch.equal(adapted["patch_embed.proj.weight"], state_dict["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert state_dict_problems(adapted, grey) == []
    assert adapt_input_conv_weight(state_dict, model, "patch_embed.proj") is state_dict  # same channels: as is
    # another difference than the input channels is not adapted but reported
    wider = _narrow("dinat_s_tiny", in_chans=1, embed_dim=32, num_heads=(1, 2, 4, 8))
    problems = state_dict_problems(adapt_input_conv_weight(state_dict, wider, "patch_embed.proj"), wider)
    assert "patch_embed.proj.weight: checkpoint (16, 3, 4, 4) vs model (32, 1, 4, 4)" in problems[0]
    assert state_dict_problems(state_dict, model, skip_keys=()) == []
    assert state_dict_problems({k: v for k, v in state_dict.items() if k != "head.fc.bias"}, model) == []
    assert state_dict_problems({k: v for k, v in state_dict.items() if k != "head.fc.bias"}, model, skip_keys=()) == [
        "1 missing key(s): head.fc.bias"]


def test_pool_size_follows_the_family_reduction():
    from timm_nat.models._helpers import family_cfg
    cfg = family_cfg(first_conv="patch_embed.proj", reduction=16, input_size=(3, 384, 320))
    assert cfg["pool_size"] == (24, 20) and cfg["first_conv"] == "patch_embed.proj"
    assert family_cfg(first_conv="patch_embed.proj.0", reduction=32)["pool_size"] == (7, 7)


def test_timm_lists_exactly_the_declared_architectures():
    """What timm registered (entrypoints in timm_nat modules) is what the family declarations list."""
    from timm.models import model_entrypoint

    registered = sorted(m for m in timm.list_models() if model_entrypoint(m).__module__.startswith("timm_nat."))
    assert registered == ARCHITECTURES and len(ARCHITECTURES) == 22


# --- a new family: one module plus registry rows --------------------------------------------------

@pytest.fixture
def toy_family(monkeypatch):
    """tests/toy_family.py registered as a family module would register itself, with its registry rows;
    unregistered afterwards (from timm and from the families the converter reads)."""
    import toy_family
    from timm.models import _registry

    from timm_nat import pretrained
    from timm_nat.convert import architecture
    from timm_nat.models import _family

    registry = pretrained.load_registry
    monkeypatch.setattr(pretrained, "load_registry", lambda: registry() + toy_family.TOY_REGISTRY_ROWS)
    _family.register_family(toy_family.FAMILY)
    yield toy_family
    _family._FAMILIES.pop(toy_family.FAMILY.name)
    for arch in toy_family.FAMILY.architectures:
        _registry._clear_model_entries(arch)
        _registry._model_entrypoints.pop(arch)
    architecture._meta_model_cached.cache_clear()


def test_a_new_family_is_one_module_plus_registry_rows(toy_family, tmp_path, capsys):
    """Declaration -> timm.create_model -> the converter reads its sizes from a checkpoint in the
    family's published layout, converts and verifies it -> timm loads the converted folder."""
    from timm_nat.convert import infer_architecture, main

    model = timm.create_model("toy_nat_small")
    assert isinstance(model, toy_family.ToyNat) and model.pretrained_cfg["tag"] == "in1k"
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and "toy_nat_small" in timm.list_models(module="toy_family")
    torch.manual_seed(0)
    trained = timm.create_model("toy_nat_small", embed_dim=16, depth=3, num_heads=4, kernel_size=5, num_classes=7).eval()
    published = {k.replace("patch_embed.", "stem.").replace("blocks.", "layers.").replace("head.fc.", "classifier."): v
                 for k, v in trained.state_dict().items()}
    arch = infer_architecture(published)
    assert (arch.model, arch.model_args, arch.num_classes) == (
        "toy_nat_small", dict(embed_dim=16, depth=3, num_heads=4, kernel_size=5), 7)
    torch.save(published, tmp_path / "toy.pth")
    assert main([str(tmp_path / "toy.pth"), "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
