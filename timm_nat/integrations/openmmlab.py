"""timm-nat backbones in OpenMMLab configs (mmdetection 3.x, mmsegmentation 1.x).

``register_mmdet_backbone()`` (or ``register_mmseg_backbone()``) registers ``TimmNatBackbone`` in
that framework's ``MODELS`` registry, so a config says::

    backbone=dict(type='TimmNatBackbone', model_name='dinat_tiny.in1k', pretrained=True,
                  out_indices=(0, 1, 2, 3), frozen_stages=-1)

The backbone is ``timm.create_model(model_name, features_only=True, ...)``: any timm-nat name and
tag, extra keyword arguments passed through to timm, a tuple of NCHW stage maps out. Neither
mmengine nor the framework is imported before a register function is called (importing the
module ``timm_nat.integrations.mmdet_backbone`` calls ``register_mmdet_backbone()``, for a
config's ``custom_imports``). See docs/mmdetection.md.
"""
import copy
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

__all__ = ['BACKBONE_TYPE', 'TimmNatFeatures', 'register', 'register_mmdet_backbone', 'register_mmseg_backbone']

BACKBONE_TYPE = 'TimmNatBackbone'


class TimmNatFeatures(nn.Module):
    """A timm-nat ``features_only`` model with mmdetection's ``frozen_stages`` (plain torch).

    ``frozen_stages`` follows mmdetection's Swin: -1 freezes nothing, 0 the stem, ``n`` the stem
    and the first ``n`` stages (each with the downsampler at its start). Frozen parts get no
    gradients and stay in eval mode through ``train()``.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            pretrained: bool = False,
            frozen_stages: int = -1,
            **model_kwargs: Any,
    ):
        """
        Args:
            model_name: A timm-nat model name, optionally with a tag (``'dinat_tiny.in1k'``).
            out_indices: Stages whose outputs are returned.
            pretrained: Load the tag's weights through timm.
            frozen_stages: -1 (none), 0 (stem) or ``n`` (stem and stages ``0..n-1``).
            **model_kwargs: Passed to ``timm.create_model`` (``drop_path_rate``, ``pretrained_cfg_overlay``, ...).
        """
        super().__init__()
        self.model = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **model_kwargs)
        self.frozen_stages = frozen_stages
        self._frozen = self._frozen_parts(frozen_stages)
        for part in self._frozen:
            part.requires_grad_(False)
        self.train()

    def _frozen_parts(self, frozen_stages: int) -> List[nn.Module]:
        """The stem and the first ``frozen_stages`` stages of the wrapped model."""
        net = self.model.model  # timm's FeatureGetterNet keeps the (pruned) model as 'model'
        stages = net.stages if hasattr(net, 'stages') else net.blocks  # isotropic models have blocks
        valid = isinstance(frozen_stages, int) and not isinstance(frozen_stages, bool)
        if not valid or not -1 <= frozen_stages <= len(stages):
            raise ValueError(
                f'frozen_stages={frozen_stages!r}: expected an int from -1 (none) to {len(stages)} '
                f'(the stages this backbone keeps for out_indices={tuple(self.model.out_indices)})')
        return [] if frozen_stages < 0 else [net.patch_embed, *stages[:frozen_stages]]

    def train(self, mode: bool = True) -> 'TimmNatFeatures':
        """Set the mode, keeping frozen parts in eval mode (their dropout and drop path stay off)."""
        super().train(mode)
        for part in self._frozen:
            part.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """NCHW stage maps for ``out_indices``, as a tuple (what mmdetection necks take)."""
        return tuple(self.model(x))

    @property
    def channels(self) -> List[int]:
        """Channels of the returned maps: a neck's ``in_channels``."""
        return self.model.feature_info.channels()


def _import_registry(module: str, package: str):
    """``MODELS`` of ``module`` (an OpenMMLab ``*.registry``), or an ImportError naming what to install."""
    try:
        import mmengine  # noqa: F401  (the base class comes from mmengine)
        return __import__(module, fromlist=['MODELS']).MODELS
    except ImportError as e:
        raise ImportError(
            f'registering {BACKBONE_TYPE} needs mmengine and {package} (with mmcv), which are not importable ({e}); '
            f'pip install mmengine {package}, and mmcv as docs/mmdetection.md says (on current torch its C++ ops '
            'need a C++20 build)') from e


@functools.lru_cache(maxsize=None)
def _backbone_class() -> type:
    """``TimmNatBackbone``: ``TimmNatFeatures`` as an mmengine ``BaseModule`` (built on first use)."""
    from mmengine.model import BaseModule

    class TimmNatBackbone(TimmNatFeatures, BaseModule):
        """A timm-nat ``features_only`` backbone for OpenMMLab configs (see :class:`TimmNatFeatures`).

        Weights come from timm (``pretrained`` with a tagged ``model_name``, or a file through
        ``pretrained_cfg_overlay=dict(file=...)``). ``init_cfg=dict(type='Pretrained', checkpoint=...,
        prefix='backbone.')`` instead loads this backbone's own keys from an OpenMMLab checkpoint (a
        detector trained with it); it cannot be combined with ``pretrained=True``.
        """

        def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: bool = False,
                     frozen_stages: int = -1, init_cfg: Optional[Dict[str, Any]] = None, **model_kwargs: Any):
            if init_cfg is not None and pretrained:
                raise ValueError(
                    f'{BACKBONE_TYPE}: pretrained=True loads weights through timm and init_cfg={init_cfg!r} would '
                    'overwrite them; give one of the two')
            # TimmNatFeatures' super().__init__() reaches BaseModule.__init__ without init_cfg: set it after
            super().__init__(model_name, out_indices, pretrained, frozen_stages, **model_kwargs)
            self.init_cfg = copy.deepcopy(init_cfg)

        def init_weights(self) -> None:
            """Apply ``init_cfg`` if given; otherwise keep timm's weights (pretrained or timm's own init)."""
            if self.init_cfg is not None:
                super().init_weights()
            self._is_init = True

    return TimmNatBackbone


def register(registry) -> type:
    """Register ``TimmNatBackbone`` in an mmengine ``Registry`` (a framework's ``MODELS``); returns the class.

    Registering again is a no-op.
    """
    cls = _backbone_class()
    if registry.module_dict.get(BACKBONE_TYPE) is not cls:
        registry.register_module(name=BACKBONE_TYPE, module=cls, force=True)
    return cls


def register_mmdet_backbone() -> type:
    """Register ``TimmNatBackbone`` with mmdetection 3.x (``mmdet.registry.MODELS``); returns the class.

    Raises ImportError naming what to install when mmdetection or mmengine is missing.
    """
    return register(_import_registry('mmdet.registry', 'mmdet'))


def register_mmseg_backbone() -> type:
    """Register ``TimmNatBackbone`` with mmsegmentation 1.x (``mmseg.registry.MODELS``); returns the class.

    Raises ImportError naming what to install when mmsegmentation or mmengine is missing.
    """
    return register(_import_registry('mmseg.registry', 'mmsegmentation'))
