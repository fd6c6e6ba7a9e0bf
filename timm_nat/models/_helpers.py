"""Helpers shared by the model families: their pretrained cfg, building with a helpful download
error, and the checkpoint plumbing every family's ``checkpoint_filter_fn`` uses (unwrapping,
renames shared by the published layouts, input-channel adaptation, the strict key/shape check)."""
import logging
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives
from timm.models._manipulate import adapt_input_conv

from .._offline import (
    cached_hub_file, hub_offline_mode, hub_unreachable_reason, url_cache_path, url_unreachable_reason,
)
from ..pretrained import weights_unavailable_error

__all__ = [
    'family_cfg', 'build_model_or_explain', 'unwrap_state_dict', 'downsample_to_next_stage',
    'original_head_key', 'adapt_input_conv_weight', 'state_dict_problems', 'check_state_dict_fits', 'init_weights',
    'blocks_by_index', 'first_of_blocks', 'split_backbone', 'backbone_of_checkpoint', 'out_norm_key',
]

_logger = logging.getLogger(__name__)

_CLASSIFIER_KEYS = ('head.fc.weight', 'head.fc.bias')
_ORIGIN_URL = 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer'


def family_cfg(url: str = '', *, first_conv: str, reduction: int, **kwargs) -> Dict[str, Any]:
    """A family's timm pretrained cfg: its fixed conventions plus the registry's facts (``kwargs``).

    Args:
        url: Weights URL (original ``.pth``), if any.
        first_conv: The family's input conv (timm adapts it for ``in_chans != 3``).
        reduction: Stride of the family's final feature map, from which ``pool_size`` follows.
        **kwargs: Facts of one registry entry (``input_size``, ``num_classes``, ``hf_hub_id``, ...).
    """
    cfg = {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224),
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv, 'classifier': 'head.fc',
        'origin_url': _ORIGIN_URL,
        **kwargs,
    }
    cfg['pool_size'] = tuple(s // reduction for s in cfg['input_size'][1:])
    return cfg


def build_model_or_explain(model_cls: Type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """``build_model_with_cfg``, turning weight download / file errors into one that says how to fix them.

    Offline (``HF_HUB_OFFLINE``, or the weights' host name does not resolve) weights come straight
    from the local Hub cache or torch hub's checkpoint cache (URLs), or the error is raised at
    once, before the model is built, without a download attempt or huggingface_hub's retries.
    """
    if pretrained:
        kwargs = _offline_weights_as_file(variant, kwargs)
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except OSError as err:  # download, Hub cache and file access failures are all OSError subclasses
        if not pretrained:
            raise
        name, cfg = _resolved_cfg(variant, kwargs)
        raise weights_unavailable_error(name, cfg, err) from err


def _resolved_cfg(variant: str, kwargs: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(``arch.tag``, pretrained cfg dict) that ``build_model_with_cfg`` will use."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    ).to_dict()
    return (f"{variant}.{cfg['tag']}" if cfg.get('tag') else variant), cfg


def _offline_weights_as_file(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` unchanged unless the weights' host is out of reach (``HF_HUB_OFFLINE``, or the Hub's
    or the URL's own host name does not resolve): then a file missing from its cache (the Hub
    cache, or torch hub's checkpoint cache for a URL) raises the explanation now, before the model
    is built and without a download attempt or retries, and a cached file is passed as
    ``pretrained_cfg_overlay['file']`` (only huggingface_hub's own offline mode reads its cache
    directly)."""
    name, cfg = _resolved_cfg(variant, kwargs)
    if cfg.get('file') or cfg.get('state_dict') or cfg.get('source'):
        return kwargs  # a local file, or timm's own ``hf-hub:`` / ``local-dir:`` paths, left alone
    offline_mode = hub_offline_mode()
    if cfg.get('hf_hub_id'):  # timm prefers the Hub when an entry has both
        reason = None if offline_mode else hub_unreachable_reason()
        if not (offline_mode or reason):
            return kwargs
        filename = cfg.get('hf_hub_filename') or HF_WEIGHTS_NAME
        cached = cached_hub_file(cfg['hf_hub_id'], [*_get_safe_alternatives(filename), filename])  # timm's order
        where = 'the local Hub cache'
    elif cfg.get('url'):
        reason = None if offline_mode else url_unreachable_reason(cfg['url'])
        if not (offline_mode or reason):
            return kwargs
        path = url_cache_path(cfg['url'], kwargs.get('cache_dir'))
        cached = str(path) if path.is_file() else None
        where = f"torch hub's checkpoint cache ({path} does not exist)"
    else:
        return kwargs
    if cached is None:
        why = "offline mode (HF_HUB_OFFLINE is set)" if offline_mode else f"no network, {reason}"
        raise weights_unavailable_error(name, cfg, ConnectionError(f"{why}; not in {where} either"))
    if offline_mode and cfg.get('hf_hub_id'):
        return kwargs  # huggingface_hub reads its cache directly
    return {**kwargs, 'pretrained_cfg_overlay': {**(kwargs.get('pretrained_cfg_overlay') or {}), 'file': cached}}


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict inside ``{'model': ...}`` / ``{'state_dict': ...}`` training checkpoints (or itself)."""
    for wrapper in ('model', 'state_dict'):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return checkpoint


# where whole detection / segmentation checkpoints keep their backbone: mmdet, mmseg and detectron2
# (``backbone.``), transformers OneFormer (its DinatBackbone)
BACKBONE_PREFIXES = ('backbone.', 'model.pixel_level_module.encoder.')


def split_backbone(state_dict: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(backbone keys without their prefix, every other key) of a whole detector / segmenter state
    dict (see ``BACKBONE_PREFIXES``); ``(state_dict, [])`` for a state dict without such a prefix."""
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            backbone = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            return backbone, [k for k in state_dict if not k.startswith(prefix)]
    return state_dict, []


def backbone_of_checkpoint(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The backbone part of a (possibly wrapped) checkpoint, logging one warning that counts the
    keys left out as not part of the backbone (by their first name, e.g. ``neck: 8, roi_head: 24``)."""
    backbone, others = split_backbone(unwrap_state_dict(state_dict))
    if others:
        groups = Counter(k.split('.', 1)[0] if not k.startswith('model.') else '.'.join(k.split('.', 2)[:2])
                         for k in others)
        _logger.warning(
            "loaded the backbone (%d tensors) of a whole detection/segmentation checkpoint; %d keys are not "
            "part of the backbone and were left out (%s)", len(backbone), len(others),
            ", ".join(f"{name}: {n}" for name, n in groups.items()))
    return backbone


def out_norm_key(key: str) -> Optional[str]:
    """A detection backbone's per-output norm (original ``norm{i}.``, transformers
    ``hidden_states_norms.stage{i+1}.``) as timm's ``out_norms.{i}.``; None for other keys."""
    if m := re.match(r'norm(\d+)\.(.+)$', key):
        return f'out_norms.{m[1]}.{m[2]}'
    if m := re.match(r'hidden_states_norms\.stage(\d+)\.(.+)$', key):
        return f'out_norms.{int(m[1]) - 1}.{m[2]}'
    return None


def downsample_to_next_stage(key: str, level_prefix: str) -> Optional[str]:
    """``{level_prefix}{i}.downsample.<rest>`` as timm's ``stages.{i+1}.downsample.<rest>``; None for other keys.

    The published hierarchical layouts (NAT/DiNAT original and transformers, DiNAT_s) downsample at
    the end of level i; timm (as its Swin) downsamples at the start of stage i + 1.
    """
    if m := re.match(re.escape(level_prefix) + r'(\d+)\.downsample\.(.+)$', key):
        return f'stages.{int(m[1]) + 1}.downsample.{m[2]}'
    return None


def original_head_key(key: str) -> str:
    """The original repository's classifier ``head.<param>`` as timm's ``head.fc.<param>`` (others unchanged)."""
    if key.startswith('head.') and not key.startswith('head.fc.'):
        return 'head.fc.' + key[len('head.'):]
    return key


def adapt_input_conv_weight(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        first_conv: str,
) -> Dict[str, torch.Tensor]:
    """``state_dict`` with the ``first_conv`` weight adapted to the model's input channels.

    When the checkpoint's conv has other input channels than the model's (``in_chans != 3``), the
    weight goes through timm's ``adapt_input_conv`` here, before the strict shape check (timm's
    loader would adapt it only after the filter, and then sees matching shapes and leaves it).
    Any other shape difference is left for :func:`check_state_dict_fits` to report.
    """
    key = f'{first_conv}.weight'
    weight, target = state_dict.get(key), model.get_submodule(first_conv).weight
    if weight is None or weight.dim() != 4 or target.dim() != 4:
        return state_dict
    other_dims_match = (weight.shape[0], *weight.shape[2:]) == (target.shape[0], *target.shape[2:])
    if weight.shape[1] != target.shape[1] and other_dims_match:
        state_dict = dict(state_dict)
        state_dict[key] = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
    return state_dict


def state_dict_problems(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        skip_keys: Sequence[str] = _CLASSIFIER_KEYS,
) -> List[str]:
    """Every way ``state_dict`` does not fit ``model`` (keys in ``skip_keys`` aside), one string per kind.

    Empty when it loads strictly; otherwise e.g. ``'1 missing key(s): stages.2.blocks.1.ls2.gamma'``
    or ``'1 shape mismatch(es): k: checkpoint (2, 7, 7) vs model (2, 5, 5)'``.
    """
    expected = model.state_dict()
    leftover = [k for k in state_dict if k not in expected and k not in skip_keys]
    missing = [k for k in expected if k not in state_dict and k not in skip_keys]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and k not in skip_keys and v.shape != expected[k].shape]
    problems = []
    if leftover:
        problems.append(f"{len(leftover)} unexpected key(s): {', '.join(leftover)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    return problems


def check_state_dict_fits(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise listing every unexpected, missing or mis-shaped key of a remapped checkpoint.

    The classifier is left to timm's ``load_pretrained``, which drops or keeps it depending on
    ``num_classes`` (and whose strict load then checks it).
    """
    problems = state_dict_problems(state_dict, model)
    if problems:
        raise RuntimeError(
            "checkpoint does not match the model (wrong architecture or arguments?): " + ". ".join(problems))


def blocks_by_index(state_dict: Dict[str, torch.Tensor], pattern: str) -> Dict[int, Dict[int, Dict[str, torch.Tensor]]]:
    """``{stage: {block: {rest of key: tensor}}}`` for timm keys matching ``pattern`` (groups: stage, block, rest)."""
    stages: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(pattern, key):
            stages.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = value
    return stages


def first_of_blocks(blocks: Dict[int, Dict[str, torch.Tensor]], name: str) -> Optional[torch.Tensor]:
    """``name`` of the first block holding it: one missing key must not hide a stage's sizes."""
    return next((blocks[j][name] for j in sorted(blocks) if name in blocks[j]), None)


def init_weights(module: nn.Module, name: str = '') -> None:
    """Published init: truncated-normal linears with zero bias (norms, convs, RPB init themselves)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
