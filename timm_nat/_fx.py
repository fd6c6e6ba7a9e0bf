"""torch.fx: the attention layers are timm FX leaves, and the attention call is one node for every tracer.

:mod:`timm_nat.layers` registers ``na2d``, its runtime padding and ViT-RPB's ``global_attention``
with ``torch.fx.wrap``, so any symbolic tracer (torchvision's ``create_feature_extractor`` with
its default tracer, plain ``torch.fx.symbolic_trace``) records them as single calls instead of
tracing into the backend choice and shape checks. On top of that the layers are registered with
timm's own mechanism (``register_notrace_module``), which every FX path in timm reads
(``create_model(..., features_only=True, feature_cls='fx')``, ``timm.models.create_feature_extractor``,
``timm.models.get_graph_node_names``): there each attention module stays one node, as timm keeps
its own attention modules whole.
"""
from timm.layers import register_notrace_module

from .layers import NeighborhoodAttention2d, RelPosGlobalAttention

FX_LEAF_MODULES = (NeighborhoodAttention2d, RelPosGlobalAttention)

for _module in FX_LEAF_MODULES:
    register_notrace_module(_module)
