"""The rest of the zoo: DiNAT_s (``dinat_s_*``) and the isotropic NAT / DiNAT / ViT-RPB models.

Golden tiny checkpoints in the original layout reproduce the legacy stack's logits through timm's
public pretrained path; every registered architecture loads its real-size original layout strictly
and runs at its default size. Backward and features run on narrowed copies of every architecture
(same depths, kernels and dilations, fewer channels), the rest of the timm API on the golden tiny
configurations, to keep the runtime modest.
"""
import json
import tomllib

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resize_rel_pos_bias_table
from timm.optim import create_optimizer_v2

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.attention import na2d
from timm_nat.models import dinat_s, isotropic
from timm_nat.pretrained import registry_path

ATOL = 1e-4  # golden README: ~1e-6 expected in fp32, above 1e-4 is a bug
DINAT_S_ARCHS = sorted(timm.list_models(module="dinat_s"))
ISOTROPIC_ARCHS = sorted(timm.list_models(module="isotropic"))
ALL_ARCHS = sorted(DINAT_S_ARCHS + ISOTROPIC_ARCHS)
SMALL_INPUT = (1, 3, 64, 64)

# golden README: DiNAT_s embed 16, depths 2-2-2-2, heads 1-2-4-8, kernel 3, dilations
# [[1,8],[1,4],[1,2],[1,1]], mlp 2.0; isotropic 128x128 input, patch 16, embed 32, depth 4, heads 4,
# kernel 3 (DiNAT-iso: dilation 2 on odd layers; ViT-RPB: global attention); 10 classes.
_TINY_ISOTROPIC = dict(img_size=128, embed_dim=32, depth=4, num_heads=4)
GOLDEN_TINY = {
    "dinat_s_test_tiny": ("dinat_s_tiny", dict(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3,
        dilations=((1, 8), (1, 4), (1, 2), (1, 1)), mlp_ratio=2.)),
    "nat_isotropic_test_tiny": ("nat_isotropic_small", dict(_TINY_ISOTROPIC, kernel_size=3)),
    "dinat_isotropic_test_tiny": ("dinat_isotropic_small", dict(_TINY_ISOTROPIC, kernel_size=3)),
    "vitrpb_test_tiny": ("vitrpb_small", _TINY_ISOTROPIC),
}

# original registrations whose weights timm-nat files as a tag of another architecture (registry)
ORIGINAL_NAME_TO_ARCH = {"dinat_s_large_21k": "dinat_s_large"}
# shapes/orig_<name>.json: one per original registration of these families
LAYOUTS = sorted([f"orig_{arch}" for arch in ALL_ARCHS] + [f"orig_{name}" for name in ORIGINAL_NAME_TO_ARCH])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _narrow(arch: str, **kwargs) -> torch.nn.Module:
    """The registered architecture with few channels (its depths, kernel and dilations kept)."""
    torch.manual_seed(0)
    if arch in DINAT_S_ARCHS:
        narrow = dict(embed_dim=16, num_heads=(1, 2, 4, 8))
    else:
        narrow = dict(embed_dim=32, num_heads=4, img_size=128)
    return timm.create_model(arch, num_classes=10, **dict(narrow, **kwargs)).eval()


def _tiny(arch: str, **kwargs) -> torch.nn.Module:
    """The golden tiny configuration of ``arch`` (one of the four in GOLDEN_TINY), random weights."""
    torch.manual_seed(0)
    tiny_kwargs = next(k for a, k in GOLDEN_TINY.values() if a == arch)
    return timm.create_model(arch, num_classes=10, **dict(tiny_kwargs, **kwargs)).eval()


def _golden_tiny(golden, name: str, **kwargs) -> torch.nn.Module:
    """The public path: timm.create_model(..., pretrained=True) with the golden .pth as the weights file."""
    arch, arch_kwargs = GOLDEN_TINY[name]
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(golden / "orig" / f"{name}.pth"), num_classes=10),
        num_classes=10,
        **dict(arch_kwargs, **kwargs),
    ).eval()


def _filter_for(arch: str):
    return (dinat_s if arch in DINAT_S_ARCHS else isotropic).checkpoint_filter_fn


# --- golden tiny checkpoints (original layout) --------------------------------------------------

@pytest.mark.parametrize("name", GOLDEN_TINY)
def test_golden_logits(golden, name):
    model = _golden_tiny(golden, name)
    outputs = load_file(golden / "orig" / f"{name}.golden.safetensors")
    with torch.no_grad():
        logits = model(outputs["input0"])
    diff = _max_abs_diff(logits, outputs["logits0"])
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3e} > {ATOL}"


# --- registry and pretrained cfgs ---------------------------------------------------------------

def _registry_entries() -> list:
    with registry_path().open("rb") as f:
        entries = tomllib.load(f)["checkpoint"]
    return [e for e in entries if e["model"] in ALL_ARCHS]


def test_every_registry_checkpoint_is_a_pretrained_tag():
    entries = _registry_entries()
    assert sorted({e["model"] for e in entries}) == ALL_ARCHS
    assert sorted(f"{e['model']}.{e['tag']}" for e in entries) == sorted(timm.list_pretrained(ALL_ARCHS))
    assert "dinat_s_large.in22k" in timm.list_pretrained("dinat_s_large*")


@pytest.mark.parametrize("entry", _registry_entries(), ids=lambda e: f"{e['model']}.{e['tag']}")
def test_pretrained_cfg_carries_registry_facts(entry):
    model = timm.create_model(f"{entry['model']}.{entry['tag']}", device="meta")
    cfg = model.pretrained_cfg
    assert cfg["url"] == entry["url"] and cfg["url"].endswith(".pth")
    assert cfg["num_classes"] == entry["num_classes"] == model.get_classifier().out_features
    assert cfg["input_size"] == tuple(entry["input_size"])
    assert cfg["crop_pct"] == entry["crop_pct"]
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    reduction = model.feature_info[-1]["reduction"]
    assert cfg["pool_size"] == tuple(s // reduction for s in entry["input_size"][1:])


# --- real-size original layouts (shapes/orig_*.json) --------------------------------------------

def _arch_for_layout(layout_name: str) -> str:
    name = layout_name.removeprefix("orig_")
    return ORIGINAL_NAME_TO_ARCH.get(name, name)


def _load_layout(golden, layout_name: str, arch: str, device: str, **kwargs):
    """Build ``arch`` on the meta device and strictly load a state dict in the original layout of
    ``shapes/<layout_name>.json``: meta tensors (shapes only) or random values on ``device``."""
    layout = json.loads((golden / "shapes" / f"{layout_name}.json").read_text())
    num_classes = layout["keys"]["head.weight"][0]
    model = timm.create_model(arch, device="meta", num_classes=num_classes, **kwargs)
    generator = torch.Generator().manual_seed(0)
    if device == "meta":
        checkpoint = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}
    else:
        checkpoint = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in layout["keys"].items()}
    converted = _filter_for(arch)(checkpoint, model)
    model.load_state_dict(converted, strict=True, assign=True)
    return model, layout


def test_layouts_are_every_original_registration_of_these_families(golden):
    on_disk = {p.stem for p in (golden / "shapes").glob("orig_*.json")
               if p.stem.startswith(("orig_dinat_s_", "orig_vitrpb_")) or "isotropic" in p.stem}
    assert on_disk == set(LAYOUTS)
    assert all(json.loads((golden / "shapes" / f"{n}.json").read_text())["model"] == n.removeprefix("orig_") for n in LAYOUTS)


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_original_layout_loads_strictly(golden, layout_name):
    model, layout = _load_layout(golden, layout_name, _arch_for_layout(layout_name), device="meta")
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    if "vitrpb" in layout_name:  # the derived index buffer is dropped, not loaded
        assert any(k.endswith("relative_position_index") for k in layout["keys"])
        assert not any("relative_position_index" in k for k in model.state_dict())


def test_vitrpb_layout_loads_at_another_resolution(golden):
    model, _ = _load_layout(golden, "orig_vitrpb_small", "vitrpb_small", device="meta", img_size=384)
    assert {tuple(m.rpb.shape) for m in model.modules() if isinstance(m, isotropic.RelPosGlobalAttention)} == {
        (12, 47, 47)}  # 24x24 map at 384


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forward_at_default_size(golden, arch):
    model, _ = _load_layout(golden, f"orig_{arch}", arch, device="cpu")
    model.eval()
    _, height, width = model.pretrained_cfg["input_size"]
    reduction = model.feature_info[-1]["reduction"]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, height, width))
        logits = model.forward_head(features)
    assert features.shape == (1, height // reduction, width // reduction, model.num_features)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


# --- training and features (narrowed architectures) ---------------------------------------------

@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_backward_reaches_every_parameter(arch):
    model = _narrow(arch).train()
    logits = model(torch.randn(*SMALL_INPUT))
    (logits * torch.randn_like(logits)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", DINAT_S_ARCHS)
def test_dinat_s_features_only_agrees_with_forward_intermediates(arch):
    model = _narrow(arch)
    feature_model = _narrow(arch, features_only=True)
    result = feature_model.model.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith(("norm.", "head.")) for k in result.unexpected_keys)
    x = torch.randn(1, 3, 96, 72)
    with torch.no_grad():
        maps = feature_model(x)
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    assert feature_model.feature_info.reduction() == [4, 8, 16, 32]
    assert len(maps) == len(intermediates) == 4
    for i, (a, b) in enumerate(zip(maps, intermediates)):
        assert _max_abs_diff(a, b) <= 1e-6
        assert a.shape[1] == feature_model.feature_info.channels()[i]


@pytest.mark.parametrize("arch", ISOTROPIC_ARCHS)
def test_isotropic_forward_intermediates_match_manual_blocks(arch):
    model = _narrow(arch)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        hidden, manual = model.patch_embed(x), []
        for block in model.blocks:
            hidden = block(hidden)
            manual.append(hidden.permute(0, 3, 1, 2))
        normed = model.forward_intermediates(x, indices=[2], norm=True, output_fmt="NHWC", intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert len(intermediates) == len(model.blocks) == 12
    assert max(_max_abs_diff(a, b) for a, b in zip(intermediates, manual)) <= 1e-6
    assert _max_abs_diff(final, model.norm(manual[-1].permute(0, 2, 3, 1))) <= 1e-6
    assert _max_abs_diff(normed[0], model.norm(manual[2].permute(0, 2, 3, 1))) <= 1e-6
    assert _max_abs_diff(early[0], manual[1]) <= 1e-6


@pytest.mark.parametrize("arch", ["dinat_s_tiny", "dinat_isotropic_small"])
def test_prune_intermediate_layers_keeps_what_is_needed(arch):
    model = _tiny(arch)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
    assert len(pruned) == 2 and model.num_classes == 0
    assert max(_max_abs_diff(a, b) for a, b in zip(pruned, reference[:2])) == 0.0


def test_isotropic_features_only_gives_the_last_blocks():
    model = _tiny("nat_isotropic_small")
    feature_model = _tiny("nat_isotropic_small", features_only=True, out_indices=(1, 3))
    feature_model.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = feature_model(x)
        intermediates = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert feature_model.feature_info.reduction() == [16, 16]
    assert [_max_abs_diff(a, b) for a, b in zip(maps, intermediates)] == [0.0, 0.0]


# --- head and training hooks --------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["dinat_s_tiny", "vitrpb_small"])
def test_forward_head_and_reset_classifier(arch):
    model = _tiny(arch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
    assert _max_abs_diff(pooled, features.mean(dim=(1, 2))) <= 1e-6
    assert _max_abs_diff(logits, model.get_classifier()(pooled)) <= 1e-6
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("arch", ["dinat_s_tiny", "vitrpb_small"])
def test_grad_checkpointing_gives_same_outputs_and_grads(arch):
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        model = _tiny(arch)
        model.train().set_grad_checkpointing(enable)
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits_off, grads_off), (logits_on, grads_on) = results
    assert _max_abs_diff(logits_on, logits_off) <= 1e-6
    assert max(_max_abs_diff(a, b) for a, b in zip(grads_on, grads_off)) <= 1e-5


@pytest.mark.parametrize("arch", ["dinat_s_tiny", "vitrpb_small"])
def test_no_weight_decay_and_layer_wise_groups(arch):
    model = _tiny(arch)
    names = model.no_weight_decay()
    assert len(names) == sum(1 for n, _ in model.named_parameters() if "attn" in n and n.endswith("qkv.weight"))
    assert all(n.endswith(".attn.rpb") and model.get_parameter(n).dim() == 3 for n in names)
    # timm's optimizer factory reads group_matcher() and no_weight_decay() from the model
    groups = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5).param_groups
    owner = {id(p): g for g in groups for p in g["params"]}
    assert len(owner) == len(list(model.parameters()))
    scale = {n: owner[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    first, last = ("stages.0.blocks.0", "stages.3.blocks.1") if arch in DINAT_S_ARCHS else ("blocks.0", "blocks.3")
    assert scale["patch_embed.proj.weight"] < scale[f"{first}.attn.qkv.weight"] < scale[f"{last}.attn.qkv.weight"]
    assert scale["head.fc.weight"] == 1.0
    assert all(owner[id(model.get_parameter(n))]["weight_decay"] == 0.0 for n in names)


# --- any input size ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(33, 47), (200, 120), (16, 16)])
def test_dinat_s_any_input_size(size):
    model = _tiny("dinat_s_tiny")
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    height, width = size
    for stage, feature_map in enumerate(maps):
        stride = 4 if stage == 0 else 2  # patch embed pads to a multiple of 4; merging pads odd maps
        height, width = -(-height // stride), -(-width // stride)
        assert feature_map.shape[-2:] == (height, width)
        assert torch.isfinite(feature_map).all()


@pytest.mark.parametrize("arch", ["nat_isotropic_small", "dinat_isotropic_small", "vitrpb_small"])
@pytest.mark.parametrize("size", [(33, 47), (16, 160)])
def test_isotropic_any_input_size(arch, size):
    model = _tiny(arch)
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *size))
        logits = model.forward_head(features)
    assert features.shape[1:3] == (-(-size[0] // 16), -(-size[1] // 16))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


# --- ViT-RPB at other resolutions ----------------------------------------------------------------

def test_vitrpb_at_non_native_size_uses_timm_resized_table(golden):
    native = _golden_tiny(golden, "vitrpb_test_tiny")  # 128 input: 8x8 map, 15x15 tables
    at_160 = _golden_tiny(golden, "vitrpb_test_tiny", img_size=160)  # 10x10 map, tables resized on load
    original = torch.load(golden / "orig" / "vitrpb_test_tiny.pth")
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
    assert _max_abs_diff(resized_at_run_time, resized_on_load) <= 1e-6


def test_global_attention_is_na2d_with_a_whole_map_kernel():
    """The dense fallback (maps 1 wide, where na2d cannot run) computes what na2d does."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, 8) for _ in range(3))
    table = torch.randn(4, 5, 9)
    dense = isotropic._global_attention_dense(q, k, v, table, scale=0.3)
    assert _max_abs_diff(dense, na2d(q, k, v, kernel_size=(3, 5), rpb=table, scale=0.3)) <= 1e-5
    # and the bias is indexed key - query: shifting the table changes the output
    assert _max_abs_diff(dense, isotropic._global_attention_dense(q, k, v, table.flip(1, 2), scale=0.3)) > 1e-3


# --- checkpoint filters --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dinat_s_test_tiny", "vitrpb_test_tiny"])
def test_filter_accepts_wrapped_and_timm_layouts(golden, name):
    model = _golden_tiny(golden, name)
    filter_fn = _filter_for(GOLDEN_TINY[name][0])
    original = torch.load(golden / "orig" / f"{name}.pth")
    for checkpoint in ({"state_dict": original}, {"model": original}, model.state_dict()):
        converted = filter_fn(checkpoint, model)
        assert converted.keys() == model.state_dict().keys()
        assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, damage, expected", [
    ("dinat_s_test_tiny", "layers.2.downsample.norm.bias", "missing key(s): stages.3.downsample.norm.bias"),
    ("nat_isotropic_test_tiny", "layers.1.attn.rpb", "blocks.1.attn.rpb: checkpoint (4, 7, 7) vs model (4, 5, 5)"),
])
def test_filter_lists_bad_keys(golden, name, damage, expected):
    arch, kwargs = GOLDEN_TINY[name]
    model = timm.create_model(arch, num_classes=10, **kwargs)
    checkpoint = torch.load(golden / "orig" / f"{name}.pth")
    if damage.endswith("rpb"):
        checkpoint[damage] = torch.zeros(4, 7, 7)
    else:
        del checkpoint[damage]
    with pytest.raises(RuntimeError, match="does not match the model") as info:
        _filter_for(arch)(checkpoint, model)
    assert expected in str(info.value)


def test_missing_weights_file_explains_the_fix(tmp_path):
    with pytest.raises(RuntimeError, match="pretrained_cfg_overlay") as info:
        timm.create_model("dinat_s_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "no.pth")))
    assert "dinat_s_tiny" in str(info.value)
