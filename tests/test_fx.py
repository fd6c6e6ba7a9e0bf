"""torch.fx feature extraction: every registered architecture traces (the attention layers are FX
leaves), and the traced graphs compute exactly what the eager models compute, forward and backward,
in train and eval mode, through timm's and torchvision's entry points."""
import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names, get_notrace_functions, get_notrace_modules

import timm_nat  # noqa: F401  (registers the models and the FX leaves)
from timm_nat import NeighborhoodAttention2d
from timm_nat._fx import FX_LEAF_MODULES, RelPosGlobalAttention

from conftest import ARCHITECTURES


# one tiny configuration per family (one per attention / stem / downsampler combination)
TINY = {
    "nat_mini": dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3),
    "dinat_mini": dict(
        embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3, ls_init_value=1e-1,
        dilations=((1, 4), (1, 2), (1,), (1,))),
    "dinat_s_tiny": dict(
        embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3, dilations=((1,), (1, 2), (1,), (1,))),
    "nat_isotropic_small": dict(embed_dim=32, depth=3, num_heads=2, kernel_size=3),
    "dinat_isotropic_small": dict(embed_dim=32, depth=3, num_heads=2, kernel_size=3),
    "vitrpb_small": dict(embed_dim=32, depth=3, num_heads=2),
}
INPUT = (2, 3, 64, 80)  # non-square; the isotropic models see 4x5 maps, ViT-RPB resizes its bias table


def _tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **dict(TINY[name], **kwargs))


def _images(shape=INPUT) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def test_attention_layers_are_registered_fx_leaves():
    """Both attention classes are in timm's notrace list, so every timm FX path keeps them whole."""
    assert set(FX_LEAF_MODULES) == {NeighborhoodAttention2d, RelPosGlobalAttention}
    for module in FX_LEAF_MODULES:
        assert timm.models.is_notrace_module(module), module


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_traces_to_its_feature_info(name):
    """Real architecture (built on the meta device: shapes only): ``feature_cls='fx'`` traces in train
    and eval mode and its maps have the channels and strides that ``feature_info`` declares."""
    model = timm.create_model(name, features_only=True, feature_cls="fx", device="meta")
    assert type(model).__name__ == "FeatureGraphNet"
    assert model.output_fmt.name == "NHWC"  # the blocks' layout, declared as for timm's Swin
    images = torch.empty(1, 3, 64, 96, device="meta")
    for train in (True, False):
        model.train(train)
        maps = model(images)
        assert [m.shape[-1] for m in maps] == model.feature_info.channels()
        assert [(64 // m.shape[1], 96 // m.shape[2]) for m in maps] == [(r, r) for r in model.feature_info.reduction()]


@pytest.mark.parametrize("name", sorted(TINY))
def test_graph_keeps_attention_whole(name):
    """The attention modules are single graph nodes (traced as calls, never through)."""
    train_nodes, eval_nodes = get_graph_node_names(_tiny(name))
    assert train_nodes == eval_nodes
    attn_nodes = [n for n in eval_nodes if n.endswith(".attn")]
    assert len(attn_nodes) == sum(isinstance(m, FX_LEAF_MODULES) for m in _tiny(name).modules()) > 0
    assert not [n for n in eval_nodes if ".attn." in n]


@pytest.mark.parametrize("name", sorted(TINY))
def test_fx_features_match_eager(name):
    """``features_only=True, feature_cls='fx'`` equals the model's own ``forward_intermediates`` (NHWC)."""
    fx_model = _tiny(name, features_only=True, feature_cls="fx").eval()
    model = _tiny(name).eval()
    images = _images()
    indices = list(fx_model.feature_info.out_indices)
    with torch.no_grad():
        fx_maps = fx_model(images)
        eager_maps = model.forward_intermediates(images, indices=indices, intermediates_only=True, output_fmt="NHWC")
    assert len(fx_maps) == len(eager_maps) == len(indices)
    for fx_map, eager_map in zip(fx_maps, eager_maps):
        assert torch.equal(fx_map, eager_map)


def _timm_style_fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """As timm's tests/test_models.py builds it: torchvision's extractor with timm's notrace lists."""
    from torchvision.models.feature_extraction import create_feature_extractor as tv_create_feature_extractor

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model)
    return tv_create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", sorted(TINY))
def test_fx_forward_backward_match_eager_in_train_mode(name):
    """Train mode (dropout on): same RNG seed, same logits and same gradients as eager, and every
    parameter gets a gradient (timm's ``test_model_backward_fx`` conventions).

    Stochastic depth stays off: timm's ``drop_path`` rescales with an in-place ``div_`` whose result
    is unused, which torchvision's extractor drops as dead code, so every timm model's train-mode FX
    graph skips the 1/keep_prob scaling (not specific to these models).
    """
    model = _tiny(name, proj_drop_rate=0.1).train()
    fx_model = _timm_style_fx_model(model).train()
    images = _images()

    torch.manual_seed(2)
    eager_logits = model(images)
    eager_logits.mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(2)
    (fx_logits,) = fx_model(images).values()
    fx_logits.mean().backward()
    assert fx_logits.shape == (INPUT[0], 7)
    assert torch.equal(fx_logits, eager_logits)
    fx_grads = dict(fx_model.named_parameters())
    assert set(fx_grads) == set(eager_grads)
    for param_name, param in fx_grads.items():
        assert param.grad is not None, f"no gradient for {param_name}"
        assert torch.equal(param.grad, eager_grads[param_name]), param_name


def test_timm_create_feature_extractor_named_nodes():
    """``timm.models.create_feature_extractor`` with named nodes, in eval mode, including a node inside
    a block (after the attention leaf) and the pre-logits norm."""
    model = _tiny("dinat_mini").eval()
    extractor = create_feature_extractor(
        model, {"stages.1.blocks.0.attn": "attn", "stages.2": "stage2", "norm": "norm"})
    images = _images()
    with torch.no_grad():
        out = extractor(images)
        x = model.patch_embed(images)
        x = model.stages[0](x)
        x = model.stages[1].downsample(x)
        attn = model.stages[1].blocks[0].attn(model.stages[1].blocks[0].norm1(x))
        stage2 = model.forward_intermediates(images, indices=[2], intermediates_only=True, output_fmt="NHWC")[0]
        features = model.forward_features(images)
    assert list(out) == ["attn", "stage2", "norm"]
    assert torch.equal(out["attn"], attn)
    assert torch.equal(out["stage2"], stage2)
    assert torch.equal(out["norm"], features)


@pytest.mark.parametrize("name", sorted(TINY))
def test_torchvision_create_feature_extractor_without_timm_leaves(name):
    """torchvision's own extractor with its default tracer (no timm leaf list), as for timm's Swin:
    the layers register the attention call with ``torch.fx.wrap``, so every tracer records it as one
    node (it used to fail inside the layer: "symbolically traced variables cannot be used as inputs
    to control flow"). Its stage maps equal ``forward_intermediates``."""
    from torchvision.models.feature_extraction import create_feature_extractor as tv_create_feature_extractor

    model = _tiny(name).eval()
    indices = [0, 2]
    prefix = "stages" if hasattr(model, "stages") else "blocks"
    extractor = tv_create_feature_extractor(model, return_nodes=[f"{prefix}.{i}" for i in indices])
    attention_calls = [n for n in extractor.graph.nodes if n.op == "call_function"
                       and n.target.__name__ in ("na2d", "global_attention")]
    assert attention_calls, "the attention call is one node of the graph"
    images = _images()
    with torch.no_grad():
        maps = list(extractor(images).values())
        expected = model.forward_intermediates(images, indices=indices, intermediates_only=True, output_fmt="NHWC")
    assert len(maps) == len(expected) == len(indices)
    for fx_map, eager_map in zip(maps, expected):
        assert torch.equal(fx_map, eager_map)
