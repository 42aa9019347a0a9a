"""grokviz: a JupyterLab workbench for the interpretability of Grok-1 style mixture-of-experts models.

Importing grokviz never imports plotly or ipywidgets (those live in ``grokviz.viz``).
"""

from . import hooks as hooks
from .api import Model as Model
from .api import Run as Run
from .api import validate_tokens as validate_tokens
from .cache import ActivationCache as ActivationCache
from .checkpoint import params_from_reference as params_from_reference
from .config import GrokConfig as GrokConfig
from .hooks import AttentionSpec as AttentionSpec
from .interventions import Interventions as Interventions
from .loading import load as load
from .model import forward as forward
from .params import Int8Weight as Int8Weight
from .params import count_params as count_params
from .params import init_params as init_params
from .params import param_shapes as param_shapes

HOOKS = hooks.REGISTRY  #: every registered hook point, by name
__version__ = "0.1.0"
