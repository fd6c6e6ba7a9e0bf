"""Importing this module registers ``TimmNatBackbone`` with mmdetection (for a config's
``custom_imports = dict(imports=['timm_nat.integrations.mmdet_backbone'])``)."""
from .openmmlab import register_mmdet_backbone

register_mmdet_backbone()
