"""Shared fixtures and helpers: the golden reference data (tests/golden, see its README), the
architectures (from the family declarations), tiny model configs, and closeness checks."""
import functools
import json
import zlib
from pathlib import Path

import pytest
import torch

from timm_nat.models import model_families

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """Every test draws from torch's global generator seeded by its own id: a ``torch.randn`` without a
    generator gives the same inputs on every run and in any test order (a failure reproduces)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def golden() -> Path:
    """Root of the golden reference data; fails (never skips) when it is missing."""
    if not (GOLDEN_DIR / "README.md").is_file():
        pytest.fail(f"golden reference data not found at {GOLDEN_DIR} (part of the repository: is the checkout complete?)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_cases(golden) -> list:
    """The legacy NATTEN operator cases (``na2d_legacy.safetensors``, golden README): ``[(case, tensors)]``,
    ``case`` the per-case parameters, ``tensors`` its q, k, v, rpb, logits, out, grads, ... by name."""
    from safetensors import safe_open

    with safe_open(str(golden / "na2d_legacy.safetensors"), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        return [(case, {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"case{case['case']}.")})
                for case in cases]


@pytest.fixture(scope="session")
def tiny_model_kwargs(golden):
    """``tiny_model_kwargs(name)``: timm arch kwargs of a golden tiny checkpoint (from its config.json)."""
    return lambda name: _kwargs_from_transformers_config(golden / "hf" / name / "config.json")


def _kwargs_from_transformers_config(path: Path) -> dict:
    """timm kwargs of a transformers config.json, by the mapping its family declares."""
    config = json.loads(path.read_text())
    family = next(f for f in model_families().values() if config["model_type"] in f.transformers_model_types)
    return family.kwargs_from_transformers_config(config)


# --- helpers shared by the test files (import them: ``from conftest import max_abs_diff``) -------

GOLDEN_ATOL = 1e-4  # golden README: ~1e-6 expected in fp32, above 1e-4 is a bug

# every registered timm-nat architecture, from the family modules' declarations
ARCHITECTURES = sorted(arch for family in model_families().values() for arch in family.architectures)


def family_name(arch: str) -> str:
    """Name of the family that declares ``arch`` ('nat', 'dinat_s', 'isotropic')."""
    return next(name for name, family in model_families().items() if arch in family.architectures)


def is_hierarchical(arch: str) -> bool:
    """Four stages (NAT, DiNAT, DiNAT_s), not one stack of blocks (isotropic)."""
    return "depths" in model_families()[family_name(arch)].architectures[arch].args


@functools.lru_cache(maxsize=None)
def _tiny_kwargs(arch: str) -> tuple:
    args = model_families()[family_name(arch)].architectures[arch].args
    if not is_hierarchical(arch):
        return tuple(dict(embed_dim=32, num_heads=4, depth=4).items())
    dilations = tuple(tuple(stage[:2]) for stage in args.get("dilations") or [(1, 1)] * 4)
    return tuple(dict(embed_dim=16, num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2), dilations=dilations).items())


def tiny_kwargs(arch: str, **overrides) -> dict:
    """Few channels and blocks for ``arch``: two blocks a stage with the stage's own first two dilations
    (DiNAT alternates 1 and the stage's), or four isotropic blocks (dilation on the odd ones); its kernel,
    stem, patch, MLP ratio, layer scale and default input size kept. ``overrides`` replace any of them."""
    return dict(_tiny_kwargs(arch), **overrides)

# golden tiny checkpoint -> the registered architecture it is a shrunken copy of. hf/ and orig/ (their
# kwargs come from the hf/ config.json); orig/ only (golden README: DiNAT_s embed 16, depths 2-2-2-2,
# heads 1-2-4-8, kernel 3, dilations [[1,8],[1,4],[1,2],[1,1]], mlp 2.0; isotropic 128x128 input,
# patch 16, embed 32, depth 4, heads 4, kernel 3 (DiNAT-iso: dilation 2 on odd layers; ViT-RPB:
# global attention); 10 classes)
GOLDEN_HF_TINY = {"nat_test_tiny": "nat_mini", "dinat_test_tiny": "dinat_mini"}
_TINY_ISOTROPIC = dict(img_size=128, embed_dim=32, depth=4, num_heads=4)
GOLDEN_ORIGINAL_ONLY_TINY = {
    "dinat_s_test_tiny": ("dinat_s_tiny", dict(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3,
        dilations=((1, 8), (1, 4), (1, 2), (1, 1)), mlp_ratio=2.)),
    "nat_isotropic_test_tiny": ("nat_isotropic_small", dict(_TINY_ISOTROPIC, kernel_size=3)),
    "dinat_isotropic_test_tiny": ("dinat_isotropic_small", dict(_TINY_ISOTROPIC, kernel_size=3)),
    "vitrpb_test_tiny": ("vitrpb_small", _TINY_ISOTROPIC),
}


def golden_arch_and_kwargs(name: str) -> tuple:
    """``(architecture, kwargs)`` of a golden tiny checkpoint (``tests/golden/{hf,orig}``, 10 classes)."""
    if name in GOLDEN_HF_TINY:
        return GOLDEN_HF_TINY[name], _kwargs_from_transformers_config(GOLDEN_DIR / "hf" / name / "config.json")
    return GOLDEN_ORIGINAL_ONLY_TINY[name]


def golden_checkpoint(name: str, layout: str = "original") -> Path:
    """The golden tiny checkpoint file: ``layout`` 'transformers' (hf/) or 'original' (orig/)."""
    if layout == "transformers":
        return GOLDEN_DIR / "hf" / name / "pytorch_model.bin"
    return GOLDEN_DIR / "orig" / f"{name}.pth"


def golden_outputs(name: str, layout: str = "original") -> dict:
    """The legacy stack's outputs for a golden tiny checkpoint (inputs, logits, features; see the README)."""
    from safetensors.torch import load_file

    if layout == "transformers":
        return load_file(GOLDEN_DIR / "hf" / name / "golden.safetensors")
    return load_file(GOLDEN_DIR / "orig" / f"{name}.golden.safetensors")


def assert_close(name: str, ours, expected, tol: float = 1e-5, relative: bool = True) -> None:
    """``max|ours - expected| <= tol * max(1, max|expected|)`` (``relative``: the operator's golden bound,
    per tensor), or ``<= tol``; the message names ``name``."""
    bound = tol * max(1.0, expected.abs().max().item()) if relative else tol
    diff = max_abs_diff(ours, expected)
    assert diff <= bound, f"{name}: max abs diff {diff:.3g} > {bound:.3g}"


def max_abs_diff(actual, expected) -> float:
    """Largest absolute difference of two tensors of the same shape (asserts the shapes agree)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual - expected).abs().max().item()


def assert_pretrained_cfg_is_registry_entry(model, entry: dict) -> None:
    """The registry -> timm pretrained cfg check: every published fact of ``entry`` (a
    ``weights/checkpoints.toml`` table) in ``model.pretrained_cfg``, and the family's conventions
    pointing at real modules of ``model``."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = model.pretrained_cfg
    assert (cfg["architecture"], cfg["tag"]) == (entry["model"], entry["tag"])
    assert (cfg.get("url") or None) == entry.get("url")
    assert "url" not in entry or entry["url"].endswith(".pth")
    assert cfg.get("hf_hub_id") == entry.get("hf_hub_id")
    assert cfg.get("hf_hub_filename") == entry.get("hf_hub_filename")
    assert cfg["num_classes"] == entry["num_classes"] == model.num_classes == model.get_classifier().out_features
    assert tuple(cfg["input_size"]) == tuple(entry["input_size"])
    assert cfg["crop_pct"] == entry["crop_pct"]
    assert cfg["license"] == entry["license"]
    assert cfg["interpolation"] == "bicubic"
    assert (cfg["mean"], cfg["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    # pool_size is the model's fact: its final feature map at the published input size
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(cfg["pool_size"]) == tuple(s // reduction for s in entry["input_size"][1:])
    if "top1" in entry:
        assert f"top-1 {entry['top1']}%" in cfg["description"]
