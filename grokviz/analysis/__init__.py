"""grokviz.analysis: captures -> the numbers researchers report (numpy arrays and tidy pandas tables).

* :mod:`.routing`      expert load, entropy, gate mass, co-activation, consecutive-token rates with their random
                       baselines, routing paths, specialisation by token class / domain, preferred tokens
* :mod:`.attention`    per-head entropy, first-token mass, previous-token score, soft-cap binding, GQA groups
* :mod:`.attribution`  logit lens; direct logit attribution of attention and of each expert's gated output
* :mod:`.patching`     ablation sweeps over (layer, expert | head) reusing the prefix and vmapping; activation and
                       routing patching between two prompts
* :mod:`.dataset`      batched runners over many texts with streaming aggregates (default: the bundled corpus's
                       validation split)
"""

from . import attention as attention
from . import attribution as attribution
from . import dataset as dataset
from . import patching as patching
from . import routing as routing
from .dataset import attention_stats as attention_stats, batches as batches, routing_stats as routing_stats
from .patching import (ablation_sweep as ablation_sweep, activation_patching as activation_patching,
                       patch_sweep as patch_sweep, routing_patching as routing_patching)
from .routing import (coactivation as coactivation, consecutive_baselines as consecutive_baselines,
                      consecutive_rates as consecutive_rates, expert_load as expert_load, gate_mass as gate_mass,
                      load_cv as load_cv, load_share as load_share, router_z_loss as router_z_loss,
                      routing_entropy as routing_entropy, routing_flow as routing_flow,
                      routing_paths as routing_paths, routing_summary as routing_summary,
                      switch_aux_loss as switch_aux_loss)
