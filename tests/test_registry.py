"""The checkpoint registry (``weights/checkpoints.toml``) is the one source of published facts: the
README's model table, the timm pretrained cfgs (and tags) and the architectures cannot disagree with it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import timm_nat  # noqa: F401  (registers the models)
from timm_nat.pretrained import load_downstream_registry, load_registry, registry_entry_name

from conftest import ARCHITECTURES, assert_pretrained_cfg_is_registry_entry

REPO = Path(__file__).resolve().parents[1]
TABLE_TOOL = REPO / "tools" / "registry_table.py"
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"
ENTRIES = load_registry()


def _readme_table(text: str) -> str:
    assert text.count(START) == 1 and text.count(END) == 1, "README needs exactly one pair of table markers"
    return text[text.index(START) + len(START):text.index(END)].strip("\n") + "\n"


def _table_tool():
    spec = importlib.util.spec_from_file_location("registry_table", TABLE_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_table_markdown = _table_tool().model_table_markdown


def test_readme_table_is_the_registry():
    assert _readme_table((REPO / "README.md").read_text()) == model_table_markdown()


def test_table_has_one_row_per_entry_with_its_facts():
    rows = model_table_markdown().splitlines()[2:]
    assert len(rows) == len(ENTRIES)
    for row, entry in zip(rows, ENTRIES):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`{registry_entry_name(entry)}`"
        assert (entry.get("hf_hub_id") or entry["url"]) in cells[1]
        assert cells[2] == str(entry["num_classes"]) and cells[-1] == entry["license"]


def test_registry_table_check_passes_on_the_repo_readme():
    run = subprocess.run([sys.executable, str(TABLE_TOOL), "--check"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_registry_table_detects_and_fixes_a_stale_readme(tmp_path, capsys):
    tool = _table_tool()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\n| stale | table |\n{END}\n\n## Next\n")
    assert tool.main(["--readme", str(readme), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert tool.main(["--readme", str(readme)]) == 0
    assert tool.main(["--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert _readme_table(text) == model_table_markdown()
    assert text.startswith("# title\n\n") and text.endswith(f"{END}\n\n## Next\n")  # nothing else touched


def test_registry_table_refuses_a_readme_without_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert _table_tool().main(["--readme", str(readme)]) == 1
    assert "markers" in capsys.readouterr().err and readme.read_text() == "# no markers\n"


def test_entries_are_unique_and_have_a_source():
    names = [registry_entry_name(e) for e in ENTRIES]
    assert len(names) == len(set(names)), "duplicate (model, tag)"
    assert all("hf_hub_id" in e or "url" in e for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=registry_entry_name)
def test_pretrained_cfg_is_the_registry_entry(entry):
    assert_pretrained_cfg_is_registry_entry(timm.create_model(registry_entry_name(entry), device="meta"), entry)


def test_every_registry_checkpoint_is_a_pretrained_tag():
    every_entry = ENTRIES + load_downstream_registry()
    assert sorted(registry_entry_name(e) for e in every_entry) == sorted(timm.list_pretrained(ARCHITECTURES))
    assert "dinat_s_large.in22k" in timm.list_pretrained("dinat_s_large*")


def test_default_tag_is_the_first_listed():
    first_tag = {}
    for e in ENTRIES:
        first_tag.setdefault(e["model"], e["tag"])
    assert sorted(first_tag) == ARCHITECTURES
    for arch, tag in first_tag.items():
        assert timm.create_model(arch, device="meta").pretrained_cfg["tag"] == tag


def test_every_registered_architecture_has_weights_and_every_entry_an_architecture():
    assert ARCHITECTURES, "no timm-nat architectures registered"
    assert sorted({e["model"] for e in ENTRIES}) == ARCHITECTURES


def _params_m(arch: str, num_classes: int) -> float:
    model = timm.create_model(arch, num_classes=num_classes, device="meta")
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("entry", [e for e in ENTRIES if "params_m" in e], ids=registry_entry_name)
def test_parameter_count_matches_the_published_one(entry):
    # Exact counts against the original models: test_models.py::test_published_layout_loads_strictly.
    # Published counts are whole millions to 2-3 significant figures, not always rounded (200M for
    # DiNAT-L's 200.9M and 201.1M, 86M for ViT-RPB-B's 86.6M, 28M for DiNAT_s-T's 28.3M).
    count = _params_m(entry["model"], entry["num_classes"])
    tolerance = max(1.0, 0.01 * entry["params_m"])
    assert abs(count - entry["params_m"]) <= tolerance, f"{count:.2f}M vs published {entry['params_m']}M"
