"""Rewrite the README's model table from the checkpoint registry (``weights/checkpoints.toml``), and
docs/models.md's detection / segmentation backbone table from ``weights/downstream.toml``.

    .venv/bin/python tools/registry_table.py           # rewrite the sections between the markers
    .venv/bin/python tools/registry_table.py --check   # only compare; exit 1 if either is stale

The tables are :func:`model_table_markdown` and :func:`downstream_table_markdown` of the
registries, so the documents and the registries cannot disagree.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from timm_nat.pretrained import load_downstream_registry, load_registry, registry_entry_name, task_metrics

START_MARKER = "<!-- model-table:start -->"
END_MARKER = "<!-- model-table:end -->"
DOWNSTREAM_MARKERS = ("<!-- downstream-table:start -->", "<!-- downstream-table:end -->")
DEFAULT_README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_MODELS_DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _published(value: Any) -> str:
    """A published number as published (``20.0`` -> ``20``), or ``-`` when none was published."""
    return "-" if value is None else f"{value:g}"


def _weights_link(entry: Dict[str, Any]) -> str:
    """Markdown link to an entry's weights: its Hub repo, else its original ``.pth`` URL."""
    if "hf_hub_id" in entry:
        return f"[{entry['hf_hub_id']}](https://huggingface.co/{entry['hf_hub_id']})"
    return f"[{entry['url'].rsplit('/', 1)[-1]}]({entry['url']}) (original .pth)"


def model_table_markdown(entries: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """Markdown table of every registry entry (the README's model table is exactly this)."""
    entries = load_registry() if entries is None else entries
    rows = [
        "| model | weights | classes | input | crop | top-1 (%) | params (M) | GFLOPs | license |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for e in entries:
        _, height, width = e["input_size"]
        rows.append(
            f"| `{registry_entry_name(e)}` | {_weights_link(e)} | {e['num_classes']} | {height}x{width} "
            f"| {_published(e['crop_pct'])} | {_published(e.get('top1'))} | {_published(e.get('params_m'))} "
            f"| {_published(e.get('gflops'))} | {e['license']} |")
    return "\n".join(rows) + "\n"


def downstream_table_markdown(entries: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """Markdown table of every detection / segmentation backbone entry (docs/models.md's is exactly this)."""
    entries = load_downstream_registry() if entries is None else entries
    rows = [
        "| model | weights (layout) | method, dataset | metrics | kernel | test input | backbone params |",
        "|---|---|---|---|--:|--:|--:|",
    ]
    for e in entries:
        _, height, width = e["eval_input_size"]
        rows.append(
            f"| `{registry_entry_name(e)}` | {_weights_link(e).replace(' (original .pth)', '')} ({e['layout']}) "
            f"| {e['method']}, {e['dataset']} | {task_metrics(e)} | {e['kernel_size']} | {height}x{width} "
            f"| {e['backbone_params']:,} |")
    return "\n".join(rows) + "\n"


def with_table(readme: str, table: str, markers=(START_MARKER, END_MARKER)) -> str:
    """``readme`` with everything between the ``markers`` (default: the model table's) replaced by ``table``."""
    start_marker, end_marker = markers
    start, end = readme.find(start_marker), readme.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the document needs the markers {start_marker} ... {end_marker}, in that order")
    return readme[:start + len(start_marker)] + "\n" + table + readme[end:]


def main(argv=None) -> int:
    """Command line: rewrite (or with ``--check`` only compare) the README's model table; exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="README to update (default: the repo's)")
    parser.add_argument("--models-doc", type=Path, default=DEFAULT_MODELS_DOC,
                        help="document with the downstream table (default: the repo's docs/models.md)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    status = 0
    for path, table, markers in ((args.readme, model_table_markdown(), (START_MARKER, END_MARKER)),
                                 (args.models_doc, downstream_table_markdown(), DOWNSTREAM_MARKERS)):
        status = max(status, _update(path, table, markers, args.check))
    return status


def _update(path: Path, table: str, markers, check: bool) -> int:
    """Rewrite (or with ``check`` only compare) the table between ``markers`` in ``path``; exit status."""
    current = path.read_text()
    try:
        updated = with_table(current, table, markers)
    except ValueError as err:
        print(f"registry_table: error: {path}: {err}", file=sys.stderr)
        return 1
    if check:
        if updated != current:
            print(f"registry_table: {path} model table is stale; run tools/registry_table.py", file=sys.stderr)
            return 1
        print(f"{path}: model table up to date")
        return 0
    if updated != current:
        path.write_text(updated)
    print(f"{path}: model table written ({updated.count(chr(10)) - current.count(chr(10)):+d} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
