"""timm model families of timm-nat (one module each, its checkpoint layouts beside the model);
importing this registers them with timm."""
from .nat import *  # noqa: F401,F403  (registers nat_* / dinat_* with timm)
from .dinat_s import *  # noqa: F401,F403  (registers dinat_s_* with timm)
from .isotropic import *  # noqa: F401,F403  (registers nat_isotropic_* / dinat_isotropic_* / vitrpb_* with timm)
from . import dinat_s, isotropic, nat
from .nat import Nat, checkpoint_filter_fn
