"""torch.fx leaves: the attention layers are traced as single calls, never through.

Their forward pads by the runtime map size and dispatches ``na2d`` to a backend chosen from the
input (device, dtype, RPB), so symbolic tracing cannot follow it. Registered with timm's own
mechanism (``register_notrace_module``), which every FX path in timm reads:
``create_model(..., features_only=True, feature_cls='fx')``, ``timm.models.create_feature_extractor``
and ``timm.models.get_graph_node_names``. torchvision's ``create_feature_extractor`` takes the same
list through ``tracer_kwargs={'leaf_modules': timm.models.get_notrace_modules()}``.
"""
from timm.layers import register_notrace_module

from .layers import NeighborhoodAttention2d, RelPosGlobalAttention

FX_LEAF_MODULES = (NeighborhoodAttention2d, RelPosGlobalAttention)

for _module in FX_LEAF_MODULES:
    register_notrace_module(_module)
