"""Rewrite the README's model table from the checkpoint registry (``weights/checkpoints.toml``).

    .venv/bin/python tools/registry_table.py           # rewrite the section between the markers
    .venv/bin/python tools/registry_table.py --check   # only compare; exit 1 if the README is stale

The table is :func:`model_table_markdown` of the registry, so README and registry cannot disagree.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from timm_nat.pretrained import load_registry, registry_entry_name

START_MARKER = "<!-- model-table:start -->"
END_MARKER = "<!-- model-table:end -->"
DEFAULT_README = Path(__file__).resolve().parents[1] / "README.md"


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


def with_table(readme: str, table: str) -> str:
    """``readme`` with everything between the model-table markers replaced by ``table``."""
    start, end = readme.find(START_MARKER), readme.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"the README needs the markers {START_MARKER} ... {END_MARKER}, in that order")
    return readme[:start + len(START_MARKER)] + "\n" + table + readme[end:]


def main(argv=None) -> int:
    """Command line: rewrite (or with ``--check`` only compare) the README's model table; exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="README to update (default: the repo's)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the table is stale")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    try:
        updated = with_table(current, model_table_markdown())
    except ValueError as err:
        print(f"registry_table: error: {args.readme}: {err}", file=sys.stderr)
        return 1
    if args.check:
        if updated != current:
            print(f"registry_table: {args.readme} model table is stale; run tools/registry_table.py", file=sys.stderr)
            return 1
        print(f"{args.readme}: model table up to date")
        return 0
    if updated != current:
        args.readme.write_text(updated)
    print(f"{args.readme}: model table written ({updated.count(chr(10)) - current.count(chr(10)):+d} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
