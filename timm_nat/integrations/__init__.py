"""Bridges from timm-nat to frameworks that build models from their own registries.

Each bridge imports its framework only when asked to register (``openmmlab``: mmdetection and
mmsegmentation), so importing ``timm_nat`` or this package never needs them.
"""
