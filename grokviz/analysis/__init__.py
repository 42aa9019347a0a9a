"""grokviz.analysis: captures -> the numbers researchers report (numpy arrays and tidy pandas tables).

* :mod:`.routing`      expert load, entropy, gate mass, co-activation, consecutive-token rates and baselines, paths
"""

from . import routing as routing
from .routing import (coactivation as coactivation, consecutive_baselines as consecutive_baselines,
                      consecutive_rates as consecutive_rates, expert_load as expert_load, gate_mass as gate_mass,
                      load_cv as load_cv, load_share as load_share, router_z_loss as router_z_loss,
                      routing_entropy as routing_entropy, routing_flow as routing_flow,
                      routing_paths as routing_paths, routing_summary as routing_summary,
                      switch_aux_loss as switch_aux_loss)
