"""Pretrained-weight facts, read from the checkpoint registry ``weights/checkpoints.toml``.

Every published fact (Hub repo, original ``.pth`` URL, classes, input size, crop, top-1,
params, GFLOPs, licence, paper, provenance) lives in that one file; model modules turn its
entries into timm pretrained cfgs with :func:`registry_default_cfgs`. The detection and
segmentation backbones (whole detector files, a task's architecture arguments, task metrics)
live in ``weights/downstream.toml``, read by :func:`load_downstream_registry`.
"""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = [
    "registry_path",
    "load_registry",
    "load_downstream_registry",
    "downstream_entry",
    "downstream_backbone_kwargs",
    "task_metrics",
    "registry_entries",
    "registry_default_cfgs",
    "weights_unavailable_error",
    "registry_entry_name",
    "published_summary",
]

_REGISTRY_NAME = "checkpoints.toml"
_DOWNSTREAM_REGISTRY_NAME = "downstream.toml"
# task metrics of downstream entries, in table order, with how to show them
_TASK_METRICS = (('box_map', 'box AP'), ('mask_map', 'mask AP'), ('pq', 'PQ'), ('ap', 'AP'), ('miou', 'mIoU'),
                 ('miou_ms', 'mIoU (ms)'))


def registry_path(name: str = _REGISTRY_NAME) -> Path:
    """Location of a registry file (default ``checkpoints.toml``): inside the package (wheel) or
    beside it (source tree)."""
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / "weights" / name, package_dir.parent / "weights" / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint registry {name} not found; looked at " + ", ".join(str(c) for c in candidates))


@functools.lru_cache(maxsize=None)
def _read_registry(name: str) -> tuple:
    with registry_path(name).open("rb") as f:
        return tuple(tomllib.load(f).get("checkpoint", []))


def load_registry() -> tuple:
    """All ``[[checkpoint]]`` entries of the classification registry, in file order (read once)."""
    return _read_registry(_REGISTRY_NAME)


def load_downstream_registry() -> tuple:
    """All ``[[checkpoint]]`` entries of the detection / segmentation backbone registry
    ``weights/downstream.toml``, in file order (read once)."""
    return _read_registry(_DOWNSTREAM_REGISTRY_NAME)


def registry_entries(architectures: Sequence[str]) -> List[Dict[str, Any]]:
    """Registry entries (classification, then downstream) of the given architectures, in registry order.

    Raises if an architecture has no classification entry, so a typo cannot silently leave a model
    without weights.
    """
    entries = [dict(e) for e in load_registry() if e["model"] in architectures]
    missing = sorted(set(architectures) - {e["model"] for e in entries})
    if missing:
        raise KeyError(f"no checkpoint registry entry for {missing} in {registry_path()}")
    return entries + [dict(e) for e in load_downstream_registry() if e["model"] in architectures]


def downstream_entry(architecture: str, pretrained_cfg: Any) -> Optional[Dict[str, Any]]:
    """The downstream registry entry that ``pretrained_cfg`` (a tag, a cfg dict or a timm
    ``PretrainedCfg``, as timm passes it to an entrypoint) names for ``architecture``; None if none."""
    if isinstance(pretrained_cfg, dict):
        tag = pretrained_cfg.get("tag")
    else:
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else getattr(pretrained_cfg, "tag", None)
    return next((dict(e) for e in load_downstream_registry() if (e["model"], e["tag"]) == (architecture, tag)), None)


def downstream_backbone_kwargs(entry: Dict[str, Any]) -> Dict[str, Any]:
    """Model kwargs of a downstream entry's backbone: its task's kernel size, dilations and layer
    scale over the architecture's, one LayerNorm per output stage, no classifier."""
    return dict(
        kernel_size=entry["kernel_size"],
        dilations=tuple(tuple(d) for d in entry["dilations"]) if "dilations" in entry else None,
        ls_init_value=entry.get("layer_scale"),
        out_norms=True,
        num_classes=0,
    )


def task_metrics(entry: Dict[str, Any]) -> str:
    """A downstream entry's published task metrics, e.g. ``'box AP 48.6, mask AP 43.5'``."""
    return ", ".join(f"{label} {entry[key]:g}" for key, label in _TASK_METRICS if key in entry)


def published_summary(entry: Dict[str, Any]) -> str:
    """Human summary of the published numbers (absent ones are left out)."""
    if "task" in entry:  # a detection / segmentation backbone
        return (f"{entry['method']} on {entry['dataset']} ({task_metrics(entry)}; whole model "
                f"{entry['published_model_params_m']}M params), backbone {entry['backbone_params']} params, "
                f"tested at {entry['eval_input_size'][1]}x{entry['eval_input_size'][2]}; features_only backbone")
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
    downstream = "task" in entry
    fields = dict(
        url=entry.get("url", ""),
        num_classes=0 if downstream else entry["num_classes"],
        input_size=tuple(entry["eval_input_size" if downstream else "input_size"]),
        crop_pct=1.0 if downstream else entry["crop_pct"],
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
