"""timm-nat-convert: golden checkpoints in every published layout become timm folders that timm's
public loading paths load and that reproduce the legacy stack's logits; every expected failure exits
non-zero with a one-line reason; ``--all`` converts what it can download and checks the rest offline.

Runs in-process (``main([...])``) except one real command line; no network: Hub and URL sources come
from caches these tests build (HF_HUB_OFFLINE=1).
"""
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_nat.convert as convert
import timm_nat.convert.batch
import timm_nat.convert.conversion
from timm_nat.convert import ConversionError, infer_architecture, main
from timm_nat.pretrained import load_registry, registry_entry_name

from conftest import max_abs_diff

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # golden README: ~1e-6 expected in fp32, above 1e-4 is a bug
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id
# golden README: dinat_test_tiny and dinat_s_test_tiny both use these dilations (not in an original .pth)
OUTPUT_FILES = {"model.safetensors", "config.json", "README.md", "timm-nat-convert.json"}
TINY_DILATIONS = json.dumps({"dilations": [[1, 8], [1, 4], [1, 2], [1, 1]]})

# golden source -> (extra command-line arguments, golden outputs, architecture it must become)
GOLDEN_CASES = {
    "hf/nat_test_tiny": ([], "hf/nat_test_tiny/golden.safetensors", "nat_mini"),
    "hf/dinat_test_tiny": ([], "hf/dinat_test_tiny/golden.safetensors", "dinat_mini"),
    "orig/nat_test_tiny.pth": (["--model", "nat_mini"], "orig/nat_test_tiny.golden.safetensors", "nat_mini"),
    "orig/dinat_test_tiny.pth": (
        ["--model", "dinat_mini", "--model-args", TINY_DILATIONS], "orig/dinat_test_tiny.golden.safetensors",
        "dinat_mini"),
    # the other families (original layout only)
    "orig/dinat_s_test_tiny.pth": (
        ["--model", "dinat_s_tiny", "--model-args", TINY_DILATIONS], "orig/dinat_s_test_tiny.golden.safetensors",
        "dinat_s_tiny"),
    "orig/nat_isotropic_test_tiny.pth": (
        ["--model", "nat_isotropic_small"], "orig/nat_isotropic_test_tiny.golden.safetensors", "nat_isotropic_small"),
    "orig/dinat_isotropic_test_tiny.pth": (
        ["--model", "dinat_isotropic_small"], "orig/dinat_isotropic_test_tiny.golden.safetensors",
        "dinat_isotropic_small"),
    # a global RPB table (with its index buffer) identifies ViT-RPB without help
    "orig/vitrpb_test_tiny.pth": ([], "orig/vitrpb_test_tiny.golden.safetensors", "vitrpb_small"),
}


def _load_both_ways(folder: Path):
    """The converted folder through timm's public paths: explicit architecture + file, and local-dir."""
    config = json.loads((folder / "config.json").read_text())
    via_file = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=config["num_classes"]),
        **config.get("model_args", {}),
    )
    via_dir = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return config, {"file": via_file.eval(), "local-dir": via_dir.eval()}


def _fail(argv, capsys) -> str:
    """Run main(argv), expecting exit 1 with one ``error:`` line on stderr; returns that line."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("timm-nat-convert: error: "), err
    return err


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Offline, with empty Hub and torch hub caches of our own: ``(hub_cache, torch_checkpoints)``."""
    hub_cache, torch_home = tmp_path / "hf-cache", tmp_path / "torch-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return hub_cache, torch_home / "hub" / "checkpoints"


def _hub_snapshot(hub_cache: Path, repo_id: str) -> Path:
    """huggingface_hub's cache layout for ``repo_id``: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    snapshot = repo_dir / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    return snapshot


def _random_checkpoint(golden, shapes_name: str) -> dict:
    """A real-size state dict in a published layout, random values, from a golden shapes file."""
    layout = json.loads((golden / "shapes" / shapes_name).read_text())
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in layout["keys"].items()}


def _meta_checkpoint(golden, shapes_name: str) -> dict:
    """A published layout with no storage: enough for architecture inference, which only reads shapes."""
    layout = json.loads((golden / "shapes" / shapes_name).read_text())
    return {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}


# ----------------------------------------------------------------------------------------------
# Golden checkpoints
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_converted_golden_checkpoint_reproduces_golden_logits(golden, tmp_path, capsys, case):
    args, outputs_name, arch = GOLDEN_CASES[case]
    out = tmp_path / "converted"
    assert main([str(golden / case), "-o", str(out), *args]) == 0
    assert "verified: max abs diff 0.0 via pretrained_cfg_overlay file, 0.0 via local-dir" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES

    config, models = _load_both_ways(out)
    assert config["architecture"] == arch and config["num_classes"] == 10
    outputs = load_file(golden / outputs_name)
    inputs = sorted(k for k in outputs if k.startswith("input"))
    assert inputs, f"no inputs in {outputs_name}"
    diffs = {}
    for path, model in models.items():
        with torch.no_grad():
            diffs[path] = max(
                max_abs_diff(model(outputs[k]), outputs[k.replace("input", "logits")]) for k in inputs)
    print(f"{case}: max abs diff vs golden logits {diffs}")
    assert max(diffs.values()) <= ATOL, f"{case}: {diffs} > {ATOL}"


@pytest.mark.timeout(400)  # its subprocess has 300 s
def test_command_line_converts_and_exits_zero(golden, tmp_path):
    out = tmp_path / "converted"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), str(golden / "hf" / "dinat_test_tiny"), "-o", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "dinat_mini with model_args" in run.stdout and "max abs diff 0.0" in run.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_model_card_says_what_and_how(golden, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main([str(golden / "hf" / "dinat_test_tiny"), "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "DiNAT-Mini." in card  # the architecture's own description
    assert "`dinat_test_tiny` (local folder)" in card
    assert "not a checkpoint of the timm-nat registry" in card  # no borrowed published numbers
    assert "arXiv:2209.15001" in card and "max abs diff 0.0" in card
    assert 'timm.create_model("local-dir:' in card and '"dilations": [[1, 8], [1, 4], [1, 2], [1, 1]]' in card


# ----------------------------------------------------------------------------------------------
# Sources: Hub repo (from the cache), URL (from torch hub's cache)
# ----------------------------------------------------------------------------------------------

def test_hub_repo_source(golden, tmp_path, capsys, offline_caches):
    hub_cache, _ = offline_caches
    snapshot = _hub_snapshot(hub_cache, "someone/dinat-test-tiny")
    for name in ("config.json", "pytorch_model.bin"):  # linked, not copied
        (snapshot / name).symlink_to(golden / "hf" / "dinat_test_tiny" / name)
    out = tmp_path / "converted"
    assert main(["someone/dinat-test-tiny", "-o", str(out)]) == 0
    assert "someone/dinat-test-tiny: dinat_mini with model_args" in capsys.readouterr().out
    assert "`someone/dinat-test-tiny` (Hugging Face Hub, transformers layout)" in (out / "README.md").read_text()


def test_url_source_from_torch_hub_cache(golden, tmp_path, capsys, offline_caches):
    _, checkpoints = offline_caches
    checkpoints.mkdir(parents=True)
    (checkpoints / "vitrpb_test_tiny.pth").symlink_to(golden / "orig" / "vitrpb_test_tiny.pth")
    out = tmp_path / "converted"
    assert main(["https://example.com/weights/vitrpb_test_tiny.pth", "-o", str(out)]) == 0
    assert "vitrpb_small with model_args" in capsys.readouterr().out
    assert "(original .pth)" in (out / "README.md").read_text()


def test_push_to_hub_uploads_the_folder(golden, tmp_path, monkeypatch, capsys):
    calls = []

    class RecordingHfApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), kwargs))

    monkeypatch.setattr(timm_nat.convert.conversion, "HfApi", RecordingHfApi)
    out = tmp_path / "converted"
    assert main([str(golden / "hf" / "nat_test_tiny"), "-o", str(out), "--push-to-hub", "me/nat-test-tiny"]) == 0
    (create, repo_id, create_kwargs), (upload, files, upload_kwargs) = calls
    assert (create, repo_id, create_kwargs["exist_ok"]) == ("create_repo", "me/nat-test-tiny", True)
    assert upload == "upload_folder" and upload_kwargs["ignore_patterns"] == ["timm-nat-convert.json"]
    assert files == ["README.md", "config.json", "model.safetensors", "timm-nat-convert.json"]
    assert upload_kwargs["repo_id"] == "me/nat-test-tiny" and Path(upload_kwargs["folder_path"]) == out
    assert 'timm.create_model("hf-hub:me/nat-test-tiny", pretrained=True)' in (out / "README.md").read_text()
    assert "pushed" in capsys.readouterr().out


def test_push_to_hub_failure_is_reported(golden, tmp_path, monkeypatch, capsys):
    class OfflineHfApi:
        def create_repo(self, repo_id, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr(timm_nat.convert.conversion, "HfApi", OfflineHfApi)
    err = _fail([golden / "hf" / "nat_test_tiny", "-o", tmp_path / "out", "--push-to-hub", "me/x"], capsys)
    assert "could not push" in err and "me/x" in err and "network unreachable" in err


# ----------------------------------------------------------------------------------------------
# Expected failures: non-zero exit, one line naming the problem
# ----------------------------------------------------------------------------------------------

def test_unknown_layout_is_refused(tmp_path, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    err = _fail([path, "-o", tmp_path / "out"], capsys)
    assert "fits no registered timm-nat model" in err and "conv1.weight" in err
    assert not (tmp_path / "out").exists()


def test_missing_file_is_refused(tmp_path, capsys):
    err = _fail([tmp_path / "nowhere" / "weights.pth", "-o", tmp_path / "out"], capsys)
    assert "no such file or folder" in err and "weights.pth" in err


def test_folder_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _fail([tmp_path / "empty", "-o", tmp_path / "out"], capsys)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_is_refused(tmp_path, capsys, damage):
    path = tmp_path / "weights.pth"
    torch.save({"patch_embed.proj.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00not a checkpoint\xff" * 64)
    err = _fail([path, "-o", tmp_path / "out"], capsys)
    assert f"could not read checkpoint {path}" in err


def test_existing_output_needs_force(golden, tmp_path, capsys):
    source, out = golden / "hf" / "nat_test_tiny", tmp_path / "converted"
    assert main([str(source), "-o", str(out)]) == 0
    first = (out / "model.safetensors").stat().st_ino
    err = _fail([source, "-o", out], capsys)
    assert "already exists" in err and "--force" in err
    assert (out / "model.safetensors").stat().st_ino == first  # untouched

    assert main([str(source), "-o", str(out), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_ino != first  # replaced
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no partial / old folder left behind


def test_force_keeps_files_the_converter_did_not_write(golden, tmp_path, capsys):
    source, out = golden / "hf" / "nat_test_tiny", tmp_path / "converted"
    assert main([str(source), "-o", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    err = _fail([source, "-o", out, "--force"], capsys)
    assert "holds files timm-nat-convert did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine" and {p.name for p in out.iterdir()} == OUTPUT_FILES | {"notes.txt"}


def test_force_never_deletes_a_folder_that_is_not_an_output(golden, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    err = _fail([golden / "hf" / "nat_test_tiny", "-o", precious, "--force"], capsys)
    assert "not a converted model folder" in err and (precious / "thesis.tex").is_file()


def test_ambiguous_original_layout_lists_candidates(golden, tmp_path, capsys):
    err = _fail([golden / "orig" / "nat_test_tiny.pth", "-o", tmp_path / "out"], capsys)
    assert "ambiguous architecture" in err and "dilations" in err
    assert "--model nat_mini" in err and "--model dinat_mini" in err


def test_dinat_without_dilations_for_its_depths_is_refused(golden, tmp_path, capsys):
    err = _fail([golden / "orig" / "dinat_test_tiny.pth", "-o", tmp_path / "out", "--model", "dinat_mini"], capsys)
    assert "does not fit dinat_mini" in err and "dilations" in err


def test_unknown_model_is_refused(golden, tmp_path, capsys):
    err = _fail([golden / "orig" / "nat_test_tiny.pth", "-o", tmp_path / "out", "--model", "resnet18"], capsys)
    assert "unknown model 'resnet18'" in err and "nat_mini" in err


def test_offline_hub_repo_is_refused(tmp_path, capsys, offline_caches):
    err = _fail(["someone/not-cached", "-o", tmp_path / "out"], capsys)
    assert "could not download someone/not-cached: offline" in err


def test_bad_model_args_is_a_usage_error(golden, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(golden / "orig" / "nat_test_tiny.pth"), "-o", str(tmp_path / "out"), "--model-args", "[1, 2]"])
    assert info.value.code == 2 and "must be a JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Architecture inference on the published layouts (shapes only, no storage)
# ----------------------------------------------------------------------------------------------

def _entries_with_hub_layout():
    return [e for e in load_registry() if "hf_hub_id" in e]


@pytest.mark.parametrize("entry", _entries_with_hub_layout(), ids=registry_entry_name)
def test_every_hub_layout_maps_onto_its_registered_model(golden, entry):
    checkpoint = _meta_checkpoint(golden, entry["hf_hub_id"].split("/")[1] + ".json")
    arch = infer_architecture(checkpoint, entry=entry)
    assert (arch.model, arch.model_args, arch.num_classes, arch.name) == (
        entry["model"], {}, entry["num_classes"], registry_entry_name(entry))


@pytest.mark.parametrize("arch", convert.timm_nat_architectures())
def test_every_original_layout_maps_onto_its_registered_model(golden, arch):
    result = infer_architecture(_meta_checkpoint(golden, f"orig_{arch}.json"), model=arch)
    assert (result.model, result.model_args, result.num_classes) == (arch, {}, 1000)


def _published_transformers_config(model_type: str, **overrides) -> dict:
    """The fields of a shi-labs transformers config.json that the converter reads."""
    config = dict(model_type=model_type, embed_dim=64, depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16],
                  kernel_size=7, mlp_ratio=3.0, layer_scale_init_value=0.0)
    if model_type == "dinat":
        config["dilations"] = [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]
    return dict(config, **overrides)


@pytest.mark.parametrize("model_type, expected", [("nat", "nat_mini"), ("dinat", "dinat_mini")])
def test_transformers_config_separates_nat_from_dinat(golden, model_type, expected):
    checkpoint = _meta_checkpoint(golden, "dinat-mini-in1k-224.json")  # NAT-Mini and DiNAT-Mini share it
    arch = infer_architecture(checkpoint, config=_published_transformers_config(model_type))
    assert (arch.model, arch.model_args) == (expected, {})


@pytest.mark.parametrize("kernel_size, stage_dilations, expected", [
    (7, (8, 4, 2, 1), "dinat_large"),
    (7, (13, 6, 3, 1), "dinat_large_384"),
    (11, (8, 4, 2, 1), "dinat_large_384_11x11"),
])
def test_transformers_config_picks_kernel_and_dilations(golden, kernel_size, stage_dilations, expected):
    depths = (3, 4, 18, 5)
    dilations = [[1 if j % 2 == 0 else d for j in range(n)] for n, d in zip(depths, stage_dilations)]
    config = _published_transformers_config(
        "dinat", embed_dim=192, depths=list(depths), num_heads=[6, 12, 24, 48], kernel_size=kernel_size,
        mlp_ratio=2.0, dilations=dilations)
    shapes = "dinat-large-11x11-in22k-in1k-384.json" if kernel_size == 11 else "dinat-large-in22k-in1k-224.json"
    arch = infer_architecture(_meta_checkpoint(golden, shapes), config=config)
    assert (arch.model, arch.model_args) == (expected, {})


def test_registered_layouts_that_only_differ_in_dilations_are_ambiguous(golden):
    with pytest.raises(ConversionError, match="ambiguous architecture") as info:
        infer_architecture(_meta_checkpoint(golden, "orig_dinat_large.json"))
    assert all(name in str(info.value) for name in ("dinat_large", "dinat_large_384"))


# ----------------------------------------------------------------------------------------------
# --all
# ----------------------------------------------------------------------------------------------

def test_all_offline_reports_failed_downloads_and_checks_offline(tmp_path, capsys, offline_caches):
    entries = {registry_entry_name(e): e for e in load_registry()}
    hub_entry, url_entry = entries["nat_mini.in1k"], entries["dinat_s_tiny.in1k"]
    status = main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "nat_mini.in1k", "dinat_s_tiny.in1k"])
    out = capsys.readouterr().out
    assert status == 3, out
    assert f"could not download {hub_entry['hf_hub_id']}: offline" in out
    assert f"could not download {url_entry['url']}: offline" in out
    assert out.count("offline checks: params yes") == 2 and out.count("forward 1x3x224x224 -> (1, 1000) ok") == 2
    summary = out[out.index("entry  "):]
    assert "nat_mini.in1k" in summary and "dinat_s_tiny.in1k" in summary and summary.count("offline-checked") == 2
    assert "2 entries: 0 converted and verified, 2 checked offline only (downloads failed), 0 wrong" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["entry"] for e in report["entries"]] == ["nat_mini.in1k", "dinat_s_tiny.in1k"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # nothing converted


def test_all_flags_a_parameter_count_that_disagrees_with_the_registry(tmp_path, capsys, offline_caches, monkeypatch):
    wrong = [dict(e, params_m=2 * e["params_m"]) if registry_entry_name(e) == "nat_mini.in1k" else e
             for e in load_registry()]
    monkeypatch.setattr(timm_nat.convert.batch, "load_registry", lambda: tuple(wrong))
    assert main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "nat_mini.in1k"]) == 1
    out = capsys.readouterr().out
    assert "params NO 19.98M != 40M published" in out and "FAILED" in out and "1 wrong" in out


@pytest.mark.slow
def test_all_converts_downloaded_entries_and_exits_zero(golden, tmp_path, capsys, offline_caches):
    hub_cache, _ = offline_caches
    entry = next(e for e in load_registry() if registry_entry_name(e) == "dinat_mini.in1k")
    snapshot = _hub_snapshot(hub_cache, entry["hf_hub_id"])
    torch.save(_random_checkpoint(golden, "dinat-mini-in1k-224.json"), snapshot / entry["hf_hub_filename"])
    out = tmp_path / "out"
    assert main(["--all", "--output-dir", str(out), "--only", "dinat_mini.in1k"]) == 0
    log = capsys.readouterr().out
    assert "dinat_mini, 1000 classes (registry entry dinat_mini.in1k)" in log and "max abs diff 0.0" in log
    assert "1 entries: 1 converted and verified, 0 checked offline only" in log
    card = (out / "dinat_mini.in1k" / "README.md").read_text()
    assert f"top-1 {entry['top1']:g}%" in card and f"license: {entry['license']}" in card
    config = json.loads((out / "dinat_mini.in1k" / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "in1k"
    assert set(config.get("model_args", {})) <= {"num_classes", "in_chans", "global_pool"}  # defaults only
    # independently of the converter's own check: the Hub file through timm-nat's loader gives the same
    source = timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(snapshot / entry["hf_hub_filename"]))).eval()
    converted = timm.create_model(f"local-dir:{out / 'dinat_mini.in1k'}", pretrained=True).eval()
    inputs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_abs_diff(converted(inputs), source(inputs)) == 0.0


def test_all_refuses_existing_outputs_without_force(tmp_path, capsys, offline_caches):
    (tmp_path / "out" / "nat_mini.in1k").mkdir(parents=True)
    assert main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "nat_mini.in1k"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().out


def test_all_only_must_match_something(tmp_path, capsys):
    err = _fail(["--all", "--output-dir", tmp_path / "out", "--only", "no_such_model*"], capsys)
    assert "matches no registry entry" in err


# ----------------------------------------------------------------------------------------------
# Detection / segmentation backbones (weights/downstream.toml)
# ----------------------------------------------------------------------------------------------

def test_all_offline_checks_downstream_backbones(tmp_path, capsys, offline_caches, monkeypatch):
    """Not downloadable: built with the entry's arguments, the exact computed backbone parameter count,
    and the four normed stage maps of a forward (here at a reduced size, at which attention pads; the
    main job runs each at its task's test size)."""
    monkeypatch.setattr(timm_nat.convert.batch, "BACKBONE_CHECK_SIZE", (3, 192, 256))
    status = main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "dinat_tiny.maskrcnn_coco",
                   "dinat_s_tiny.upernet_ade20k"])
    out = capsys.readouterr().out
    assert status == 3, out
    assert "params yes 27,389,478 == 27,389,478 backbone (computed)" in out
    assert "params yes 27,520,698 == 27,520,698 backbone (computed)" in out
    assert ("forward 1x3x192x256 (reduced from the task's 3x800x1344) -> (1, 64, 48, 64), (1, 128, 24, 32), "
            "(1, 256, 12, 16), (1, 512, 6, 8) ok") in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["checks"]["num_params"] for e in report["entries"]] == [27389478, 27520698]


def test_all_flags_a_backbone_parameter_count_that_disagrees(tmp_path, capsys, offline_caches, monkeypatch):
    from timm_nat.pretrained import load_downstream_registry
    wrong = [dict(e, backbone_params=e["backbone_params"] + 1) for e in load_downstream_registry()]
    monkeypatch.setattr(timm_nat.convert.batch, "load_downstream_registry", lambda: tuple(wrong))
    monkeypatch.setattr(timm_nat.convert.batch, "BACKBONE_CHECK_SIZE", (3, 192, 256))
    assert main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "nat_mini.maskrcnn_coco"]) == 1
    assert "params NO 19,472,070 != 19,472,071 backbone (computed)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mmdet_dinat_tiny_maskrcnn_coco", "transformers_dinat_large_oneformer_cityscapes"])
def test_all_converts_a_published_detector_file_into_a_backbone_folder(case, tmp_path, capsys, offline_caches):
    """The whole detector file (real layout and size, from its published URL / Hub repo cache) becomes a
    folder whose local-dir backbone equals the file loaded directly."""
    from test_downstream import _golden_case, _whole_checkpoint
    from timm_nat.pretrained import load_downstream_registry

    hub_cache, torch_checkpoints = offline_caches
    meta, _ = _golden_case(case)
    entry = next(e for e in load_downstream_registry() if registry_entry_name(e) == meta["model"])
    if "hf_hub_id" in entry:
        path = _hub_snapshot(hub_cache, entry["hf_hub_id"]) / entry["hf_hub_filename"]
    else:
        torch_checkpoints.mkdir(parents=True)
        path = torch_checkpoints / entry["url"].rsplit("/", 1)[1]
    torch.save(_whole_checkpoint(meta), path)
    out = tmp_path / "out"
    assert main(["--all", "--output-dir", str(out), "--only", meta["model"]]) == 0
    log = capsys.readouterr().out
    assert f"0 classes (registry entry {meta['model']})" in log and "max abs diff 0.0" in log
    config = json.loads((out / meta["model"] / "config.json").read_text())
    assert config["model_args"]["out_norms"] is True and config["model_args"]["kernel_size"] == entry["kernel_size"]
    with pytest.raises(ValueError, match="no classifier"):
        timm.create_model(f"local-dir:{out / meta['model']}", pretrained=True)
    converted = timm.create_model(f"local-dir:{out / meta['model']}", pretrained=True, features_only=True).eval()
    source = timm.create_model(meta["model"], pretrained=True, features_only=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    inputs = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert [max_abs_diff(c, s) for c, s in zip(converted(inputs), source(inputs), strict=True)] == [0.0] * 4


def test_a_detector_file_is_split_once_with_one_log_line(tmp_path, caplog):
    """Architecture detection tries many candidates; the whole detector file is split into its backbone
    before that, so the keys left out are counted in one warning (not one per candidate)."""
    from test_downstream import _golden_case, _whole_checkpoint

    meta, _ = _golden_case("mmdet_dinat_tiny_maskrcnn_coco")
    checkpoint = _whole_checkpoint(meta)
    path = tmp_path / "whole.pth"
    torch.save(checkpoint, path)
    others = [k for k in checkpoint["state_dict"] if not k.startswith("backbone.")]
    with caplog.at_level("WARNING"):
        assert main([str(path), "--output-dir", str(tmp_path / "out"), "--model", "dinat_tiny"]) == 0
    lines = [r.getMessage() for r in caplog.records if "not part of the backbone" in r.getMessage()]
    assert len(lines) == 1 and f"{len(others)} keys are not part of the backbone" in lines[0]
