"""grokviz.viz: plotly figures and ipywidgets views (imported explicitly; ``import grokviz`` never loads them).

* :mod:`.figures`  pure builders, numpy data -> ``go.Figure``
* :mod:`.widgets`  RoutingExplorer, ExpertLoadDashboard, AttentionExplorer, AblationLab, RoutingFlow, export_html
* :mod:`.theme`    template and the expert colour map
"""

from . import figures as figures, theme as theme
from .theme import expert_color as expert_color
from .widgets import (AblationLab as AblationLab, AttentionExplorer as AttentionExplorer,
                      ExpertLoadDashboard as ExpertLoadDashboard, RoutingExplorer as RoutingExplorer,
                      RoutingFlow as RoutingFlow, export_html as export_html)
