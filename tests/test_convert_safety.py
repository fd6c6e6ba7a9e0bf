"""timm-nat-convert with hostile or unlucky input: it never deletes what it did not write, never
lets an untrusted config.json steer timm, never casts or "verifies" bad tensors, and says what is
wrong in one line.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm_nat.convert.conversion as conversion
import timm_nat.convert.output as output
from timm_nat.convert import FAMILIES, main
from timm_nat.models import dinat_s, isotropic, nat

from test_convert import OUTPUT_FILES, _fail, offline_caches  # noqa: F401 (a fixture)


@pytest.fixture
def converted(golden, tmp_path):
    """A folder this converter wrote (NAT test tiny), and its source."""
    source, out = golden / "hf" / "nat_test_tiny", tmp_path / "converted"
    assert main([str(source), "-o", str(out)]) == 0
    return source, out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------
# Outputs: owned, never overlapping the source, swapped atomically, stale partials cleaned
# ----------------------------------------------------------------------------------------------

def test_force_refuses_a_users_folder_with_a_config_json(golden, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"architecture": "nat_mini"}')
    (project / "train.py").write_text("print('years of work')")
    before = _snapshot(project)
    err = _fail([golden / "hf" / "nat_test_tiny", "-o", project, "--force"], capsys)
    assert "not a converted model folder (no timm-nat-convert.json" in err and "not deleting it" in err
    assert _snapshot(project) == before


def test_output_is_marked_with_a_manifest_of_its_files(converted):
    _, out = converted
    manifest = json.loads((out / "timm-nat-convert.json").read_text())
    assert manifest["written_by"] == "timm-nat-convert" and set(manifest["files"]) == OUTPUT_FILES - {"timm-nat-convert.json"}
    assert manifest["source"] == "nat_test_tiny" and len(manifest["source_sha256"]) == 64


def test_converting_a_folder_onto_itself_is_refused(converted, capsys):
    _, out = converted
    before = _snapshot(out)
    err = _fail([out, "-o", out, "--force"], capsys)
    assert f"output {out} is the source" in err
    assert _snapshot(out) == before


def test_output_inside_the_source_is_refused(golden, tmp_path, capsys):
    source = tmp_path / "hf_folder"
    shutil.copytree(golden / "hf" / "nat_test_tiny", source)
    err = _fail([source, "-o", source / "timm"], capsys)
    assert "is inside the source" in err and not (source / "timm").exists()


def test_output_holding_the_source_is_refused(converted, capsys):
    _, out = converted
    before = _snapshot(out)
    err = _fail([out / "model.safetensors", "-o", out, "--force", "--model", "nat_mini"], capsys)
    assert "holds the source" in err
    assert _snapshot(out) == before


def test_failed_swap_keeps_the_old_output(converted, monkeypatch, capsys):
    source, out = converted
    before = _snapshot(out)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".converted.partial-"):
            raise OSError("disk on fire")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    err = _fail([source, "-o", out, "--force"], capsys)
    assert "disk on fire" in err and "the old one is unchanged" in err
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["converted"]


def test_failed_verification_keeps_the_old_output(converted, monkeypatch, capsys):
    source, out = converted
    before = _snapshot(out)

    def broken_verify(*args):
        raise conversion.ConversionError("verification failed: simulated")

    monkeypatch.setattr(conversion, "_verify", broken_verify)
    assert "simulated" in _fail([source, "-o", out, "--force"], capsys)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["converted"]


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_stale_partial_folders_of_dead_runs_are_cleaned(converted, capsys):
    source, out = converted
    dead, alive = _dead_pid(), os.getppid()
    ours_dead, ours_alive = (out.parent / f".converted.partial-{p}" for p in (dead, alive))
    foreign = out.parent / f".converted.old-{dead}"  # a dead pid too: only the missing manifest protects it
    for folder in (ours_dead, ours_alive):
        folder.mkdir()
        output.write_manifest(folder, [], state="partial")
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"not ours")
    assert main([str(source), "-o", str(out), "--force"]) == 0
    assert f"removed {ours_dead}" in capsys.readouterr().out
    assert not ours_dead.exists() and ours_alive.is_dir() and (foreign / "data.bin").is_file()


def test_output_set_aside_by_a_killed_run_is_restored(converted, capsys):
    _, out = converted
    before = _snapshot(out)
    aside = out.parent / f".converted.old-{_dead_pid()}"
    out.rename(aside)  # killed between "old aside" and "new in"
    output.clean_stale(out)
    assert _snapshot(out) == before and not aside.exists()


def test_restored_output_is_not_replaced_without_force(converted, capsys):
    """The output set aside by a dead run comes back, and without --force it is refused, not deleted."""
    source, out = converted
    before = _snapshot(out)
    out.rename(out.parent / f".converted.old-{_dead_pid()}")
    assert "already exists; pass --force" in _fail([source, "-o", out], capsys)
    assert _snapshot(out) == before


def test_folder_that_appears_during_the_run_is_not_deleted(golden, tmp_path, monkeypatch, capsys):
    """The output is checked again just before the swap: a folder made meanwhile stays untouched."""
    out = tmp_path / "late"
    verify = conversion._verify

    def verify_then_someone_writes_the_output(*args):
        diffs = verify(*args)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return diffs

    monkeypatch.setattr(conversion, "_verify", verify_then_someone_writes_the_output)
    assert "already exists; pass --force" in _fail([golden / "hf" / "nat_test_tiny", "-o", out], capsys)
    assert _snapshot(out) == {"notes.txt": b"mine"}


# ----------------------------------------------------------------------------------------------
# Untrusted config.json and --model-args: architecture hyper-parameters only
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def listening_port():
    """A local TCP port that records whether anything connected (non-blocking accept)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _connected(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("model_args, refused", [
    ({"pretrained_cfg_overlay": {"url": "http://127.0.0.1:{port}/x"}}, "'pretrained_cfg_overlay'"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "'pretrained_cfg_overlay'"),
    ({"checkpoint_path": "/etc/passwd"}, "'checkpoint_path'"),
    ({"pretrained": True, "num_classes": 10}, "'pretrained'"),
    ({"kernel_size": {"file": "/etc/passwd"}}, 'kernel_size={"file": "/etc/passwd"}'),
])
def test_malicious_timm_config_is_refused_and_nothing_fetched(converted, tmp_path, capsys, listening_port,
                                                              model_args, refused):
    _, out = converted
    model_args = json.loads(json.dumps(model_args).replace("{port}", str(listening_port.getsockname()[1])))
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(out / "model.safetensors", evil / "model.safetensors")
    (evil / "config.json").write_text(json.dumps({"architecture": "nat_mini", "model_args": model_args}))
    err = _fail([evil, "-o", tmp_path / "out"], capsys)
    assert "config.json" in err and refused in err and "refused" in err
    assert not _connected(listening_port) and not (tmp_path / "out").exists()


def test_malicious_model_args_on_the_command_line_are_refused(golden, tmp_path, capsys, listening_port):
    url = f"http://127.0.0.1:{listening_port.getsockname()[1]}/x"
    args = json.dumps({"pretrained_cfg_overlay": {"url": url}})
    err = _fail([golden / "orig" / "nat_test_tiny.pth", "-o", tmp_path / "out", "--model", "nat_mini",
                 "--model-args", args], capsys)
    assert "--model-args sets 'pretrained_cfg_overlay'" in err and "depths" in err  # lists what is allowed
    assert not _connected(listening_port)


def test_the_converters_families_are_the_family_modules_declarations():
    assert [FAMILIES[name] for name in ("nat", "dinat_s", "isotropic")] == [nat.FAMILY, dinat_s.FAMILY, isotropic.FAMILY]
    assert FAMILIES["nat"].remap_checkpoint is nat.remap_checkpoint
    assert FAMILIES["nat"].checkpoint_filter_fn is nat.checkpoint_filter_fn
    assert FAMILIES["dinat_s"].remap_checkpoint is dinat_s.remap_checkpoint
    assert FAMILIES["isotropic"].remap_checkpoint is isotropic.remap_checkpoint
    assert {"dinat_mini", "dinat_s_tiny", "vitrpb_base"} <= {a for f in FAMILIES.values() for a in f.architectures}


# ----------------------------------------------------------------------------------------------
# Bad tensors and clear messages
# ----------------------------------------------------------------------------------------------

def _damaged(golden, tmp_path, damage) -> Path:
    state_dict = torch.load(golden / "orig" / "nat_test_tiny.pth", weights_only=True)
    damage(state_dict)
    path = tmp_path / "damaged.pth"
    torch.save(state_dict, path)
    return path


def test_integer_checkpoint_tensor_is_refused_not_cast(golden, tmp_path, capsys):
    def to_int8(sd):
        sd["levels.1.blocks.0.attn.qkv.weight"] = (sd["levels.1.blocks.0.attn.qkv.weight"] * 100).to(torch.int8)

    path = _damaged(golden, tmp_path, to_int8)
    err = _fail([path, "-o", tmp_path / "out", "--model", "nat_mini"], capsys)
    assert "stages.1.blocks.0.attn.qkv.weight is torch.int8" in err and "refused" in err
    assert "verified" not in err and not (tmp_path / "out").exists()


def test_non_finite_weights_are_reported_as_such(golden, tmp_path, capsys):
    def poison(sd):
        sd["norm.weight"][0] = float("nan")
        sd["levels.0.blocks.0.mlp.fc1.bias"][:2] = float("inf")

    err = _fail([_damaged(golden, tmp_path, poison), "-o", tmp_path / "out", "--model", "nat_mini"], capsys)
    assert "non-finite weights (NaN/Inf) in 2 tensor(s)" in err and "norm.weight (1 NaN, 0 Inf" in err
    assert "stages.0.blocks.0.mlp.fc1.bias (0 NaN, 2 Inf" in err and "verification" not in err


@pytest.mark.parametrize("key", ["levels.0.blocks.0.attn.rpb", "patch_embed.proj.1.weight", "levels.1.blocks.1.mlp.fc1.weight"])
def test_one_missing_key_is_counted_as_one(golden, tmp_path, capsys, key):
    err = _fail([_damaged(golden, tmp_path, lambda sd: sd.pop(key)), "-o", tmp_path / "out", "--model", "nat_mini"],
                capsys)
    timm_key = key.replace("levels.", "stages.")
    assert f"1 missing key(s): {timm_key}" in err, err


def test_unexpected_errors_are_one_line_unless_debug(golden, tmp_path, capsys, monkeypatch):
    def boom(path):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(conversion, "read_state_dict", boom)
    argv = [golden / "orig" / "nat_test_tiny.pth", "-o", tmp_path / "out"]
    err = _fail(argv, capsys)
    assert "unexpected ZeroDivisionError: simulated bug (rerun with --debug" in err
    assert main([str(a) for a in argv] + ["--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_missing_local_file_says_it_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _fail(["./weights/model", "-o", "out"], capsys)
    assert "no such file or folder: ./weights/model (the file does not exist" in err and "download" not in err


def test_missing_path_shaped_like_a_repo_id_says_both(tmp_path, capsys, monkeypatch, offline_caches):
    monkeypatch.chdir(tmp_path)
    err = _fail(["weights/model", "-o", "out"], capsys)
    assert "could not download weights/model: offline" in err and "no local file or folder weights/model" in err


def test_a_converted_folder_reconverts_to_the_same_weights(converted, tmp_path):
    _, out = converted
    again = tmp_path / "again"
    assert main([str(out), "-o", str(again)]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_int8_safetensors_file_is_refused(converted, tmp_path, capsys):
    _, out = converted
    tensors = load_file(out / "model.safetensors")
    tensors["head.fc.weight"] = tensors["head.fc.weight"].to(torch.int8)
    save_file(tensors, tmp_path / "quantised.safetensors")
    err = _fail([tmp_path / "quantised.safetensors", "-o", tmp_path / "q", "--model", "nat_mini",
                 "--model-args", json.dumps(json.loads((out / "config.json").read_text())["model_args"])], capsys)
    assert "head.fc.weight is torch.int8" in err
