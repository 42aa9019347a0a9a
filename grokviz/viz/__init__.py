"""grokviz.viz: plotly figures and ipywidgets views (imported explicitly; ``import grokviz`` never loads them).

* :mod:`.figures`             pure builders, numpy data -> ``go.Figure``
* :mod:`.theme`               template and the expert colour map
* :mod:`.base`                what the views share (Run handling, FigureWidgets, one redraw per change)
* :mod:`.routing_explorer`    RoutingExplorer
* :mod:`.load_dashboard`      ExpertLoadDashboard
* :mod:`.attention_explorer`  AttentionExplorer
* :mod:`.ablation_lab`        AblationLab
* :mod:`.routing_flow`        RoutingFlow
* :mod:`.generation_explorer` GenerationExplorer (figures in :mod:`.generation_figures`)
* :mod:`.fragility`           FragilityView and the routing-fragility figures
* :mod:`.steering_figures`    detect-then-steer figures (activation-rate differences, ranked experts, effect)
* :mod:`.export`              export_html
"""

from . import figures as figures
from . import theme as theme
from .ablation_lab import AblationLab as AblationLab
from .attention_explorer import AttentionExplorer as AttentionExplorer
from .export import export_html as export_html
from .fragility import FragilityView as FragilityView
from .generation_explorer import GenerationExplorer as GenerationExplorer
from .load_dashboard import ExpertLoadDashboard as ExpertLoadDashboard
from .routing_explorer import RoutingExplorer as RoutingExplorer
from .routing_flow import RoutingFlow as RoutingFlow
from .theme import expert_color as expert_color
