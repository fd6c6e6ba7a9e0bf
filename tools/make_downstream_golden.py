"""Golden stage outputs of the published detection/segmentation backbones, from their original code.

    PYTHONPATH=. .venv/bin/python tools/make_downstream_golden.py \\
        --original-repo /tmp/nat_orig --transformers-path /tmp/tf4402 [--cases NAME ...]

One case per checkpoint layout (mmdet, mmseg, detectron2 Mask2Former, transformers OneFormer): a
real-size backbone with deterministic random weights (:func:`golden_weight`, per key of the
checkpoint's own layout), run by the code that trained or published it on a seeded detection-sized
input; ``tests/golden/downstream/<case>.safetensors`` keeps a summary of each stage output (see
tests/golden/README.md, "downstream/").

Nothing fetched is part of this file: ``--original-repo`` is a checkout of
SHI-Labs/Neighborhood-Attention-Transformer (its ``detection/``, ``segmentation/`` and
``mask2former/`` folders are imported from there) and ``--transformers-path`` a folder holding
transformers 4.40.2 (``pip install --no-deps --target``), whose DinatBackbone is imported from there.
Their framework imports (mmcv/mmdet/mmseg, detectron2) are replaced by the few stand-ins the backbone
files need, and NATTEN by timm_nat.compat's stand-in with the NATTEN 0.14 module semantics that the
checkpoints were trained with (:class:`Natten014NeighborhoodAttention2D`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import math
import platform
import subprocess
import sys
import types
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from timm_nat.compat import NeighborhoodAttention2D
from timm_nat.compat.functional import natten2dav, natten2dqkrpb
from timm_nat.compat.modules import pad_to_window

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "downstream"
ORIGINAL_REPO = "SHI-Labs/Neighborhood-Attention-Transformer"
FORMAT = "timm-nat downstream golden v1"
GRID_BUDGET = 49152  # values of one stage's strided grid (fp32): keeps each file near 1 MB
TRANSFORMERS_PREFIX = "model.pixel_level_module.encoder."

WEIGHT_RULE = (
    "for every backbone key K of the checkpoint's own layout (relative to its backbone prefix) with shape S: "
    "z = torch.randn(S, generator=torch.Generator().manual_seed(zlib.crc32(K.encode())), dtype=torch.float32); "
    "K ends in gamma1/gamma2/layer_scale_parameters: 0.1 * z; K ends in 'rpb': z; "
    "K ends in '.weight' and S is 1-D (LayerNorm): 1 + 0.1 * z; other '.weight': z / math.sqrt(prod(S[1:])); "
    "everything else (biases): 0.1 * z"
)
INPUT_RULE = "torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)"

# Dilation sets of the configs (research notes' names).
D_DET18 = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
S_SEG6 = [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4], [1, 2]]
M2F_L = [[1, 14, 1], [1, 4, 1, 7], [1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 3], [1, 1, 1, 1, 1]]
OF_CS = [[1, 18, 1], [1, 5, 1, 9], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]]

# Non-backbone keys the real files hold (names from the frameworks' source, shapes for these configs):
# the loader's test puts them next to the backbone to check that they are reported, not dropped.
OTHER_KEYS = {
    "mmdet": [
        ("neck.lateral_convs.0.conv.weight", [256, 64, 1, 1], "float32"),
        ("neck.lateral_convs.0.conv.bias", [256], "float32"),
        ("neck.fpn_convs.3.conv.weight", [256, 256, 3, 3], "float32"),
        ("rpn_head.rpn_conv.weight", [256, 256, 3, 3], "float32"),
        ("rpn_head.rpn_cls.weight", [3, 256, 1, 1], "float32"),
        ("rpn_head.rpn_reg.weight", [12, 256, 1, 1], "float32"),
        ("roi_head.bbox_head.shared_fcs.0.weight", [1024, 12544], "float32"),
        ("roi_head.bbox_head.fc_cls.weight", [81, 1024], "float32"),
        ("roi_head.bbox_head.fc_reg.weight", [320, 1024], "float32"),
        ("roi_head.mask_head.convs.0.conv.weight", [256, 256, 3, 3], "float32"),
        ("roi_head.mask_head.conv_logits.weight", [80, 256, 1, 1], "float32"),
    ],
    "mmseg": [
        ("decode_head.psp_modules.0.1.conv.weight", [512, 768, 1, 1], "float32"),
        ("decode_head.psp_modules.0.1.bn.running_mean", [512], "float32"),
        ("decode_head.psp_modules.0.1.bn.num_batches_tracked", [], "int64"),
        ("decode_head.bottleneck.conv.weight", [512, 2816, 3, 3], "float32"),
        ("decode_head.lateral_convs.0.conv.weight", [512, 96, 1, 1], "float32"),
        ("decode_head.fpn_bottleneck.conv.weight", [512, 2048, 3, 3], "float32"),
        ("decode_head.conv_seg.weight", [150, 512, 1, 1], "float32"),
        ("decode_head.conv_seg.bias", [150], "float32"),
        ("auxiliary_head.convs.0.conv.weight", [256, 384, 3, 3], "float32"),
        ("auxiliary_head.conv_seg.weight", [150, 256, 1, 1], "float32"),
    ],
    "detectron2": [
        ("sem_seg_head.pixel_decoder.input_proj.0.0.weight", [256, 1536, 1, 1], "float32"),
        ("sem_seg_head.pixel_decoder.transformer.level_embed", [3, 256], "float32"),
        ("sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
         [192, 256], "float32"),
        ("sem_seg_head.pixel_decoder.mask_features.weight", [256, 256, 1, 1], "float32"),
        ("sem_seg_head.predictor.query_feat.weight", [200, 256], "float32"),
        ("sem_seg_head.predictor.query_embed.weight", [200, 256], "float32"),
        ("sem_seg_head.predictor.class_embed.weight", [134, 256], "float32"),
        ("sem_seg_head.predictor.decoder_norm.weight", [256], "float32"),
        ("criterion.empty_weight", [134], "float32"),
    ],
    # "transformers" is read from transformers 4.40.2's OneFormerForUniversalSegmentation (see other_keys).
}

CASES = {
    "mmdet_dinat_tiny_maskrcnn_coco": dict(
        layout="mmdet", timm_name="dinat_tiny", tag="maskrcnn_coco", folder="detection",
        module="dinat", cls="DiNAT", config_file="detection/configs/dinat/mask_rcnn_dinat_tiny_3x_coco.py",
        arch=dict(embed_dim=64, mlp_ratio=3.0, depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], drop_path_rate=0.2,
                  kernel_size=7, dilations=D_DET18, out_indices=[0, 1, 2, 3], qkv_bias=True, qk_scale=None,
                  drop_rate=0.0, attn_drop_rate=0.0, in_patch_size=4, frozen_stages=-1),
        input_size=[1, 3, 608, 800], seed=1,
        container="{'meta': {...}, 'state_dict': {'backbone.' + key: tensor, <other keys>}}",
        backbone_prefix="backbone.", wrapper="state_dict"),
    "mmseg_dinat_s_tiny_upernet_ade20k": dict(
        layout="mmseg", timm_name="dinat_s_tiny", tag="upernet_ade20k", folder="segmentation",
        module="dinats", cls="DiNAT_s",
        config_file="segmentation/configs/dinat_s/upernet_dinat_s_tiny_512x512_160k_ade20k.py",
        arch=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], kernel_size=7, dilations=S_SEG6,
                  mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.3, patch_norm=True, out_indices=[0, 1, 2, 3]),
        # not multiples of 4: the patch embedding pads the image to 504x700; maps 126x175 and 63x88 make
        # patch merging pad an odd width, then an odd height
        input_size=[1, 3, 502, 698], seed=2,
        container="{'meta': {...}, 'state_dict': {'backbone.' + key: tensor, <other keys>}}",
        backbone_prefix="backbone.", wrapper="state_dict"),
    "detectron2_dinat_large_mask2former_coco_panoptic": dict(
        layout="detectron2", timm_name="dinat_large", tag="mask2former_coco_panoptic", folder="mask2former",
        module="dinat", cls="D2DiNAT",
        config_file=("mask2former/configs/coco/panoptic-segmentation/dinat/"
                     "maskformer2_dinat_large_IN21k_384_bs16_100ep.yaml"),
        arch=dict(embed_dim=192, depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48], kernel_size=11, dilations=M2F_L,
                  mlp_ratio=2.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.3, out_features=["res2", "res3", "res4", "res5"]),
        # portrait: stages 0 and 1 are narrower than kernel * dilation (154, 77), so they pad along W
        input_size=[1, 3, 800, 608], seed=3,
        container="{'model': {'backbone.' + key: tensor, <other keys>}}",
        backbone_prefix="backbone.", wrapper="model"),
    "transformers_dinat_large_oneformer_cityscapes": dict(
        layout="transformers", timm_name="dinat_large", tag="oneformer_cityscapes", folder=None,
        module=None, cls="DinatBackbone",
        config_file="SHI-Labs/OneFormer configs/cityscapes/dinat/oneformer_dinat_large_bs16_90k.yaml",
        arch=dict(embed_dim=192, depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48], kernel_size=7, dilations=OF_CS,
                  mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.3, layer_scale_init_value=0.0,
                  out_features=["stage1", "stage2", "stage3", "stage4"]),
        input_size=[1, 3, 512, 1024], seed=4,
        container="{'model.pixel_level_module.encoder.' + key: tensor, <other keys>} (plain state dict)",
        backbone_prefix=TRANSFORMERS_PREFIX, wrapper=""),
}


# ---------------------------------------------------------------------------------------------
# Weights and input


def golden_weight(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The deterministic random value of one backbone tensor (see ``WEIGHT_RULE``)."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    name = key.rsplit(".", 1)[-1]
    if name in ("gamma1", "gamma2", "layer_scale_parameters"):
        return 0.1 * z
    if name == "rpb":
        return z
    if name == "weight" and len(shape) == 1:
        return 1 + 0.1 * z
    if name == "weight":
        return z / math.sqrt(math.prod(shape[1:]))
    return 0.1 * z


def golden_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``golden_weight`` for every key of ``model``'s state dict (checked to hold parameters only)."""
    parameters = {name for name, _ in model.named_parameters()}
    state = {}
    for key, value in sorted(model.state_dict().items()):
        if key not in parameters:
            raise RuntimeError(f"unexpected buffer {key} in the backbone state dict")
        state[key] = golden_weight(key, value.shape)
    return state


def golden_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The seeded input image batch (see ``INPUT_RULE``)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def checksum(x: torch.Tensor) -> dict:
    """Sum, absolute sum and a few values: detects a changed generator or weight rule."""
    flat = x.detach().double().reshape(-1)
    return {"sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
            "first": flat[:4].tolist(), "last": flat[-1].item()}


def state_checksum(state: Dict[str, torch.Tensor]) -> dict:
    """Checksum over a state dict (sums in sorted key order, float64)."""
    keys = sorted(state)
    return {"sum": sum(state[k].double().sum().item() for k in keys),
            "abs_sum": sum(state[k].double().abs().sum().item() for k in keys),
            "first_key": keys[0], "first_key_first": state[keys[0]].reshape(-1)[:4].tolist()}


# ---------------------------------------------------------------------------------------------
# Stand-ins for the frameworks and for NATTEN 0.14


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, "make_downstream_golden stand-in")
    module.__dict__.update(attributes)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # importlib.util.find_spec
    sys.modules[name] = module
    return module


class _Registry:
    """mmcv ``Registry`` / detectron2 ``BACKBONE_REGISTRY`` stand-in: register_module() and register()."""

    def __init__(self):
        self.classes = {}

    def register_module(self, *args, **kwargs):
        return self.register()

    def register(self, cls=None):
        def add(c):
            self.classes[c.__name__] = c
            return c
        return add if cls is None else add(cls)


def _no_checkpoint(*args, **kwargs):
    raise RuntimeError("load_checkpoint is not available in make_downstream_golden (weights come from golden_weight)")


def install_framework_stand_ins() -> None:
    """The names the backbone files import from mmcv, mmdet, mmseg and detectron2, and nothing else."""
    import logging

    class Backbone(nn.Module):
        """detectron2.modeling.Backbone: an nn.Module with ``size_divisibility``/``output_shape``."""

    class ShapeSpec:
        def __init__(self, channels=None, height=None, width=None, stride=None):
            self.channels, self.height, self.width, self.stride = channels, height, width, stride

    _module("mmcv")
    _module("mmcv.runner", load_checkpoint=_no_checkpoint)
    for framework in ("mmdet", "mmseg"):
        _module(framework)
        _module(f"{framework}.utils", get_root_logger=lambda *a, name=framework, **k: logging.getLogger(name))
        _module(f"{framework}.models")
        _module(f"{framework}.models.builder", BACKBONES=_Registry())
    _module("detectron2")
    _module("detectron2.modeling", BACKBONE_REGISTRY=_Registry(), Backbone=Backbone, ShapeSpec=ShapeSpec)


def install_natten_stand_in() -> types.ModuleType:
    """timm_nat.compat's stand-in ``natten`` package, with the NATTEN 0.14 module.

    An installed NATTEN is hidden so that ``install()`` registers its stand-in (``natten.functional``
    with the legacy ``natten2dqkrpb``/``natten2dav``, verified against NATTEN 0.17.4's kernels); its
    ``NeighborhoodAttention2D`` is then replaced by :class:`Natten014NeighborhoodAttention2D`.
    """
    from timm_nat import compat

    sys.modules["natten"] = None  # makes ``import natten`` fail inside install()
    if compat.install() != "shim":
        raise RuntimeError("timm_nat.compat.install() did not register its natten stand-in")
    natten = sys.modules["natten"]
    natten.__spec__ = importlib.machinery.ModuleSpec("natten", None, is_package=True)
    natten.NeighborhoodAttention2D = Natten014NeighborhoodAttention2D
    return natten


ATTENTION_SHAPES = set()  # (height, width, kernel_size, dilation) of every attention call, after padding


class Natten014NeighborhoodAttention2D(NeighborhoodAttention2D):
    """NATTEN 0.14's ``NeighborhoodAttention2D.forward`` (0.14.1 ... 0.14.6, the version that trained the
    downstream checkpoints), on the legacy unfused ops:

    a map smaller than ``kernel_size * dilation`` along an axis is zero-padded on the bottom/right
    to exactly that size BEFORE the qkv projection (pad tokens get q, k, v = the qkv bias and are
    ordinary, unmasked neighbours), then ``q * scale`` -> ``natten2dqkrpb`` -> softmax ->
    ``natten2dav``, the result cropped back to the input size, then ``proj``.
    Parameters (``qkv``, ``rpb``, ``proj``) and arguments are the compat module's (NATTEN's).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = pad_to_window(x, self.window_size)
        padded_height, padded_width = x.shape[1:3]
        ATTENTION_SHAPES.add((padded_height, padded_width, self.kernel_size, self.dilation))
        qkv = self.qkv(x).reshape(batch, padded_height, padded_width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # each [batch, heads, H, W, head_dim]
        attn = natten2dqkrpb(q * self.scale, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
        x = natten2dav(self.attn_drop(attn), v, self.kernel_size, self.dilation)
        x = x.permute(0, 2, 3, 1, 4).reshape(batch, padded_height, padded_width, channels)
        return self.proj_drop(self.proj(x[:, :height, :width]))


def natten014_window(length: int, kernel_size: int, dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """NATTEN's window rule (0.14 ``get_window_start``/``get_pb_start`` in csrc/cpu/natten_cpu_commons.h),
    stated per dilation group: each position's ``kernel_size`` neighbours [length, K] and RPB indices [length, K].

    Position i is entry ``i // dilation`` of group ``i % dilation``; its window is the K consecutive group
    entries centred on it, shifted inside the group at the borders.
    """
    index = torch.arange(length)
    group, position = index % dilation, index // dilation
    group_length = (length - group + dilation - 1) // dilation
    start = torch.minimum((position - kernel_size // 2).clamp(min=0), group_length - kernel_size)
    offsets = start[:, None] + torch.arange(kernel_size)
    return group[:, None] + dilation * offsets, kernel_size - 1 + offsets - position[:, None]


def brute_force_attention(q, k, v, rpb, kernel_size, dilation) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits (with RPB) and output of neighbourhood attention by gathering every window ([B, heads, H, W, D])."""
    height, width = q.shape[2:4]
    rows, row_bias = natten014_window(height, kernel_size[0], dilation[0])
    cols, col_bias = natten014_window(width, kernel_size[1], dilation[1])
    neighbours = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height, width, -1)
    bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]].reshape(rpb.shape[0], height, width, -1)
    logits = torch.einsum("bnhwd,bnhwkd->bnhwk", q, k.flatten(2, 3)[:, :, neighbours]) + bias
    out = torch.einsum("bnhwk,bnhwkd->bnhwd", logits.softmax(-1), v.flatten(2, 3)[:, :, neighbours])
    return logits, out


def check_brute_force(log: Callable[[str], None], tolerance: float = 1e-5) -> float:
    """:func:`brute_force_attention` against NATTEN 0.17.4's own kernels (tests/golden/na2d_legacy.safetensors:
    logits and output of its twelve cases); returns the max abs diff."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(REPO_ROOT / "tests" / "golden" / "na2d_legacy.safetensors"), "pt") as golden:
        for case in json.loads(golden.metadata()["cases"]):
            q, k, v, rpb, ref_logits, ref_out = (golden.get_tensor(f"case{case['case']}.{name}").double()
                                                 for name in ("q", "k", "v", "rpb", "logits", "out"))
            kernel_size = case["kernel_size"]
            kernel_size = tuple(kernel_size) if isinstance(kernel_size, list) else (kernel_size, kernel_size)
            logits, out = brute_force_attention(q * case["scale"], k, v, rpb, kernel_size, tuple(case["dilation"]))
            worst = max(worst, (logits - ref_logits).abs().max().item(), (out - ref_out).abs().max().item())
    log(f"brute-force window rule vs NATTEN 0.17.4 golden (na2d_legacy.safetensors): max abs diff {worst:.2e}")
    if worst > tolerance:
        raise RuntimeError("the brute-force window rule disagrees with NATTEN 0.17.4's kernels")
    return worst


def check_legacy_ops(shapes, log: Callable[[str], None], tolerance: float = 1e-5) -> dict:
    """The compat ``natten2dqkrpb``/``natten2dav`` against :func:`brute_force_attention` (float64) at every
    (padded) attention shape the cases used, on random q, k, v, rpb (2 heads of dim 4)."""
    generator = torch.Generator().manual_seed(0)
    worst_logits = worst_out = 0.0
    for height, width, kernel_size, dilation in sorted(shapes):
        q, k, v = (torch.randn(1, 2, height, width, 4, generator=generator) for _ in range(3))
        rpb = torch.randn(2, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1, generator=generator)
        logits = natten2dqkrpb(q, k, rpb, kernel_size, dilation)
        out = natten2dav(logits.softmax(-1), v, kernel_size, dilation)
        ref_logits, ref_out = brute_force_attention(q.double(), k.double(), v.double(), rpb.double(),
                                                    kernel_size, dilation)
        worst_logits = max(worst_logits, (logits - ref_logits).abs().max().item())
        worst_out = max(worst_out, (out - ref_out).abs().max().item())
    log(f"legacy ops vs brute force at {len(shapes)} shapes: max abs diff logits {worst_logits:.2e}, "
        f"output {worst_out:.2e}")
    if max(worst_logits, worst_out) > tolerance:
        raise RuntimeError("timm_nat.compat's legacy ops disagree with the brute-force window rule")
    return {"shapes": [[h, w, list(k), list(d)] for h, w, k, d in sorted(shapes)],
            "max_abs_diff_logits": worst_logits, "max_abs_diff_output": worst_out}


def import_original(repo: Path, folder: str, module: str) -> types.ModuleType:
    """Import ``<repo>/<folder>/<module>.py`` (its sibling ``nat.py`` too), fresh for each folder."""
    for name in ("nat", "dinat", "dinats"):
        sys.modules.pop(name, None)
    path = str(repo / folder)
    sys.path.insert(0, path)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(path)


def import_transformers(path: Path) -> types.ModuleType:
    """transformers 4.40.2's modeling_dinat from ``path``, running on the natten stand-in."""
    sys.path.insert(0, str(path))
    import transformers
    from transformers.utils import import_utils

    if transformers.__version__ != "4.40.2":
        raise RuntimeError(f"--transformers-path holds transformers {transformers.__version__}, expected 4.40.2")
    # 4.40.2 decides from NATTEN's package metadata; the stand-in has none.
    import_utils._natten_available, import_utils._natten_version = True, "0.14.6"
    from transformers.models.dinat import modeling_dinat

    legacy_qkrpb = modeling_dinat.natten2dqkrpb

    def recorded_natten2dqkrpb(query, key, rpb, kernel_size, dilation):
        ATTENTION_SHAPES.add((*query.shape[2:4], (kernel_size,) * 2, (dilation,) * 2))
        return legacy_qkrpb(query, key, rpb, kernel_size, dilation)

    modeling_dinat.natten2dqkrpb = recorded_natten2dqkrpb  # to check the ops at the shapes used
    return transformers


# ---------------------------------------------------------------------------------------------
# Backbones


def build_original(repo: Path, case: dict) -> nn.Module:
    """The original repository's backbone class for ``case`` with its config's arguments."""
    arch = dict(case["arch"])
    module = import_original(repo, case["folder"], case["module"])
    cls = getattr(module, case["cls"])
    if case["cls"] == "D2DiNAT":
        return cls(_detectron2_cfg(arch), input_shape=None)
    arch["out_indices"] = tuple(arch["out_indices"])
    return cls(**arch)


def _detectron2_cfg(arch: dict) -> types.SimpleNamespace:
    """``cfg.MODEL.DINAT`` as train_m2f.py's add_dinat_config + the yaml file set it."""
    dinat = types.SimpleNamespace(**{key.upper(): value for key, value in arch.items()})
    return types.SimpleNamespace(MODEL=types.SimpleNamespace(DINAT=dinat))


def dinat_config(arch: dict):
    """transformers 4.40.2's DinatConfig for ``arch``: all four stages out, no layer scale unless given."""
    from transformers import DinatConfig

    return DinatConfig(**{"out_features": ["stage1", "stage2", "stage3", "stage4"], "layer_scale_init_value": 0.0,
                          **arch})


def build_transformers(arch: dict) -> nn.Module:
    """transformers 4.40.2's DinatBackbone with ``arch`` (DinatConfig arguments)."""
    from transformers.models.dinat.modeling_dinat import DinatBackbone

    return DinatBackbone(dinat_config(arch))


def transformers_arch(arch: dict) -> dict:
    """DinatConfig arguments of an original-code architecture (for the cross-check)."""
    keys = ("embed_dim", "depths", "num_heads", "kernel_size", "dilations", "mlp_ratio", "qkv_bias", "drop_path_rate")
    return {key: arch[key] for key in keys}


_BLOCK_NAMES = (  # original NATLayer attribute -> transformers DinatLayer attribute
    ("norm1.", "layernorm_before."), ("attn.rpb", "attention.self.rpb"), ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."), ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
)


def original_to_transformers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original NAT/DiNAT backbone keys -> transformers DinatBackbone keys (qkv split in q, k, v)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":
            prefix = "embeddings.patch_embeddings.projection." if parts[1] == "proj" else "embeddings.norm."
            out[prefix + ".".join(parts[2:])] = value
        elif parts[0].startswith("norm"):
            out[f"hidden_states_norms.stage{int(parts[0][4:]) + 1}.{parts[1]}"] = value
        elif parts[2] == "downsample":
            out["encoder." + key] = value
        else:
            prefix = f"encoder.levels.{parts[1]}.layers.{parts[3]}."
            rest = ".".join(parts[4:])
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[prefix + f"attention.self.{name}." + parts[-1]] = chunk.clone()
                continue
            for old, new in _BLOCK_NAMES:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = value
                    break
            else:
                raise KeyError(f"no transformers name for {key}")
    return out


def transformers_to_original(state: Dict[str, torch.Tensor], original_keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`original_to_transformers` for the original model's ``original_keys``."""
    out = {}
    for key in original_keys:
        names = list(original_to_transformers({key: torch.zeros(3)}))  # q, k, v names for a fused qkv
        out[key] = torch.cat([state[name] for name in names]) if len(names) == 3 else state[names[0]]
    return out


@torch.no_grad()
def run_backbone(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The four stage outputs (NCHW, after the per-output norms) of any of the backbones, in eval mode."""
    model.eval()
    out = model(x)
    if hasattr(out, "feature_maps"):  # transformers BackboneOutput
        out = list(out.feature_maps)
    elif isinstance(out, dict):  # detectron2: res2..res5
        out = [out[f"res{i + 2}"] for i in range(4)]
    return [o.float().contiguous() for o in out]


# ---------------------------------------------------------------------------------------------
# Summaries of the outputs


def grid_indices(height: int, width: int, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of a stage's stored grid: evenly spaced, first and last included, about
    ``GRID_BUDGET / channels`` positions in the map's aspect ratio."""
    positions = max(4, GRID_BUDGET // channels)
    rows = min(height, max(2, round(math.sqrt(positions * height / width))))
    cols = min(width, max(2, positions // rows))
    return (torch.linspace(0, height - 1, rows).round().long().unique(),
            torch.linspace(0, width - 1, cols).round().long().unique())


def summarize(outputs: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per stage s: ``stage{s}.grid`` (all channels at ``rows`` x ``cols``), ``.rows``, ``.cols``,
    ``.channel_mean`` [B, C] (mean over all positions) and ``.position_mean`` [B, H, W] (mean over channels)."""
    tensors = {}
    for s, out in enumerate(outputs):
        rows, cols = grid_indices(*out.shape[2:], channels=out.shape[1])
        tensors[f"stage{s}.rows"] = rows
        tensors[f"stage{s}.cols"] = cols
        tensors[f"stage{s}.grid"] = out[:, :, rows][:, :, :, cols].contiguous()
        tensors[f"stage{s}.channel_mean"] = out.double().mean(dim=(2, 3)).float()
        tensors[f"stage{s}.position_mean"] = out.double().mean(dim=1).float()
    return tensors


def padding_report(arch: dict, shapes: List[List[int]]) -> List[dict]:
    """Which stages' dilated blocks see a map smaller than kernel * dilation (NATTEN 0.14 padding)."""
    report = []
    for s, (height, width) in enumerate(shapes):
        windows = sorted({arch["kernel_size"] * d for d in arch["dilations"][s]})
        report.append({"stage": s, "map": [height, width], "windows": windows,
                       "pads_height": [w for w in windows if height < w],
                       "pads_width": [w for w in windows if width < w]})
    return report


# ---------------------------------------------------------------------------------------------
# Cases


def transformers_other_keys() -> List[Tuple[str, List[int], str]]:
    """A few non-backbone keys of transformers 4.40.2's OneFormerForUniversalSegmentation (OneFormer-DiNAT-L,
    Cityscapes: 19 labels, 250 queries): ``model.*`` read from a built OneFormerModel, plus its loss's two
    state-dict entries (``empty_weight`` buffer, ``logit_scale`` parameter; building the loss needs scipy)."""
    from transformers import OneFormerConfig
    from transformers.modeling_utils import no_init_weights
    from transformers.models.oneformer.modeling_oneformer import OneFormerModel

    backbone = dinat_config(CASES["transformers_dinat_large_oneformer_cityscapes"]["arch"])
    config = OneFormerConfig(backbone_config=backbone, num_labels=19, num_queries=250)
    with no_init_weights():  # DinatEncoder calls .item(), so not on the meta device
        state = OneFormerModel(config).state_dict()
    if not any(key.startswith(TRANSFORMERS_PREFIX[len("model."):]) for key in state):
        raise KeyError(f"OneFormerModel 4.40.2 holds no {TRANSFORMERS_PREFIX[len('model.'):]}*")
    wanted = ("pixel_level_module.decoder.encoder.layers.0.self_attn.sampling_offsets.weight",
              "pixel_level_module.decoder.mask_projection.weight",
              "pixel_level_module.decoder.input_projections.0.0.weight",
              "transformer_module.queries_embedder.weight",
              "transformer_module.decoder.query_transformer.decoder.layers.0.linear1.weight",
              "transformer_module.decoder.class_embed.weight",
              "task_encoder.task_mlp.layers.0.0.weight")
    missing = [key for key in wanted if key not in state]
    if missing:
        raise KeyError(f"OneFormerModel 4.40.2 has no {missing}")
    other = [("model." + key, list(state[key].shape), str(state[key].dtype).replace("torch.", "")) for key in wanted]
    return other + [("criterion.empty_weight", [config.num_labels + 1], "float32"),
                    ("criterion.logit_scale", [], "float32")]


def make_case(name: str, repo: Path, source_commit: str, log: Callable[[str], None]) -> Tuple[dict, dict, list]:
    """Build, weight and run one case; return (tensors, metadata, full outputs)."""
    case = CASES[name]
    if case["layout"] == "transformers":
        model = build_transformers(case["arch"])
        code = "transformers 4.40.2 transformers/models/dinat/modeling_dinat.py::DinatBackbone"
        other = transformers_other_keys()
    else:
        model = build_original(repo, case)
        code = f"{ORIGINAL_REPO}@{source_commit} {case['folder']}/{case['module']}.py::{case['cls']}"
        other = OTHER_KEYS[case["layout"]]
    state = golden_state_dict(model)
    model.load_state_dict(state, strict=True)
    x = golden_input(case["input_size"], case["seed"])
    log(f"{name}: {sum(v.numel() for v in state.values()):,} parameters in {len(state)} tensors, "
        f"input {tuple(x.shape)}")
    ATTENTION_SHAPES.clear()
    outputs = run_backbone(model, x)
    attention_shapes = set(ATTENTION_SHAPES)
    shapes = [list(o.shape[2:]) for o in outputs]
    meta = {
        "format": FORMAT, "case": name, "layout": case["layout"],
        "model": f"{case['timm_name']}.{case['tag']}", "timm_name": case["timm_name"], "tag": case["tag"],
        "reference_code": code, "config_file": case["config_file"], "arch": case["arch"],
        "checkpoint": {"container": case["container"], "wrapper": case["wrapper"],
                       "backbone_prefix": case["backbone_prefix"]},
        "backbone_keys": [[key, list(value.shape)] for key, value in state.items()],
        "num_backbone_tensors": len(state), "num_backbone_params": sum(v.numel() for v in state.values()),
        "other_keys": [list(item) for item in other],
        "weight_rule": WEIGHT_RULE, "weight_checksum": state_checksum(state),
        "input": {"shape": case["input_size"], "seed": case["seed"], "rule": INPUT_RULE, **checksum(x)},
        "outputs": {"stages": 4, "channels": [o.shape[1] for o in outputs], "shapes": shapes,
                    "key_prefix": "stage{s}.", "dtype": "float32",
                    "names": case["arch"].get("out_features", [f"stage{s}" for s in range(4)])},
        "padding": padding_report(case["arch"], shapes),
        "natten_semantics": "NATTEN 0.14 NeighborhoodAttention2D: zero-pad the normalised map bottom/right to "
                            "kernel*dilation before qkv (pad tokens unmasked), crop after attention, then proj",
    }
    meta["legacy_ops_check"] = check_legacy_ops(attention_shapes, log)
    return summarize(outputs), meta, outputs


def cross_check(repo: Path, name: str, outputs: List[torch.Tensor], log: Callable[[str], None]) -> dict:
    """Run the same weights and input through the other reference; max abs diff per stage."""
    case = CASES[name]
    x = golden_input(case["input_size"], case["seed"])
    if case["layout"] == "transformers":
        other_case = dict(case, folder="mask2former", module="dinat", cls="D2DiNAT",
                          arch={**transformers_arch(case["arch"]), "qk_scale": None, "drop_rate": 0.0,
                                "attn_drop_rate": 0.0, "out_features": ["res2", "res3", "res4", "res5"]})
        other = build_original(repo, other_case)
        reference = "mask2former/dinat.py::D2DiNAT"
        state = transformers_to_original(golden_state_dict(build_transformers(case["arch"])), other.state_dict())
    else:
        if case["cls"] == "DiNAT_s":
            raise ValueError("DiNAT_s has no transformers counterpart")
        other = build_transformers(transformers_arch(case["arch"]))
        reference = "transformers 4.40.2 DinatBackbone"
        state = original_to_transformers(golden_state_dict(build_original(repo, case)))
    other.load_state_dict(state, strict=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(outputs, run_backbone(other, x))]
    log(f"cross-check {name} vs {reference}: max abs diff per stage {diffs}")
    return {"against": reference, "max_abs_diff_per_stage": diffs, "max_abs_diff": max(diffs)}


def save_case(out_dir: Path, tensors: dict, meta: dict) -> Path:
    """Write ``<out_dir>/<case>.safetensors`` with the metadata JSON under ``golden``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{meta['case']}.safetensors"
    save_file(tensors, str(path), metadata={"golden": json.dumps(meta, sort_keys=True)})
    return path


def _git_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-repo", type=Path, required=True,
                        help="folder with the original repository's detection/, segmentation/, mask2former/")
    parser.add_argument("--source-commit", default=None,
                        help="its commit id, recorded in the metadata (default: git rev-parse in --original-repo)")
    parser.add_argument("--transformers-path", type=Path, required=True,
                        help="folder holding transformers 4.40.2 (pip install --no-deps --target)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--cross-check", nargs="*", default=["mmdet_dinat_tiny_maskrcnn_coco"],
                        choices=[name for name, case in CASES.items() if case["cls"] != "DiNAT_s"],
                        help="cases also run through the other reference (original code <-> transformers)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    install_framework_stand_ins()
    install_natten_stand_in()
    transformers = import_transformers(args.transformers_path)
    import timm

    brute_force_vs_natten = check_brute_force(print)
    commit = args.source_commit or _git_commit(args.original_repo)
    produced_with = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "original_repo": f"{ORIGINAL_REPO}@{commit}",
                     "natten": "timm_nat.compat stand-in (legacy natten2dqkrpb/natten2dav) + NATTEN 0.14 module",
                     "command": "tools/make_downstream_golden.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for name in args.cases:
        tensors, meta, outputs = make_case(name, args.original_repo, commit, print)
        meta["produced_with"] = produced_with
        meta["legacy_ops_check"]["brute_force_vs_natten_0_17_4"] = brute_force_vs_natten
        if name in args.cross_check:
            meta["cross_check"] = cross_check(args.original_repo, name, outputs, print)
        path = save_case(args.out, tensors, meta)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
