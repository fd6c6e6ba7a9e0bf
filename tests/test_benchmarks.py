"""The benchmark tool (``benchmarks/``, outside the package): its timer, its memory count, and a tiny run
whose ratios must be the ones its own columns imply."""
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from benchmarks.common import median_seconds, peak_tensor_bytes
from benchmarks import benchmark
from benchmarks.benchmark import measure_model, run_one_cell

REPO = Path(__file__).resolve().parents[1]


def test_median_seconds_is_the_median_of_the_timed_calls_and_counts_synchronize():
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # three timed calls: 5, 1 and 3 seconds
    calls, syncs = [], []
    median = median_seconds(lambda: calls.append(1), repeats=3, warmup=2, clock=lambda: next(ticks),
                            synchronize=lambda: syncs.append(len(calls)))
    assert median == 3.0
    assert len(calls) == 5 and syncs == [1, 2, 3, 4, 5]  # each call synchronized before its stop time is read


def test_median_seconds_refuses_zero_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        median_seconds(lambda: None, repeats=0)


def test_peak_tensor_bytes_replays_allocations_in_order():
    def allocate():
        a = torch.empty(256, 1024)  # 1 MiB
        b = torch.empty(512, 1024)  # 2 MiB: 3 MiB live
        del a
        c = torch.empty(128, 1024)  # 0.5 MiB after 1 MiB was freed: the peak stays 3 MiB
        return b, c

    assert peak_tensor_bytes(allocate, "cpu") == 3 * 2**20


def test_the_wheel_ships_no_benchmark():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "timm-nat-benchmark" not in scripts and importlib.util.find_spec("timm_nat.benchmark") is None


def test_model_cell_measures_images_per_second():
    cell = measure_model("nat_mini", "infer", 2, 64, "cpu", "fp32", "tiled", repeats=1)
    assert set(cell) == {"img_s"} and cell["img_s"] > 0


def test_unknown_cell_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown cell kind 'gpu'"):
        run_one_cell(dict(kind="gpu"))


def test_ops_table_ratios_are_time_over_the_named_baseline(monkeypatch, capsys):
    measured = {"sdpa-49": {"fwd": 2.0, "fwd+bwd": 5.0, "bwd": 2.5, "fwd MB": 1.0, "fwd+bwd MB": 2.0},
                "tiled": {"fwd": 3.0, "fwd+bwd": 9.0, "bwd": 5.0, "fwd MB": 1.5, "fwd+bwd MB": 4.0}}
    monkeypatch.setattr(benchmark, "_run_cells",
                        lambda args, specs: {benchmark._key(s): dict(measured[s["backend"]]) for s in specs})
    args = benchmark._parser().parse_args(["ops", "--shapes", "tiny", "--backends", "tiled", "sdpa-49"])
    results = benchmark.ops_table(args)
    out = capsys.readouterr().out
    assert "x = time over sdpa-49's at the same shape" in out and "target" not in out
    rows = [line.split()[2:] for line in out.splitlines() if line.startswith("tiny ")]
    assert rows == [["sdpa-49", "2.00", "5.00", "2.50", "1.00", "2.00", "-", "-"],  # the baseline's row first
                    ["tiled", "3.00", "9.00", "5.00", "1.50", "4.00", "1.50", "2.00"]]  # bwd x: 5.0 / 2.5, as measured
    assert results["tiny", "tiled"]["bwd"] == 5.0


def test_ops_command_runs_a_tiny_cell():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "ops", "--shapes", "tiny",
                          "--backends", "tiled", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    rows = [line.split()[2:] for line in run.stdout.splitlines() if line.startswith("tiny ")]
    assert [row[0] for row in rows] == ["sdpa-49", "tiled"]  # --baseline sdpa-49 is added to --backends
    for row in rows:  # fwd, fwd+bwd and the backward alone (over a kept graph) were measured
        fwd, fwd_bwd, bwd = map(float, row[1:4])
        assert fwd >= 0 and fwd_bwd > 0 and bwd > 0


def test_profile_cell_counts_every_linear_of_a_training_step():
    import timm
    cell = benchmark.profile_model("nat_mini", "train", 2, 64, "cpu", "fp32", "auto", repeats=2, top=10_000)
    linears = sum(isinstance(m, torch.nn.Linear) for m in timm.create_model("nat_mini").modules())
    calls = {name: count for name, _, count in cell["ops"]}
    assert calls["aten::linear"] == linears  # one forward per step, every Linear once
    times = [ms for _, ms, _ in cell["ops"]]
    assert times == sorted(times, reverse=True) and min(times) >= 0
    assert cell["other_ms"] == pytest.approx(0, abs=1e-9)  # nothing left out of 10,000 ops
    assert sum(times) == pytest.approx(cell["total_ms"])


def test_profile_table_prints_each_op_as_its_share_of_the_total(monkeypatch, capsys):
    cell = dict(total_ms=40.0, ops=[["aten::mm", 20.0, 12.0], ["timm_nat_na2d::backward", 10.0, 4.0]], other_ms=10.0)
    monkeypatch.setattr(benchmark, "_run_cells", lambda args, specs: {benchmark._key(s): cell for s in specs})
    benchmark.profile_table(benchmark._parser().parse_args(["profile", "--models", "nat_mini", "--top", "2"]))
    out = capsys.readouterr().out
    assert "nat_mini, train b8, fp32, attention cpu_fused: 40.0 ms" in out
    rows = {line[:48].strip(): line[48:].split() for line in out.splitlines()[3:] if line.strip()}
    assert rows == {"aten::mm": ["20.00", "50.0", "12.0"], "timm_nat_na2d::backward": ["10.00", "25.0", "4.0"],
                    "(all other ops)": ["10.00", "25.0"]}
