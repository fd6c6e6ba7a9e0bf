"""The model card of a converted folder: what it is, where it came from, and only what was checked.

Published numbers (top-1, params, GFLOPs) are quoted, as "published for <source>", only when the
converted file is the published one: downloaded from the registry's Hub repo or URL, or matching
a SHA-256 the registry records. A file merely named like a published checkpoint gets none.
"""
import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from timm.models import get_pretrained_cfg, model_entrypoint

from ..pretrained import published_summary
from .architecture import Architecture
from .sources import Source, url_basename

__all__ = ['Provenance', 'model_card', 'provenance']

_PAPERS = {
    '2204.07143': 'Neighborhood Attention Transformer',
    '2209.15001': 'Dilated Neighborhood Attention Transformer',
}
_WHERE = {'hub': 'Hugging Face Hub, transformers layout', 'url': 'original .pth', 'folder': 'local folder',
          'file': 'local file'}


@dataclasses.dataclass
class Provenance:
    """What is known about the converted file: its hash, and whether it is a published checkpoint."""
    sha256: str
    size: int
    published: Optional[Dict[str, Any]]  # the registry entry whose published numbers apply, else None
    note: str  # one sentence saying why (or why not)


def _published_file_fields(source: Source) -> Tuple[str, str]:
    """Registry field prefix of the published file this source is, or claims to be: Hub file or .pth."""
    entry = source.entry or {}
    if source.origin and source.origin == entry.get('hf_hub_id'):
        return 'hf_hub', f"{entry['hf_hub_id']}/{entry['hf_hub_filename']}"
    return 'url', url_basename(entry.get('url', ''))


def provenance(source: Source, sha256: str, size: int) -> Provenance:
    """Whether ``source`` (with this SHA-256 and size) may quote its registry entry's published numbers.

    A registry entry may record ``hf_hub_sha256`` / ``hf_hub_size`` (the Hub file) and ``url_sha256`` /
    ``url_size`` (the original .pth); a recorded value that differs is reported and voids the claim.
    """
    entry = source.entry
    if entry is None:
        return Provenance(sha256, size, None, 'not a checkpoint of the timm-nat registry; no published numbers')
    prefix, published_name = _published_file_fields(source)
    known_sha, known_size = entry.get(f'{prefix}_sha256'), entry.get(f'{prefix}_size')
    if known_size is not None and known_size != size:
        return Provenance(sha256, size, None, f"does NOT match the published {published_name}: {size:,} bytes, "
                                              f"published {known_size:,}; published numbers are not claimed")
    if known_sha is not None and known_sha.lower() != sha256:
        return Provenance(sha256, size, None, f"does NOT match the published {published_name}: SHA-256 differs "
                                              f"(published {known_sha}); published numbers are not claimed")
    if known_sha is not None:
        return Provenance(sha256, size, entry, f"the published {published_name} (SHA-256 as in the registry)")
    if source.origin:
        return Provenance(sha256, size, entry, f"downloaded from {source.origin}")
    return Provenance(sha256, size, None, (
        f"named like the published {published_name}, but not downloaded from it and the registry records no "
        "SHA-256 to compare; published numbers are not claimed for it"))


def _details(arch: Architecture, source: Source, prov: Provenance, num_params: int,
             diffs: Dict[str, float]) -> List[str]:
    entry = prov.published
    model_args = f", model_args `{json.dumps(arch.model_args)}`" if arch.model_args else ''
    lines = [
        f"- **Architecture:** `{arch.model}`{model_args}",
        f"- **Classes:** {arch.num_classes}",
        f"- **Parameters:** {num_params:,}",
        f"- **Source:** `{source.name}` ({_WHERE[source.kind]})",
        f"- **File converted:** `{source.weights.name}`, {prov.size:,} bytes, SHA-256 `{prov.sha256}`",
        f"- **Provenance:** {prov.note}",
    ]
    if entry:
        original = f", original weights {entry['url']}" if 'url' in entry else ''
        lines += [f"- **Registry entry:** `{arch.name}`{original}",
                  f"- **Published for `{source.origin or source.name}`:** {published_summary(entry)} "
                  "(as published; not re-measured by the converter)"]
    else:
        lines += ["- **Published:** no published numbers are claimed for this file"]
    paper_id = (get_pretrained_cfg(arch.model).paper_ids or '').replace('arXiv:', '')
    if paper_id:
        lines += [f"- **Paper:** {_PAPERS.get(paper_id, 'arXiv')} (arXiv:{paper_id}, https://arxiv.org/abs/{paper_id})"]
    shown = ', '.join(f"{d} via {p}" for p, d in diffs.items())
    return lines + [
        f"- **License:** {entry['license'] if entry else 'not known to the converter; see the source'}",
        f"- **Verified:** identical outputs to the source loaded through timm-nat's remapping "
        f"(max abs diff {shown}; random input). Accuracy was not measured.",
    ]


def _usage(arch: Architecture, hub_repo_id: Optional[str]) -> List[str]:
    load_name = f'hf-hub:{hub_repo_id}' if hub_repo_id else 'local-dir:/path/to/this/folder'
    model_args = f"\n    **{json.dumps(arch.model_args)}," if arch.model_args else ''
    return [
        '```python',
        'import timm',
        'import timm_nat  # registers the architecture (automatic once installed)',
        '',
        f'model = timm.create_model("{load_name}", pretrained=True).eval()',
        '',
        '# or name the architecture and give the weights file',
        f'model = timm.create_model(\n    "{arch.model}",\n    pretrained=True,\n'
        f'    pretrained_cfg_overlay=dict(file="model.safetensors", num_classes={arch.num_classes}),'
        f'\n    num_classes={arch.num_classes},{model_args}\n).eval()',
        '```',
    ]


def model_card(arch: Architecture, source: Source, prov: Provenance, num_params: int, diffs: Dict[str, float],
               hub_repo_id: Optional[str] = None) -> str:
    """README.md of a converted folder: what it is, where it came from, what was checked, how to load it."""
    front_matter = ['---', 'library_name: timm', 'tags:', '- image-classification', '- timm', '- timm-nat']
    front_matter += [f"license: {prov.published['license']}"] if prov.published else []
    summary = (
        f"{(model_entrypoint(arch.model).__doc__ or arch.model).strip()} Weights converted to timm naming by "
        "timm-nat's converter (`timm-nat-convert`); the architecture and its exact neighborhood attention "
        "with relative positional bias come from the timm-nat package, which must be installed.")
    title = arch.name if prov.published else arch.model
    lines = front_matter + ['---', '', f'# {title}', '', summary, '', '## Details', '']
    lines += _details(arch, source, prov, num_params, diffs) + ['', '## Usage', ''] + _usage(arch, hub_repo_id)
    return '\n'.join(lines) + '\n'

