"""grokviz.analysis: captures -> the numbers researchers report (numpy arrays and tidy pandas tables).

* :mod:`.routing`      expert load, entropy, gate mass, co-activation, consecutive-token rates with their random
                       baselines, routing paths
* :mod:`.specialisation` what each expert's tokens are made of (token class / domain) and the tokens it prefers
* :mod:`.attention`    per-head entropy, first-token mass, previous-token score, soft-cap binding, GQA groups
* :mod:`.attribution`  logit lens; direct logit attribution of attention and of each expert's gated output
* :mod:`.patching`     ablation sweeps over (layer, expert | head) reusing the prefix and vmapping; activation and
                       routing patching between two prompts
* :mod:`.common`       prediction pairs, last real positions, one-token ids, next-token log-probs, loss and KL
* :mod:`.dataset`      batched runners over many texts with streaming aggregates (default: the bundled corpus's
                       validation split)
"""

from . import attention as attention
from . import attribution as attribution
from . import common as common
from . import dataset as dataset
from . import patching as patching
from . import routing as routing
from . import specialisation as specialisation
from .common import (last_real_position as last_real_position, next_token_kl as next_token_kl,
                     next_token_logprobs as next_token_logprobs, next_token_loss as next_token_loss,
                     prediction_pairs as prediction_pairs, token_id as token_id)
from .dataset import attention_stats as attention_stats, batches as batches, routing_stats as routing_stats
from .patching import (ablation_sweep as ablation_sweep, activation_patching as activation_patching,
                       patch_sweep as patch_sweep, routing_patching as routing_patching)
from .routing import (coactivation as coactivation, consecutive_baselines as consecutive_baselines,
                      consecutive_rates as consecutive_rates, expert_load as expert_load, gate_mass as gate_mass,
                      load_cv as load_cv, load_share as load_share, router_z_loss as router_z_loss,
                      load_baseline_cv as load_baseline_cv, paths_frame as paths_frame,
                      routing_entropy as routing_entropy, routing_flow as routing_flow,
                      routing_paths as routing_paths, routing_summary as routing_summary,
                      switch_aux_loss as switch_aux_loss)
from .specialisation import (TOKEN_CLASSES as TOKEN_CLASSES, expert_specialisation as expert_specialisation,
                             group_expert_counts as group_expert_counts,
                             token_class as token_class, token_expert_counts as token_expert_counts,
                             top_tokens as top_tokens, vocab_classes as vocab_classes)
