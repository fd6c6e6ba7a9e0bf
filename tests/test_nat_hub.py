"""``timm.create_model('<arch>.<tag>', pretrained=True)`` resolves the shi-labs Hub repo named in the
registry, loads its transformers-layout ``pytorch_model.bin`` from the Hub cache (offline), and
fails with an actionable message when the weights cannot be had (for a file, in every family)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.models.nat import checkpoint_filter_fn
from timm_nat.pretrained import load_registry

from conftest import assert_pretrained_cfg_is_registry_entry, max_abs_diff

MODEL = "dinat_mini.in1k"
HUB_ID = "shi-labs/dinat-mini-in1k-224"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id
INPUT_SIZE = (1, 3, 64, 64)

# run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import time
_CREATE_AND_RUN = textwrap.dedent("""
    import sys, torch, timm, timm_nat
    model = timm.create_model(sys.argv[1], pretrained=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        torch.save(model(torch.randn(*eval(sys.argv[3]))), sys.argv[2])
""")


def _random_transformers_checkpoint(golden) -> dict:
    """A real-size state dict in the Hub layout of dinat-mini, random values, from its shapes file."""
    layout = json.loads((golden / "shapes" / "dinat-mini-in1k-224.json").read_text())
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in layout["keys"].items()}


def _make_hub_cache(root, hub_id: str, checkpoint: dict):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/file}."""
    repo_dir = root / ("models--" + hub_id.replace("/", "--"))
    snapshot_dir = repo_dir / "snapshots" / SNAPSHOT
    snapshot_dir.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    torch.save(checkpoint, snapshot_dir / "pytorch_model.bin")


def _run_offline(hub_cache, output_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    return subprocess.run(
        [sys.executable, "-c", _CREATE_AND_RUN, MODEL, str(output_path), repr(INPUT_SIZE)],
        env=env, capture_output=True, text=True, timeout=300)


def test_registry_names_the_hub_repo():
    model = timm.create_model(MODEL, device="meta")
    assert (model.pretrained_cfg["hf_hub_id"], model.pretrained_cfg["hf_hub_filename"]) == (HUB_ID, "pytorch_model.bin")
    entry = next(e for e in load_registry() if f"{e['model']}.{e['tag']}" == MODEL)
    assert_pretrained_cfg_is_registry_entry(model, entry)


@pytest.mark.timeout(400)  # its subprocess has 300 s
def test_pretrained_loads_offline_from_hub_cache(golden, tmp_path):
    checkpoint = _random_transformers_checkpoint(golden)
    _make_hub_cache(tmp_path / "hub", HUB_ID, checkpoint)

    result = _run_offline(tmp_path / "hub", tmp_path / "logits.pt")
    assert result.returncode == 0, result.stderr

    direct = timm.create_model("dinat_mini").eval()
    direct.load_state_dict(checkpoint_filter_fn(checkpoint, direct))
    torch.manual_seed(0)
    with torch.no_grad():
        expected = direct(torch.randn(*INPUT_SIZE))
    from_hub = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert from_hub.shape == (1, 1000)
    assert max_abs_diff(from_hub, expected) <= 1e-6


@pytest.mark.timeout(400)  # its subprocess has 300 s
def test_pretrained_without_cache_explains_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run_offline(tmp_path / "empty", tmp_path / "unused.pt")
    assert result.returncode != 0
    message = result.stderr.splitlines()[-1]
    assert "Could not load pretrained weights for 'dinat_mini.in1k'" in message
    assert HUB_ID in message
    assert "HF_HUB_OFFLINE" in message
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth" in message


@pytest.mark.parametrize("arch", ["nat_mini", "dinat_s_tiny", "vitrpb_small"])
def test_missing_local_file_explains_what_to_do(tmp_path, arch):
    missing = tmp_path / "nowhere" / "pytorch_model.bin"
    with pytest.raises(RuntimeError, match="Could not load pretrained weights") as info:
        timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    assert str(missing) in str(info.value)
    assert arch in str(info.value) and "pretrained_cfg_overlay" in str(info.value)
