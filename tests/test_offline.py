"""Offline ``pretrained=True``: detected once by a name look-up, fails in seconds with what to do, and
loads a Hub-cached file without retries. No network is touched: the look-up is replaced by one that
fails (or hangs), and the Hub cache is a temporary folder."""
import socket
import threading
import time
import urllib.request

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_nat  # noqa: F401  (registers the models)
from timm_nat import _offline

from conftest import golden_arch_and_kwargs

HUB_ID = "shi-labs/dinat-mini-in1k-224"  # the registry's repo for dinat_mini.in1k
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
FAST_S = 5.0  # the bound for failing offline (huggingface_hub's retries took ~55 s)


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Name look-ups fail, Hub offline mode is off, no proxy, an empty Hub cache; counts look-ups."""
    lookups = []

    def failing_getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing_getaddrinfo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in _offline._PROXY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    _offline._lookup_failure.cache_clear()
    yield lookups
    _offline._lookup_failure.cache_clear()


def _cache_in_hub_layout(hub_cache, hub_id: str, file) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    repo_dir = hub_cache / ("models--" + hub_id.replace("/", "--"))
    (repo_dir / "snapshots" / SNAPSHOT).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    (repo_dir / "snapshots" / SNAPSHOT / file.name).symlink_to(file)


def _offline_error(**kwargs) -> tuple:
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="Could not load pretrained weights for 'dinat_mini.in1k'") as info:
        timm.create_model("dinat_mini", pretrained=True, **kwargs)
    return str(info.value), time.perf_counter() - start


def test_offline_pretrained_fails_fast_saying_what_to_do(no_network):
    message, seconds = _offline_error()
    assert seconds < FAST_S, f"offline create_model took {seconds:.1f} s"
    assert "no network, huggingface.co does not resolve" in message and HUB_ID in message
    assert "set HF_HUB_OFFLINE=1" in message
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert "timm.create_model('local-dir:DIR', pretrained=True)" in message
    assert "unset" not in message  # HF_HUB_OFFLINE is not set: nothing to unset


def test_offline_is_detected_once_per_process(no_network):
    _offline_error()
    _offline_error()
    assert no_network == ["huggingface.co"]


def test_hub_offline_mode_message_and_no_lookup(no_network, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message, seconds = _offline_error()
    assert seconds < FAST_S
    assert "offline mode (HF_HUB_OFFLINE is set); not in the local Hub cache either" in message
    assert "HF_HUB_OFFLINE is set, so only the local Hub cache was searched" in message
    assert "set HF_HUB_OFFLINE=1" not in message  # already set
    assert no_network == []  # the user said offline: nothing to probe


def test_lookup_that_hangs_times_out(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: release.wait(30))
    monkeypatch.setattr(_offline, "LOOKUP_TIMEOUT_S", 0.2)
    _offline._lookup_failure.cache_clear()
    try:
        start = time.perf_counter()
        reason = _offline._lookup_failure("huggingface.co")
        assert time.perf_counter() - start < 2.0
        assert reason == "huggingface.co did not resolve within 0.2 s"
    finally:
        release.set()
        _offline._lookup_failure.cache_clear()


def test_a_proxy_resolves_names_so_no_lookup(no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert _offline.hub_unreachable_reason() is None
    assert no_network == []


def test_offline_loads_the_hub_cached_file_without_retries(no_network, golden, tiny_model_kwargs, tmp_path):
    """The golden tiny DiNAT checkpoint, cached under the registry's Hub repo, loads through the plain
    ``pretrained=True`` path with no network and reproduces the legacy stack's logits."""
    folder = golden / "hf" / "dinat_test_tiny"
    _cache_in_hub_layout(tmp_path / "hub", HUB_ID, folder / "pytorch_model.bin")
    start = time.perf_counter()
    model = timm.create_model(
        "dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(num_classes=10), num_classes=10,
        **tiny_model_kwargs("dinat_test_tiny")).eval()
    assert time.perf_counter() - start < FAST_S
    assert model.pretrained_cfg["file"].endswith(f"snapshots/{SNAPSHOT}/pytorch_model.bin")
    golden_outputs = load_file(folder / "golden.safetensors")
    with torch.no_grad():
        diff = (model(golden_outputs["input0"]) - golden_outputs["logits0"]).abs().max().item()
    assert diff <= 1e-4, f"max abs diff vs golden logits {diff:.3e}"


# --- URL-hosted weights (DiNAT_s, isotropic, ViT-RPB, 22k): torch hub's checkpoint cache -------------

URL_ARCH = "dinat_s_tiny"  # its registry entry has a shi-labs.com URL and no Hub repo


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """An empty torch hub cache of our own; any download attempt fails the test."""
    def download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(urllib.request, "urlopen", download)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _url_error(**kwargs) -> tuple:
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"Could not load pretrained weights for '{URL_ARCH}.in1k'") as info:
        timm.create_model(URL_ARCH, pretrained=True, **kwargs)
    return str(info.value), time.perf_counter() - start


def test_url_weights_in_hub_offline_mode_fail_fast_without_a_download(no_network, no_download, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message, seconds = _url_error()
    url = timm.models.get_pretrained_cfg(URL_ARCH).url
    cached = no_download / url.rsplit("/", 1)[1]
    assert seconds < FAST_S
    assert f"offline mode (HF_HUB_OFFLINE is set); not in torch hub's checkpoint cache ({cached} does not exist)" in message
    assert f"To fix: HF_HUB_OFFLINE is set, so only torch hub's checkpoint cache ({no_download}) was searched" in message
    assert f"or download {url} elsewhere and copy it to {cached}" in message
    assert "To fix: or" not in message and "; (" not in message
    assert no_network == []


def test_url_weights_check_the_urls_own_host(no_network, no_download):
    message, seconds = _url_error()
    assert seconds < FAST_S
    assert "no network, shi-labs.com does not resolve" in message and "huggingface.co" not in message
    assert no_network == ["shi-labs.com"]


def test_url_weights_load_from_torch_hubs_cache_offline(no_network, no_download, golden, monkeypatch):
    """The golden tiny DiNAT_s checkpoint, cached under the entry's file name, loads through the plain
    ``pretrained=True`` path in offline mode and reproduces the original code's logits."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    url = timm.models.get_pretrained_cfg(URL_ARCH).url
    no_download.mkdir(parents=True)
    (no_download / url.rsplit("/", 1)[1]).symlink_to(golden / "orig" / "dinat_s_test_tiny.pth")
    arch, kwargs = golden_arch_and_kwargs("dinat_s_test_tiny")
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(num_classes=10),
                              num_classes=10, **kwargs).eval()
    golden_outputs = load_file(golden / "orig" / "dinat_s_test_tiny.golden.safetensors")
    with torch.no_grad():
        diff = (model(golden_outputs["input0"]) - golden_outputs["logits0"]).abs().max().item()
    assert diff <= 1e-4, f"max abs diff vs golden logits {diff:.3e}"


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    message, _ = _url_error(pretrained_cfg_overlay=dict(file=str(missing)))
    assert f"from the local file '{missing}': FileNotFoundError: no such file '{missing}'." in message
    assert "To fix: pass pretrained_cfg_overlay=dict(file=" in message
