"""Conversion and verification: a source becomes a timm folder that must reproduce it exactly.

The source goes through its family's ``checkpoint_filter_fn`` into the reference model; the folder
(timm-named ``model.safetensors``, timm's ``config.json``, a model card, the converter's manifest)
is then loaded back through timm's public paths, and both must give identical outputs (max abs
diff exactly 0.0) before the folder replaces the output.
"""
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import timm
import torch
from huggingface_hub import HfApi
from timm.models import get_pretrained_cfg, save_for_hf

from ..models._family import build_architecture
from ..models._helpers import backbone_of_checkpoint
from .architecture import Architecture, family_of, infer_architecture
from .card import Provenance, model_card, provenance
from .errors import ConversionError, log, one_line
from .output import MANIFEST_NAME, PROG, check_no_overlap, check_output, clean_stale, staged_output
from .sources import Downloader, Source, file_sha256, read_state_dict, resolve_source

__all__ = ['Conversion', 'DEFAULT_VERIFY_SIZE', 'WEIGHTS_NAME', 'convert', 'model_outputs', 'push_to_hub',
           'uninitialized_model']

WEIGHTS_NAME = 'model.safetensors'
DEFAULT_VERIFY_SIZE = 96  # small input: identical weights give identical outputs at any size


@dataclasses.dataclass
class Conversion:
    """What one conversion wrote and measured."""
    source: Source
    architecture: Architecture
    output_dir: Path
    num_params: int
    max_abs_diff: Dict[str, float]  # loading path -> max abs diff against the reference remapping
    provenance: Provenance


def _pretrained_cfg(arch: Architecture, published: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """timm pretrained cfg of the converted weights: the registry's for a published file, else the
    architecture's conventions without any claim about weights we know nothing of."""
    if published:
        cfg = get_pretrained_cfg(arch.name).to_dict()
    else:
        cfg = get_pretrained_cfg(arch.model).to_dict()
        for key in ('url', 'hf_hub_id', 'hf_hub_filename', 'tag', 'license', 'description', 'notes'):
            cfg.pop(key, None)
    cfg['num_classes'] = arch.num_classes
    return cfg


def uninitialized_model(name: str, **kwargs) -> torch.nn.Module:
    """The model with allocated but uninitialised tensors, for a strict load to fill: timm's init takes
    seconds per 100M parameters. Non-persistent buffers hold computed state a load would not restore,
    so a model with any is built the normal way. A detection backbone is the bare model (see
    :func:`..models._family.build_architecture`)."""
    model = build_architecture(name, device='meta', **kwargs)
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        return build_architecture(name, **kwargs)
    return model.to_empty(device='cpu')


def model_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> List[torch.Tensor]:
    """What a converted model gives: logits, or a detection backbone's (``out_norms``) normed stage outputs."""
    if getattr(model, 'out_norms', None) is not None:
        return model.forward_intermediates(inputs, intermediates_only=True)
    return [model(inputs)]


def _check_values(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse tensors a load would silently cast (integers into float weights) and non-finite weights."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is not None and target.is_floating_point() and not value.is_floating_point():
            raise ConversionError(
                f"checkpoint tensor {key} is {value.dtype}, but the model's is {target.dtype}: loading would "
                "cast (truncate) it; refused (a quantised or corrupt checkpoint? convert the float one)")
    bad = []
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            bad.append(f"{key} ({nan} NaN, {inf} Inf of {value.numel()})")
    if bad:
        raise ConversionError(
            f"checkpoint holds non-finite weights (NaN/Inf) in {len(bad)} tensor(s): {', '.join(bad)}; "
            "a trained checkpoint has none (corrupt or diverged?); not converting")


def _reference_model(state_dict, arch: Architecture, published) -> torch.nn.Module:
    """The source through the reference remapping: build, ``checkpoint_filter_fn``, strict load."""
    model = uninitialized_model(
        arch.model, pretrained_cfg=_pretrained_cfg(arch, published), num_classes=arch.num_classes, **arch.model_args)
    try:
        remapped = family_of(arch.model).checkpoint_filter_fn(dict(state_dict), model)
        _check_values(remapped, model)
        model.load_state_dict(remapped, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"checkpoint does not load into {arch.describe()}: {one_line(err)}") from err
    return model.eval()


def _verify(reference: torch.nn.Module, folder: Path, size: int) -> Dict[str, float]:
    """Max abs diff between the reference and the folder loaded through timm's public paths (must be 0.0)."""
    config = json.loads((folder / 'config.json').read_text())
    backbone = dict(features_only=True) if config.get('model_args', {}).get('out_norms') else {}
    loaded = {
        'pretrained_cfg_overlay file': timm.create_model(
            config['architecture'], pretrained=True,
            pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME), num_classes=config['num_classes']),
            **config.get('model_args', {}), **backbone),
        'local-dir': timm.create_model(f'local-dir:{folder}', pretrained=True, **backbone),
    }
    inputs = torch.randn(1, reference.pretrained_cfg['input_size'][0], size, size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model_outputs(reference, inputs)
        if not all(bool(torch.isfinite(e).all()) for e in expected):
            raise ConversionError(
                f"the source's own output is not finite (NaN/Inf) on a random {size}x{size} input, so the conversion "
                "cannot be verified; the weights overflow (not a conversion mismatch)")
        diffs = {}
        for path, model in loaded.items():
            outputs = list(model.eval()(inputs)) if backbone else [model.eval()(inputs)]
            diffs[path] = max((o - e).abs().max().item() for o, e in zip(outputs, expected, strict=True))
    wrong = {path: diff for path, diff in diffs.items() if diff != 0.0}
    if wrong:
        raise ConversionError(
            "verification failed: the converted folder does not reproduce the source "
            + ', '.join(f"(max abs diff {d:.3g} via {p})" for p, d in wrong.items()))
    return diffs


def convert(
        source: Union[str, Path, Source],
        output_dir: Path,
        *,
        model: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        force: bool = False,
        verify_size: int = DEFAULT_VERIFY_SIZE,
        hub_repo_id: Optional[str] = None,
        downloader: Optional[Downloader] = None,
        log: Callable[[str], None] = log,
) -> Conversion:
    """Convert ``source`` into a verified timm folder ``output_dir`` (written only once verified).

    ``source`` is a Hub repo id, folder, file or URL (resolved with ``downloader``) or a
    :class:`Source` already on disk. ``model`` / ``model_args`` settle the architecture when the
    checkpoint cannot (only architecture hyper-parameters are accepted). An existing output is
    replaced only with ``force`` and only if the converter wrote it; the output may not overlap the
    source. ``hub_repo_id`` is where the card says the folder will be loaded from.
    """
    output_dir = Path(output_dir).expanduser()
    clean_stale(output_dir, log)  # a restored old output is then refused or replaced like any other
    check_output(output_dir, force)  # before any download
    if not isinstance(source, Source):
        source = resolve_source(str(source), downloader)
    check_no_overlap(source.root, output_dir)
    # a whole detector / segmenter file: its backbone, with one log line counting what is left out
    state_dict = backbone_of_checkpoint(read_state_dict(source.weights))
    arch = infer_architecture(state_dict, model=model, model_args=model_args, config=source.config, entry=source.entry)
    log(f"{source.name}: {arch.describe()}")
    prov = provenance(source, file_sha256(source.weights), source.weights.stat().st_size)
    if prov.published and (arch.entry is None or arch.model_args):  # not the published architecture
        prov = dataclasses.replace(prov, published=None, note=prov.note + (
            f"; but it converts as {arch.describe()}, not as the published {prov.published['model']}, "
            "so no published numbers are claimed"))
    reference = _reference_model(state_dict, arch, prov.published)
    num_params = sum(p.numel() for p in reference.parameters())
    with staged_output(output_dir, force, log, source=source.name, source_sha256=prov.sha256) as staging:
        save_for_hf(reference, staging, safe_serialization=True)
        diffs = _verify(reference, staging, verify_size)
        (staging / 'README.md').write_text(model_card(arch, source, prov, num_params, diffs, hub_repo_id))
    log(f"verified: max abs diff {', '.join(f'{d} via {p}' for p, d in diffs.items())}")
    log(f"wrote {output_dir}/ ({WEIGHTS_NAME}, config.json, README.md)")
    return Conversion(source, arch, output_dir, num_params, diffs, prov)


def push_to_hub(folder: Path, repo_id: str, private: Optional[bool] = None, log: Callable[[str], None] = log) -> None:
    """Upload a converted folder to the Hub repo ``repo_id`` (created if needed)."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), ignore_patterns=[MANIFEST_NAME],  # local bookkeeping
            commit_message=f"Add timm weights converted by {PROG}")
    except (OSError, ValueError) as err:  # HTTP errors, auth, offline
        raise ConversionError(
            f"could not push {folder} to {repo_id}: {type(err).__name__}: {one_line(err, 300)}") from err
    log(f"pushed {folder}/ to https://huggingface.co/{repo_id}")
