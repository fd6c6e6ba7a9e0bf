"""tools/gpu_check.py without a GPU: its sizing (which flex kernels each step compiles) and its
budget / stop-early logic. The check itself runs on a CUDA machine (its --dry-run on CPU)."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def real_keys(gpu_check):
    return gpu_check.step_keys(gpu_check.REAL)


def test_training_step_kernels_are_dinat_minis_stage_maps(gpu_check, real_keys):
    """dinat_mini at 224 px: one flex kernel per (stage map, dilation) it uses (dilations 1 and
    8, 4, 2 in stages 1-3, 1 in stage 4), and the eager speed cells reuse them all."""
    keys = real_keys
    train = {(k[0], k[1], k[3]) for k in keys["dinat_mini train AMP"]}
    assert train == {(56, 56, (1, 1)), (56, 56, (8, 8)), (28, 28, (1, 1)), (28, 28, (4, 4)),
                     (14, 14, (1, 1)), (14, 14, (2, 2)), (7, 7, (1, 1))}
    assert all(k[4] == 128 and k[5] and k[7] for k in keys["dinat_mini train AMP"])  # batch, grad, RPB
    assert keys["model speed eager"] <= keys["dinat_mini train AMP"]
    detection = {(k[0], k[1]) for k in keys["detection backbone"]}
    assert detection == {(200, 304), (100, 152), (50, 76), (25, 38), (136, 208), (68, 104), (34, 52), (17, 26)}


def test_plan_charges_each_kernel_once(gpu_check, real_keys):
    rows = {name: (forward, training, compiles)
            for name, forward, training, compiles, _ in gpu_check.plan(gpu_check.REAL, real_keys)}
    assert rows["model speed eager"] == (0, 0, 0)
    assert rows["op speed"] == (0, 1, 0)  # only stage-1 flex without RPB is new
    assert rows["golden op fp32"] == (0, len(gpu_check.FLEX_FP32_CASES), 0)
    assert rows["model speed compiled"][2] == 2


def test_budget_skips_and_a_failed_check_stops(gpu_check, monkeypatch):
    ran = []

    def step(name, fail=False):
        def run(sizes, table):
            ran.append(name)
            if fail:
                raise gpu_check.CheckFailed(f"{name} is wrong")
            return f"{name} fine"
        return run

    monkeypatch.setattr(gpu_check, "STEPS", [("env", step("env")), ("golden op fp32", step("golden op fp32")),
                                             ("op speed", step("op speed")), ("golden models", step("golden models", True)),
                                             ("model speed eager", step("model speed eager"))])
    estimates = {"env": 1.0, "golden op fp32": 1000.0, "op speed": 1.0, "golden models": 1.0, "model speed eager": 1.0}
    results, _ = gpu_check.run(gpu_check.DRY, budget=100.0, estimates=estimates)
    assert ran == ["env", "op speed", "golden models"]
    status = {r.step: (r.status, r.summary) for r in results}
    assert status["golden op fp32"] == ("skipped", "budget: needs ~1000 s, 100 s left")
    assert status["golden models"] == ("FAILED", "golden models is wrong")
    assert status["model speed eager"] == ("skipped", "an earlier check failed")
