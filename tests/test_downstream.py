"""Detection / segmentation backbones (``weights/downstream.toml``, issue 22): registry rows, the
features_only build with each entry's architecture and per-output norms, strict loading of whole
detector files, and golden stage outputs of the original backbone code per checkpoint layout
(tests/golden/downstream, see the golden README)."""
import json
import logging
import math
import zlib

import pytest
import timm
import torch
from safetensors import safe_open

from timm_nat.models import model_families
from timm_nat.pretrained import (
    downstream_backbone_kwargs, load_downstream_registry, load_registry, registry_entry_name,
)

from conftest import GOLDEN_DIR

ENTRIES = load_downstream_registry()
ARCHITECTURES = {arch: spec.args for family in model_families().values() for arch, spec in family.architectures.items()}
GOLDEN_CASES = sorted(p.stem for p in (GOLDEN_DIR / "downstream").glob("*.safetensors"))
LAYOUTS = ("mmdet", "mmseg", "detectron2", "transformers")


def _golden_weight(key: str, shape) -> torch.Tensor:
    """The golden README's weight rule ("Weight and input rules"), for one backbone key."""
    z = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
    name = key.rsplit(".", 1)[-1]
    if name in ("gamma1", "gamma2", "layer_scale_parameters"):
        return 0.1 * z
    if name == "rpb":
        return z
    if name == "weight":
        return 1 + 0.1 * z if len(shape) == 1 else z / math.sqrt(math.prod(shape[1:]))
    return 0.1 * z


def _whole_checkpoint(meta: dict) -> dict:
    """The golden case's checkpoint as its framework saved it: backbone by the weight rule, plus the
    listed non-backbone entries (zeros), in the framework's wrapper."""
    prefix = meta["checkpoint"]["backbone_prefix"]
    state = {prefix + key: _golden_weight(key, shape) for key, shape in meta["backbone_keys"]}
    state.update({key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, shape, dtype in meta["other_keys"]})
    wrapper = meta["checkpoint"]["wrapper"]
    if wrapper == "state_dict":
        return {"meta": {"config": "model = dict(...)", "CLASSES": ("person",)}, "state_dict": state}
    return {wrapper: state} if wrapper else state


def _golden_case(case: str):
    with safe_open(str(GOLDEN_DIR / "downstream" / f"{case}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["golden"]), {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

def test_downstream_registry_names_are_unique_and_registered():
    names = [registry_entry_name(e) for e in ENTRIES]
    assert len(names) == 45 and len(set(names)) == len(names)
    assert not set(names) & {registry_entry_name(e) for e in load_registry()}
    assert set(names) <= set(timm.list_pretrained())


@pytest.mark.parametrize("entry", ENTRIES, ids=registry_entry_name)
def test_downstream_entry_matches_its_architecture(entry):
    """The config file's sizes equal the architecture's; the task's dilations fit its depths."""
    arch = ARCHITECTURES[entry["model"]]
    for key in ("embed_dim", "depths", "num_heads", "mlp_ratio"):
        value = tuple(entry[key]) if isinstance(entry[key], list) else entry[key]
        assert value == arch[key], key
    assert entry["layout"] in LAYOUTS and ("url" in entry or "hf_hub_id" in entry)
    assert entry["task"] and entry["dataset"] and entry["license"] and entry["paper"]
    if "dilations" in entry:
        assert [len(d) for d in entry["dilations"]] == list(entry["depths"])
    assert entry.get("layer_scale") == arch.get("ls_init_value")


@pytest.mark.parametrize("entry", ENTRIES, ids=registry_entry_name)
def test_downstream_backbone_built_from_entry(entry):
    """The tag builds the entry's backbone: its kernel / dilations, per-output norms, no final norm or
    classifier, and exactly the computed backbone parameter count."""
    model = timm.create_model(registry_entry_name(entry), features_only=True, device="meta")
    net = model.model
    assert sum(p.numel() for p in model.parameters()) == entry["backbone_params"]
    blocks = [block for stage in net.stages for block in stage.blocks]
    assert {block.attn.kernel_size for block in blocks} == {(entry["kernel_size"],) * 2}
    dilations = [d for stage in entry.get("dilations", [[1] * n for n in entry["depths"]]) for d in stage]
    assert [block.attn.dilation for block in blocks] == [(d, d) for d in dilations]
    assert len(net.out_norms) == 4 and isinstance(net.norm, torch.nn.Identity)
    assert model.pretrained_cfg["input_size"] == tuple(entry["eval_input_size"])


def test_downstream_tag_without_features_only_says_there_is_no_classifier():
    with pytest.raises(ValueError, match=r"dinat_tiny\.maskrcnn_coco .* no classifier; .*features_only=True"):
        timm.create_model("dinat_tiny.maskrcnn_coco")


def test_out_indices_subset_keeps_its_norms():
    """A subset of outputs equals those outputs of the full backbone (their norms applied)."""
    kwargs = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
                  dilations=((1,), (1, 2), (1, 2), (1,)))
    full = timm.create_model("dinat_tiny.maskrcnn_coco", features_only=True, **kwargs).eval()
    for norm in full.model.out_norms:  # non-trivial norms, so a skipped one shows
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    subset = timm.create_model("dinat_tiny.maskrcnn_coco", features_only=True, out_indices=(1, 3), **kwargs).eval()
    subset.load_state_dict({k: v for k, v in full.state_dict().items() if k in subset.state_dict()})
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected, got = full(x), subset(x)
    assert [o.shape for o in got] == [expected[1].shape, expected[3].shape]
    torch.testing.assert_close(got[0], expected[1])
    torch.testing.assert_close(got[1], expected[3])


# ---------------------------------------------------------------------------------------------
# Loading whole detector files: backbone strict, the rest reported
# ---------------------------------------------------------------------------------------------

def _tiny_mmdet_file(tmp_path, drop=(), extra=()):
    """A tiny DiNAT backbone saved as mmdet would: ``backbone.`` keys in the original naming, plus a neck."""
    kwargs = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3,
                  dilations=((1,), (1, 2), (1, 2), (1,)))
    source = timm.create_model("dinat_tiny.maskrcnn_coco", features_only=True, **kwargs).model
    original = {}
    for key, value in source.state_dict().items():
        key = key.replace("out_norms.", "norm")
        key = key.replace("stages.", "levels.")
        original[key] = value
    # timm downsamples at the start of stage i+1; the original at the end of level i
    original = {(f"levels.{int(k.split('.')[1]) - 1}." + k.split(".", 2)[2]) if ".downsample." in k else k: v
                for k, v in original.items()}
    state = {"backbone." + k: v for k, v in original.items() if k not in drop}
    state.update({"neck.lateral_convs.0.conv.weight": torch.zeros(8, 16, 1, 1), "rpn_head.rpn_cls.bias": torch.zeros(3)})
    state.update(dict(extra))
    path = tmp_path / "det.pth"
    torch.save({"meta": {"CLASSES": ("a",)}, "state_dict": state}, path)
    return path, kwargs, source


def test_whole_detector_file_loads_its_backbone_and_reports_the_rest(tmp_path, caplog):
    path, kwargs, source = _tiny_mmdet_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = timm.create_model("dinat_tiny.maskrcnn_coco", pretrained=True, features_only=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[key], value, rtol=0, atol=0)
    report = [r.getMessage() for r in caplog.records if "not part of the backbone" in r.getMessage()]
    assert len(report) == 1 and "2 keys are not part of the backbone" in report[0]
    assert "neck: 1" in report[0] and "rpn_head: 1" in report[0]


def test_detector_file_missing_a_backbone_norm_is_an_error(tmp_path):
    path, kwargs, _ = _tiny_mmdet_file(tmp_path, drop=("norm2.weight",))
    with pytest.raises(RuntimeError, match=r"1 missing key\(s\): out_norms\.2\.weight"):
        timm.create_model("dinat_tiny.maskrcnn_coco", pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def test_detector_file_with_stray_backbone_key_is_an_error(tmp_path):
    """A classification final norm inside the backbone is not silently dropped: the backbone has none."""
    path, kwargs, _ = _tiny_mmdet_file(tmp_path, extra={"backbone.norm.weight": torch.ones(128)}.items())
    with pytest.raises(RuntimeError, match=r"1 unexpected key\(s\): norm\.weight"):
        timm.create_model("dinat_tiny.maskrcnn_coco", pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


# ---------------------------------------------------------------------------------------------
# Golden: one real-size checkpoint per layout, stage outputs of the original code
# ---------------------------------------------------------------------------------------------

def test_every_layout_has_a_golden_case():
    assert sorted(_golden_case(case)[0]["layout"] for case in GOLDEN_CASES) == sorted(LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_downstream_golden(case, tmp_path, caplog):
    """The real layout at real size loads through the public path (timm name + file) and gives the
    original backbone's stage outputs at a detection-sized input (small maps padded as NATTEN 0.14)."""
    meta, expected = _golden_case(case)
    weights = {key: _golden_weight(key, shape) for key, shape in meta["backbone_keys"]}
    checksum = meta["weight_checksum"]
    assert math.isclose(sum(weights[k].double().sum().item() for k in sorted(weights)), checksum["sum"], rel_tol=1e-9)
    path = tmp_path / "checkpoint.pth"
    torch.save(_whole_checkpoint(meta), path)
    with caplog.at_level(logging.WARNING):
        model = timm.create_model(meta["model"], pretrained=True, features_only=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert f"{len(meta['other_keys'])} keys are not part of the backbone" in caplog.text
    assert sum(p.numel() for p in model.parameters()) == meta["num_backbone_params"]
    shape, seed = meta["input"]["shape"], meta["input"]["seed"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert math.isclose(x.double().sum().item(), meta["input"]["sum"], rel_tol=1e-9)
    with torch.no_grad():
        outputs = model(x)
    for s, out in enumerate(outputs):
        assert list(out.shape[2:]) == meta["outputs"]["shapes"][s]
        rows, cols = expected[f"stage{s}.rows"], expected[f"stage{s}.cols"]
        torch.testing.assert_close(out[:, :, rows][:, :, :, cols], expected[f"stage{s}.grid"], rtol=0, atol=1e-4)
        torch.testing.assert_close(out.double().mean(dim=(2, 3)).float(), expected[f"stage{s}.channel_mean"],
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(out.double().mean(dim=1).float(), expected[f"stage{s}.position_mean"],
                                   rtol=0, atol=1e-4)


def test_golden_cases_name_registry_entries():
    names = {registry_entry_name(e): e for e in ENTRIES}
    for case in GOLDEN_CASES:
        meta, _ = _golden_case(case)
        entry = names[meta["model"]]
        assert entry["layout"] == meta["layout"]
        assert downstream_backbone_kwargs(entry)["kernel_size"] == meta["arch"]["kernel_size"]


def test_models_doc_table_lists_every_entry_with_its_metrics():
    """docs/models.md's generated table: one row per entry, in registry order, with its published metrics."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("registry_table", GOLDEN_DIR.parents[1] / "tools" / "registry_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    doc = (GOLDEN_DIR.parents[1] / "docs" / "models.md").read_text()
    start, end = tool.DOWNSTREAM_MARKERS
    assert doc[doc.index(start) + len(start):doc.index(end)].strip("\n") + "\n" == tool.downstream_table_markdown()
    rows = tool.downstream_table_markdown().splitlines()[2:]
    assert len(rows) == len(ENTRIES)
    for row, entry in zip(rows, ENTRIES):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`{registry_entry_name(entry)}`" and entry["layout"] in cells[1]
        metrics = [(k, entry[k]) for k in ("box_map", "mask_map", "pq", "ap", "miou", "miou_ms") if k in entry]
        assert metrics and all(f"{v:g}" in cells[3] for _, v in metrics)
        assert cells[-1] == f"{entry['backbone_params']:,}"
