"""timm API of the NAT/DiNAT models: registration and pretrained cfgs from the registry, every
registered architecture at real size, and the feature / head / training hooks on tiny configs."""
import tomllib

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2

import timm_nat  # noqa: F401  (registers the models)
from timm_nat import NeighborhoodAttention2d
from timm_nat.models.nat import checkpoint_filter_fn
from timm_nat.pretrained import registry_path

REGISTERED = sorted(timm.list_models(module="nat"))
SMALL_INPUT = (1, 3, 64, 64)

TINY_DINAT = dict(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.,
    dilations=((1, 4), (1, 2), (1, 2), (1, 1)), ls_init_value=1e-5, num_classes=10)
TINY_NAT = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=5, mlp_ratio=2., num_classes=10)


def _tiny(arch: str = "dinat_mini", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    base = TINY_DINAT if arch.startswith("dinat") else TINY_NAT
    return timm.create_model(arch, **dict(base, **kwargs)).eval()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _nat_family_registry_entries() -> list:
    with registry_path().open("rb") as f:
        entries = tomllib.load(f)["checkpoint"]
    return [e for e in entries
            if e["model"].startswith(("nat_", "dinat_"))
            and not e["model"].startswith("dinat_s_") and "isotropic" not in e["model"]]


# --- registration and pretrained cfgs ------------------------------------------------------------

def test_every_registry_checkpoint_is_a_pretrained_tag():
    entries = _nat_family_registry_entries()
    assert sorted({e["model"] for e in entries}) == REGISTERED
    assert sorted(f"{e['model']}.{e['tag']}" for e in entries) == sorted(timm.list_pretrained(REGISTERED))


@pytest.mark.parametrize("entry", _nat_family_registry_entries(), ids=lambda e: f"{e['model']}.{e['tag']}")
def test_pretrained_cfg_carries_registry_facts(entry):
    model = timm.create_model(f"{entry['model']}.{entry['tag']}", device="meta")
    cfg = model.pretrained_cfg
    assert cfg["url"] == entry["url"]
    assert cfg.get("hf_hub_id") == entry.get("hf_hub_id")
    assert cfg.get("hf_hub_filename") == entry.get("hf_hub_filename")
    assert cfg["num_classes"] == entry["num_classes"] == model.num_classes == model.get_classifier().out_features
    assert cfg["input_size"] == tuple(entry["input_size"])
    assert cfg["crop_pct"] == entry["crop_pct"]
    assert cfg["license"] == entry["license"]
    assert cfg["interpolation"] == "bicubic"
    assert (cfg["mean"], cfg["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    if "top1" in entry:
        assert f"top-1 {entry['top1']}%" in cfg["description"]


def test_default_tag_is_the_first_listed():
    first_tag = {}
    for e in _nat_family_registry_entries():
        first_tag.setdefault(e["model"], e["tag"])
    for arch, tag in first_tag.items():
        assert timm.create_model(arch, device="meta").pretrained_cfg["tag"] == tag


# --- every registered architecture at real size ---------------------------------------------------

@pytest.fixture(scope="module", params=REGISTERED)
def registered_model(request):
    """One real-size model at a time (module scope + params: pytest groups the tests per model)."""
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param)


def test_forward_at_default_size(registered_model):
    arch, model = registered_model
    model.eval()
    _, height, width = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, height, width))
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert features.shape == (1, height // 32, width // 32, model.num_features)
    assert pooled.shape == (1, model.num_features)
    assert logits.shape == (1, model.num_classes)
    assert torch.isfinite(logits).all()


def test_backward_reaches_every_parameter(registered_model):
    arch, model = registered_model
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(torch.randn(*SMALL_INPUT))
    (logits * torch.randn_like(logits)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_features_only_agrees_with_forward_intermediates(registered_model):
    arch, model = registered_model
    model.eval()
    feature_model = timm.create_model(arch, features_only=True, device="meta")
    # share the real weights; norm and head were pruned from the feature model
    result = feature_model.model.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert result.missing_keys == []
    assert all(k.startswith(("norm.", "head.")) for k in result.unexpected_keys)
    x = torch.randn(*SMALL_INPUT)
    with torch.no_grad():
        maps = feature_model(x)
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(intermediates) == 4
    for i, (a, b) in enumerate(zip(maps, intermediates)):
        assert _max_abs_diff(a, b) <= 1e-6
        assert a.shape[1] == feature_model.feature_info.channels()[i]
        assert SMALL_INPUT[-1] // a.shape[-1] == feature_model.feature_info.reduction()[i]


# --- feature extraction (tiny configs) -------------------------------------------------------------

def test_features_only_selects_out_indices_as_nchw():
    model = timm.create_model("dinat_mini", features_only=True, out_indices=(1, 3), **TINY_DINAT)
    assert model.feature_info.channels() == [32, 128]
    assert model.feature_info.reduction() == [8, 32]
    maps = model(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 12), (2, 128, 2, 3)]


def test_forward_intermediates_options():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, all_maps = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NHWC", intermediates_only=True)
        features = model.forward_features(x)
    assert [_max_abs_diff(a, b) for a, b in zip(last_two, all_maps[2:])] == [0.0, 0.0]
    assert _max_abs_diff(early[0], all_maps[0]) == 0.0
    assert _max_abs_diff(normed[0], features) == 0.0
    assert _max_abs_diff(final, features) == 0.0


def test_prune_intermediate_layers_keeps_what_is_needed():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert len(model.stages) == 2
    assert isinstance(model.norm, torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
        output = model(x)
    assert [_max_abs_diff(a, b) for a, b in zip(pruned, reference[:2])] == [0.0, 0.0]
    # as in timm's swin: no norm, no pooling, no classifier left, so forward gives the last kept map (NHWC)
    assert _max_abs_diff(output, reference[1].permute(0, 2, 3, 1)) == 0.0


# --- head and training hooks (tiny configs) --------------------------------------------------------

def test_forward_head_pre_logits_is_pooled_normed_features():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
    assert _max_abs_diff(pooled, features.mean(dim=(1, 2))) <= 1e-6
    assert _max_abs_diff(logits, model.get_classifier()(pooled)) <= 1e-6


def test_reset_classifier():
    model = _tiny()
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


def test_grad_checkpointing_gives_same_outputs_and_grads():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (logits_off, grads_off), (logits_on, grads_on) = results
    assert _max_abs_diff(logits_on, logits_off) <= 1e-6
    assert max(_max_abs_diff(a, b) for a, b in zip(grads_on, grads_off)) <= 1e-5


def test_no_weight_decay_is_exactly_the_rpb_tables():
    model = _tiny()
    names = model.no_weight_decay()
    assert len(names) == sum(TINY_DINAT["depths"])
    assert all(n.endswith(".attn.rpb") and model.get_parameter(n).dim() == 3 for n in names)


def test_group_matcher_gives_layer_wise_lr_decay():
    model = _tiny()
    # timm's optimizer factory reads group_matcher() and no_weight_decay() from the model
    groups = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5).param_groups
    owner = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = group
    assert len(owner) == len(list(model.parameters()))
    scale = {n: owner[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    assert scale["patch_embed.proj.0.weight"] < scale["stages.0.blocks.0.attn.qkv.weight"]
    assert scale["stages.0.blocks.1.attn.qkv.weight"] < scale["stages.3.blocks.1.attn.qkv.weight"]
    assert scale["head.fc.weight"] == 1.0
    assert all(owner[id(model.get_parameter(n))]["weight_decay"] == 0.0 for n in model.no_weight_decay())


@pytest.mark.parametrize("size", [(33, 47), (200, 120), (16, 16)])
def test_any_input_size(size):
    model = _tiny()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
        logits = model(torch.randn(1, 3, *size))
    height, width = size
    for stage, feature_map in enumerate(maps):
        stride = 4 if stage == 0 else 2  # each 3x3 stride-2 pad-1 conv rounds up
        height, width = -(-height // stride), -(-width // stride)
        assert feature_map.shape[-2:] == (height, width)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_torch_compile_full_graph():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        assert _max_abs_diff(compiled(x), model(x)) <= 1e-6


# --- the attention module ---------------------------------------------------------------------------

def test_attention_without_rpb_equals_zero_rpb():
    torch.manual_seed(0)
    with_rpb = NeighborhoodAttention2d(16, num_heads=2, kernel_size=3, dilation=2)
    without = NeighborhoodAttention2d(16, num_heads=2, kernel_size=3, dilation=2, rel_pos_bias=False)
    assert without.rpb is None and "rpb" not in dict(without.named_parameters())
    without.load_state_dict({k: v for k, v in with_rpb.state_dict().items() if k != "rpb"})
    x = torch.randn(2, 5, 9, 16)  # smaller than 3x2 on the height axis: padded
    with torch.no_grad():
        assert _max_abs_diff(with_rpb(x), without(x)) > 1e-4  # the bias matters
        with_rpb.rpb.zero_()
        assert _max_abs_diff(with_rpb(x), without(x)) <= 1e-6


def test_attention_accepts_per_axis_kernel_and_dilation():
    attention = NeighborhoodAttention2d(12, num_heads=3, kernel_size=(3, 5), dilation=(2, 1))
    assert attention.rpb.shape == (3, 5, 9)
    assert attention(torch.randn(1, 4, 4, 12)).shape == (1, 4, 4, 12)


def test_attention_rejects_unsupported_arguments():
    with pytest.raises(NotImplementedError, match="dropout"):
        NeighborhoodAttention2d(16, num_heads=2, attn_drop=0.1)
    with pytest.raises(ValueError, match="multiple"):
        NeighborhoodAttention2d(15, num_heads=2)


# --- checkpoint conversion (golden tiny checkpoints) ------------------------------------------------

def _tiny_dinat_for_golden(tiny_model_kwargs, **kwargs):
    return timm.create_model("dinat_mini", num_classes=10, **tiny_model_kwargs("dinat_test_tiny"), **kwargs)


def test_filter_accepts_both_layouts_wrapped_or_headless(golden, tiny_model_kwargs):
    model = _tiny_dinat_for_golden(tiny_model_kwargs)
    original = torch.load(golden / "orig" / "dinat_test_tiny.pth")
    hub = torch.load(golden / "hf" / "dinat_test_tiny" / "pytorch_model.bin")
    from_hub = checkpoint_filter_fn(hub, model)
    # a headless transformers DinatModel checkpoint has no 'dinat.' prefix
    hub_headless = {k.removeprefix("dinat."): v for k, v in hub.items()}
    for wrapped in (original, {"state_dict": original}, {"model": original}, hub_headless):
        converted = checkpoint_filter_fn(wrapped, model)
        assert converted.keys() == from_hub.keys()
        assert all(torch.equal(converted[k], from_hub[k]) for k in converted)


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_filter_lists_every_bad_key(golden, tiny_model_kwargs, damage):
    model = _tiny_dinat_for_golden(tiny_model_kwargs)
    checkpoint = torch.load(golden / "orig" / "dinat_test_tiny.pth")
    if damage == "extra":
        checkpoint["levels.0.blocks.0.attn.relative_position_index"] = torch.zeros(3)
        expected = "stages.0.blocks.0.attn.relative_position_index"
    elif damage == "missing":
        del checkpoint["levels.2.blocks.1.gamma2"]
        expected = "stages.2.blocks.1.ls2.gamma"
    else:
        checkpoint["levels.1.blocks.0.attn.rpb"] = torch.zeros(2, 7, 7)
        expected = "stages.1.blocks.0.attn.rpb: checkpoint (2, 7, 7) vs model (2, 5, 5)"
    with pytest.raises(RuntimeError, match="does not match the model") as info:
        checkpoint_filter_fn(checkpoint, model)
    assert expected in str(info.value)


def test_pretrained_with_another_head_size_reinitialises_only_the_head(golden, tiny_model_kwargs):
    file = str(golden / "hf" / "dinat_test_tiny" / "pytorch_model.bin")
    overlay = dict(file=file, num_classes=10)
    same = _tiny_dinat_for_golden(tiny_model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    other = timm.create_model(
        "dinat_mini", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5,
        **tiny_model_kwargs("dinat_test_tiny"))
    assert other.get_classifier().out_features == 5
    same_state, other_state = same.state_dict(), other.state_dict()
    body = [k for k in same_state if not k.startswith("head.")]
    assert all(torch.equal(same_state[k], other_state[k]) for k in body)
