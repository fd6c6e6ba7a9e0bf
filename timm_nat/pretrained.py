"""Pretrained-weight facts, read from the checkpoint registry ``weights/checkpoints.toml``.

Every published fact (Hub repo, original ``.pth`` URL, classes, input size, crop, top-1,
params, GFLOPs, licence, paper, provenance) lives in that one file; model modules turn its
entries into timm pretrained cfgs with :func:`registry_default_cfgs`.
"""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

__all__ = [
    "registry_path",
    "load_registry",
    "registry_entries",
    "registry_default_cfgs",
    "weights_unavailable_error",
    "registry_entry_name",
    "published_summary",
]

_REGISTRY_NAME = "checkpoints.toml"


def registry_path() -> Path:
    """Location of ``checkpoints.toml``: inside the package (wheel) or beside it (source tree)."""
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / "weights" / _REGISTRY_NAME, package_dir.parent / "weights" / _REGISTRY_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint registry {_REGISTRY_NAME} not found; looked at " + ", ".join(str(c) for c in candidates))


@functools.lru_cache(maxsize=None)
def load_registry() -> tuple:
    """All ``[[checkpoint]]`` entries of the registry, in file order (read once)."""
    with registry_path().open("rb") as f:
        entries = tomllib.load(f).get("checkpoint", [])
    return tuple(entries)


def registry_entries(architectures: Sequence[str]) -> List[Dict[str, Any]]:
    """Registry entries of the given architectures, in registry order.

    Raises if an architecture has no entry, so a typo cannot silently leave a model without weights.
    """
    entries = [dict(e) for e in load_registry() if e["model"] in architectures]
    missing = sorted(set(architectures) - {e["model"] for e in entries})
    if missing:
        raise KeyError(f"no checkpoint registry entry for {missing} in {registry_path()}")
    return entries


def published_summary(entry: Dict[str, Any]) -> str:
    """Human summary of the published numbers (absent ones are left out)."""
    facts = []
    if "top1" in entry:
        facts.append(f"ImageNet-1k top-1 {entry['top1']}%")
    if "params_m" in entry:
        facts.append(f"{entry['params_m']}M params")
    if "gflops" in entry:
        facts.append(f"{entry['gflops']} GFLOPs")
    facts.append(f"{entry['num_classes']} classes at {entry['input_size'][1]}x{entry['input_size'][2]}")
    return ", ".join(facts)


def _cfg_fields(entry: Dict[str, Any]) -> Dict[str, Any]:
    """timm ``PretrainedCfg`` fields for one registry entry."""
    input_size = tuple(entry["input_size"])
    fields = dict(
        url=entry.get("url", ""),
        num_classes=entry["num_classes"],
        input_size=input_size,
        crop_pct=entry["crop_pct"],
        license=entry["license"],
        paper_ids=entry["paper"].replace("arxiv:", "arXiv:"),
        description=published_summary(entry),
        notes=(entry["source"],) if "source" in entry else None,
    )
    if "hf_hub_id" in entry:
        fields.update(hf_hub_id=entry["hf_hub_id"], hf_hub_filename=entry["hf_hub_filename"])
    return {k: v for k, v in fields.items() if v is not None}


def registry_default_cfgs(
        architectures: Sequence[str],
        make_cfg: Callable[..., Dict[str, Any]],
) -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': cfg}`` for every registry entry of ``architectures``, ready for
    ``timm.models.generate_default_cfgs``.

    ``make_cfg(**fields)`` is the model family's ``_cfg`` (its fixed conventions: mean/std,
    interpolation, first conv, classifier, and ``pool_size``, which follows from the model's
    reduction); ``fields`` come from the registry. Registry order is
    kept, so an architecture's first listed tag is its default.
    """
    return {f"{e['model']}.{e['tag']}": make_cfg(**_cfg_fields(e)) for e in registry_entries(architectures)}


def weights_unavailable_error(model_name: str, pretrained_cfg: Dict[str, Any], cause: BaseException) -> RuntimeError:
    """An error that says where the weights were looked for and the ways to provide them."""
    from ._offline import hub_offline_mode, hub_unreachable_reason, url_cache_path, url_unreachable_reason

    hub_id, filename = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("hf_hub_filename") or "pytorch_model.bin"
    url, file = pretrained_cfg.get("url"), pretrained_cfg.get("file")
    from_hub, from_url = hub_id and not file, url and not hub_id and not file
    if file:
        where = f"the local file {file!r}"
    elif hub_id:
        where = f"the Hugging Face Hub repo {hub_id!r} (file {filename!r})"
    else:
        where = f"{url!r}"
    ways = []  # alternatives, each a way to fix it
    if from_hub and hub_offline_mode():
        ways.append("HF_HUB_OFFLINE is set, so only the local Hub cache was searched: with network access, "
                    "unset it to download the file into the cache")
    elif from_hub:
        offline_now = " (as here)" if hub_unreachable_reason() else ""
        ways.append("with network access the file is downloaded and cached; without" + offline_now
                    + ", set HF_HUB_OFFLINE=1 to use only the local Hub cache without retries")
    if from_hub:
        ways.append(f"download it elsewhere (`hf download {hub_id} {filename}`) and copy the Hub cache "
                    "(~/.cache/huggingface/hub) over")
    if from_url:
        cached = url_cache_path(url)
        if hub_offline_mode():
            ways.append(f"HF_HUB_OFFLINE is set, so only torch hub's checkpoint cache ({cached.parent}) was searched: "
                        "with network access, unset it to download the file into that cache")
        elif url_unreachable_reason(url):
            ways.append(f"with network access the file is downloaded into torch hub's checkpoint cache ({cached.parent})")
        ways.append(f"download {url} elsewhere and copy it to {cached}")
    weights_name = filename if hub_id else (url.rsplit("/", 1)[-1] if url else "weights.pth")
    overlay = f"pass pretrained_cfg_overlay=dict(file='/path/to/{weights_name}') to timm.create_model"
    if url and hub_id:
        overlay += f" (the original-layout checkpoint {url} loads the same way)"
    ways.append(overlay)
    ways.append("convert the file into a folder (`timm-nat-convert FILE -o DIR`) and load "
                "timm.create_model('local-dir:DIR', pretrained=True)")
    detail = str(cause).rstrip(".")
    if not detail and isinstance(cause, FileNotFoundError):  # timm raises it without a message
        detail = f"no such file {cause.filename or file or url!r}"
    return RuntimeError(
        f"Could not load pretrained weights for {model_name!r} from {where}: "
        f"{type(cause).__name__}: {detail}. To fix: " + "; or ".join(ways) + ".")


def registry_entry_name(entry: Dict[str, Any]) -> str:
    """timm name ``arch.tag`` of a registry entry."""
    return f"{entry['model']}.{entry['tag']}"
