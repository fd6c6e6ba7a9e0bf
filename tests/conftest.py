"""Shared fixtures: the golden reference data (tests/golden, see its README)."""
import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """Root of the golden reference data; fails (never skips) when it is missing."""
    if not (GOLDEN_DIR / "README.md").is_file():
        pytest.fail(f"golden reference data not found at {GOLDEN_DIR} (part of the repository: is the checkout complete?)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def tiny_model_kwargs(golden):
    """``tiny_model_kwargs(name)``: timm arch kwargs of a golden tiny checkpoint (from its config.json)."""
    return lambda name: _kwargs_from_transformers_config(golden / "hf" / name / "config.json")


def _kwargs_from_transformers_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    kwargs = dict(
        embed_dim=config["embed_dim"],
        depths=tuple(config["depths"]),
        num_heads=tuple(config["num_heads"]),
        kernel_size=config["kernel_size"],
        mlp_ratio=config["mlp_ratio"],
        ls_init_value=config["layer_scale_init_value"] or None,  # transformers: 0.0 means none
    )
    if "dilations" in config:
        kwargs["dilations"] = tuple(tuple(d) for d in config["dilations"])
    return kwargs
