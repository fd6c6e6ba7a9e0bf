"""``--all`` leaves a report (markdown and JSON) whose commands finish the job; downloads fail fast
offline; model cards claim published numbers only for the published file.
"""
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.errors
import pytest
import torch

import timm_nat._offline as _offline
import timm_nat.convert.batch as batch
import timm_nat.convert.sources as sources
from timm_nat.convert import DownloadError, Downloader, Source, main
from timm_nat.convert.card import provenance
from timm_nat.convert.cli import _parser
from timm_nat.pretrained import load_registry, registry_entry_name

from test_convert import offline_caches  # noqa: F401 (a fixture)

ENTRIES = {registry_entry_name(e): e for e in load_registry()}


@pytest.fixture
def offline(offline_caches):
    """Offline, with empty caches of our own; returns the torch hub checkpoint cache."""
    return offline_caches[1]


def _registry_with(monkeypatch, name: str, **changes) -> dict:
    """The registry with one entry changed, as every converter module sees it."""
    entries = tuple(dict(e, **changes) if registry_entry_name(e) == name else e for e in load_registry())
    for module in (batch, sources):
        monkeypatch.setattr(module, "load_registry", lambda: entries)
    return next(e for e in entries if registry_entry_name(e) == name)


def _random_original_checkpoint(golden, arch: str) -> dict:
    """A real-size state dict in the original .pth layout, random values."""
    layout = json.loads((golden / "shapes" / f"orig_{arch}.json").read_text())
    generator = torch.Generator().manual_seed(0)
    return {k: (torch.randn(shape, generator=generator) * 0.02).to(getattr(torch, layout.get("dtypes", {}).get(k, "float32")))
            for k, shape in layout["keys"].items()}


def test_all_offline_writes_report_with_commands_to_finish(tmp_path, capsys, offline, monkeypatch):
    _registry_with(monkeypatch, "nat_mini.in1k", input_size=[3, 96, 96])  # the forward runs at the registry's size
    out = tmp_path / "out"
    assert main(["--all", "--output-dir", str(out), "--only", "nat_mini.in1k", "dinat_s_tiny.in1k"]) == 3
    log = capsys.readouterr().out
    assert log.count("offline (HF_HUB_OFFLINE is set): using the Hub and torch hub caches only") == 1
    assert "forward 1x3x96x96 -> (1, 1000) ok" in log and "forward 1x3x224x224 -> (1, 1000) ok" in log

    report = json.loads((out / "report.json").read_text())
    assert report["written_by"] == "timm-nat-convert" and report["offline"] == "offline (HF_HUB_OFFLINE is set)"
    assert report["totals"] == dict(entries=2, converted=0, offline_checked=2, wrong=0)
    nat_mini, dinat_s_tiny = report["entries"]
    assert nat_mini["status"] == "offline-checked" and nat_mini["checks"]["forward"]["input_size"] == [1, 3, 96, 96]
    assert nat_mini["checks"]["num_params"] == 19984174 and nat_mini["checks"]["params_ok"] is True
    assert [e["source"] for e in nat_mini["download_errors"]] == [
        ENTRIES["nat_mini.in1k"]["hf_hub_id"], ENTRIES["nat_mini.in1k"]["url"]]
    assert all("offline" in e["reason"] for e in nat_mini["download_errors"])
    url = ENTRIES["dinat_s_tiny.in1k"]["url"]
    assert dinat_s_tiny["commands"]["file"] == (
        f"timm-nat-convert /path/to/{url.rsplit('/', 1)[1]} -o {shlex.quote(str(out / 'dinat_s_tiny.in1k'))}")

    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# timm-nat-convert --all report")
    assert "| `nat_mini.in1k` | offline-checked |" in markdown and "## Not downloaded" in markdown
    assert f"--all --output-dir {shlex.quote(str(out))} --only nat_mini.in1k dinat_s_tiny.in1k" in markdown
    assert dinat_s_tiny["commands"]["file"] in markdown


@pytest.mark.slow
def test_report_command_with_the_file_at_hand_converts_it(golden, tmp_path, capsys, offline):
    out = tmp_path / "out"
    assert main(["--all", "--output-dir", str(out), "--only", "nat_mini.in1k"]) == 3
    command = json.loads((out / "report.json").read_text())["entries"][0]["commands"]["file"]
    at_hand = tmp_path / "files" / "nat_mini.pth"  # the published file name, random weights
    at_hand.parent.mkdir()
    torch.save(_random_original_checkpoint(golden, "nat_mini"), at_hand)
    argv = shlex.split(command.replace("/path/to/", f"{at_hand.parent}/"))
    assert argv[0] == "timm-nat-convert" and main(argv[1:]) == 0
    card = (out / "nat_mini.in1k" / "README.md").read_text()
    # named like the published file, but nothing proves it is: no published numbers, the hash stated
    assert "top-1" not in card and "license: mit" not in card and "named like the published nat_mini.pth" in card
    assert f"SHA-256 `{sources.file_sha256(at_hand)}`" in card
    config = json.loads((out / "nat_mini.in1k" / "config.json").read_text())
    assert "description" not in config["pretrained_cfg"] and "hf_hub_id" not in config["pretrained_cfg"]


def test_all_refuses_to_overwrite_a_report_it_did_not_write(tmp_path, capsys, offline):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("# my own notes\n")
    assert main(["--all", "--output-dir", str(tmp_path / "out"), "--only", "nat_mini.in1k"]) == 1
    assert "report.md exists and was not written by timm-nat-convert --all" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.md").read_text() == "# my own notes\n"


def _parsed(command: str, prefix: list):
    """``command`` split as a shell would (comments dropped), its converter prefix checked, the rest
    parsed by the converter's own argparse."""
    argv = shlex.split(command, comments=True)
    assert argv[:len(prefix)] == prefix, command
    return _parser().parse_args(argv[len(prefix):])


def test_report_commands_run_the_converter_as_it_was_run(tmp_path, capsys, offline, monkeypatch):
    """After the README's set-up the converter is ``.venv/bin/python tools/convert.py`` (no
    ``timm-nat-convert`` on PATH): the report's commands say so, and they parse."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["tools/convert.py"])
    monkeypatch.setattr(sys, "executable", str(repo / ".venv" / "bin" / "python"))
    out = tmp_path / "out"
    assert main(["--all", "--output-dir", str(out), "--only", "nat_mini.in1k", "dinat_s_tiny.*"]) == 3
    report = json.loads((out / "report.json").read_text())
    prefix = [".venv/bin/python", "tools/convert.py"]
    network = _parsed(report["finish_with_network"], prefix)
    assert network.all and network.output_dir == out and network.only == ["nat_mini.in1k", "dinat_s_tiny.*"]
    assert report["finish_with_network"] in (out / "report.md").read_text()
    assert "timm-nat-convert /" not in (out / "report.md").read_text()
    for entry in report["entries"]:
        file_args = _parsed(entry["commands"]["file"], prefix)
        assert file_args.output_dir == out / entry["entry"] and file_args.source.startswith("/path/to/")
        one = _parsed(entry["commands"]["network"], prefix)
        assert one.all and one.only == [entry["entry"]]


def _row(name: str, finished: bool) -> batch.EntryReport:
    row = batch.EntryReport(name, [])
    row.commands = {} if finished else dict(network="", file="")
    return row


def test_network_command_names_only_what_is_left(tmp_path):
    rows = [_row("nat_mini.in1k", True), _row("nat_tiny.in1k", False), _row("dinat_s_tiny.in1k", False)]
    command = batch._network_command("timm-nat-convert", tmp_path / "my out", rows, None)
    args = _parsed(command, ["timm-nat-convert"])
    assert args.all and args.output_dir == tmp_path / "my out" and args.only == ["nat_tiny.in1k", "dinat_s_tiny.in1k"]
    # nothing finished: the same selection again, so a whole registry is --all alone (not 25 names)
    assert _parsed(batch._network_command("timm-nat-convert", tmp_path, rows[1:], None), ["timm-nat-convert"]).only is None
    again = batch._network_command("timm-nat-convert", tmp_path, rows[1:], ["nat_*", "dinat_s_tiny.in1k"])
    assert _parsed(again, ["timm-nat-convert"]).only == ["nat_*", "dinat_s_tiny.in1k"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # two converter processes, each limited to 280 s
def test_report_commands_run_as_printed(tmp_path):
    """The checkout's script, run offline from the repository root: the printed network command runs
    (exit 3 again, offline) exactly as printed, with no ``timm-nat-convert`` on PATH."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch-home"), PATH="/usr/bin:/bin",
               HF_HUB_CACHE=str(tmp_path / "hf-cache"), PYTHONPATH=str(repo))
    out = tmp_path / "out"
    first = subprocess.run([sys.executable, "tools/convert.py", "--all", "--output-dir", str(out), "--only",
                            "dinat_s_tiny.in1k"], cwd=repo, env=env, capture_output=True, text=True, timeout=280)
    assert first.returncode == 3, first.stdout + first.stderr
    command = json.loads((out / "report.json").read_text())["finish_with_network"]
    python = Path(sys.executable)
    shown = str(python.relative_to(repo)) if python.is_relative_to(repo) else sys.executable
    assert shlex.split(command)[:3] == [shown, "tools/convert.py", "--all"]
    again = subprocess.run(shlex.split(command), cwd=repo, env=env, capture_output=True, text=True, timeout=280)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "[1/1] dinat_s_tiny.in1k" in again.stdout


def test_downloader_detects_offline_once_by_name_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    resolved, hub_calls = [], []

    def getaddrinfo(host, *args, **kwargs):
        resolved.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    def hf_hub_download(repo_id, filename, local_files_only=False):
        hub_calls.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted offline")

    monkeypatch.setattr(sources.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(sources, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(sources.torch.hub, "download_url_to_file", no_network)
    messages = []
    _offline._lookup_failure.cache_clear()  # the look-up is once per process: start afresh
    downloader = Downloader(log=messages.append)
    for _ in range(3):
        with pytest.raises(DownloadError, match="could not download org/repo: offline .huggingface.co does not resolve"):
            downloader.hub_file("org/repo", "pytorch_model.bin")
        # the URL's own host is looked up and named, not the Hub's
        with pytest.raises(DownloadError, match="could not download https://example.com/w.pth: offline .example.com "
                                                "does not resolve .* and not in "):
            downloader.url_file("https://example.com/w.pth")
    _offline._lookup_failure.cache_clear()  # and leave no patched answer behind
    assert resolved == ["huggingface.co", "example.com"] and hub_calls == [True, True, True]
    assert len(messages) == 2 and all("no download is attempted" in m for m in messages)
    assert "example.com" in messages[1] and "huggingface.co" not in messages[1]
    assert downloader.known_offline.count("does not resolve") == 2


# ----------------------------------------------------------------------------------------------
# Provenance: published numbers only for the published file
# ----------------------------------------------------------------------------------------------

def _source(tmp_path, entry, origin=None) -> Source:
    weights = tmp_path / "nat_mini.pth"
    weights.write_bytes(b"weights")
    return Source("nat_mini.pth", weights, entry=entry, kind="url" if origin else "file", origin=origin)


def test_downloaded_published_file_quotes_published_numbers(tmp_path):
    entry = ENTRIES["nat_mini.in1k"]
    prov = provenance(_source(tmp_path, entry, origin=entry["url"]), "ab" * 32, 7)
    assert prov.published is entry and prov.note == f"downloaded from {entry['url']}"


def test_file_only_named_like_a_published_one_claims_nothing(tmp_path):
    prov = provenance(_source(tmp_path, ENTRIES["nat_mini.in1k"]), "ab" * 32, 7)
    assert prov.published is None and "named like the published nat_mini.pth" in prov.note


def test_registry_hash_decides_for_a_local_file(tmp_path):
    entry = dict(ENTRIES["nat_mini.in1k"], url_sha256="ab" * 32, url_size=7)
    assert provenance(_source(tmp_path, entry), "ab" * 32, 7).published is entry
    mismatch = provenance(_source(tmp_path, entry), "cd" * 32, 7)
    assert mismatch.published is None and "does NOT match the published nat_mini.pth: SHA-256 differs" in mismatch.note


def test_registry_size_mismatch_voids_a_download(tmp_path):
    entry = dict(ENTRIES["nat_mini.in1k"], url_size=8)
    prov = provenance(_source(tmp_path, entry, origin=entry["url"]), "ab" * 32, 7)
    assert prov.published is None and "7 bytes, published 8" in prov.note


def test_card_of_a_downloaded_file_says_published_for_its_source(golden, tmp_path, capsys, offline, monkeypatch):
    entry = _registry_with(monkeypatch, "nat_mini.in1k")
    offline.mkdir(parents=True)
    torch.save(_random_original_checkpoint(golden, "nat_mini"), offline / "nat_mini.pth")  # as if downloaded
    out = tmp_path / "converted"
    assert main([entry["url"], "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"**Published for `{entry['url']}`:** ImageNet-1k top-1 {entry['top1']}%" in card
    assert f"SHA-256 `{sources.file_sha256(offline / 'nat_mini.pth')}`" in card and "license: mit" in card


def test_downloaded_file_of_other_sizes_claims_nothing(golden, tmp_path, capsys, offline):
    entry = ENTRIES["nat_mini.in1k"]
    offline.mkdir(parents=True)
    (offline / "nat_mini.pth").symlink_to(golden / "orig" / "nat_test_tiny.pth")  # in the cache, not NAT-Mini
    out = tmp_path / "converted"
    assert main([entry["url"], "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "top-1" not in card and "not as the published nat_mini, so no published numbers are claimed" in card
