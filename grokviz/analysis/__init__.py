"""grokviz.analysis: captures -> the numbers researchers report (numpy arrays and tidy pandas tables).

* :mod:`.routing`      expert load, entropy, gate mass, co-activation, consecutive-token rates with their random
                       baselines, routing paths
* :mod:`.specialisation` what each expert's tokens are made of (token class / domain) and the tokens it prefers
* :mod:`.attention`    per-head entropy, first-token mass, previous-token score, soft-cap binding, GQA groups
* :mod:`.attribution`  logit lens; direct logit attribution of attention and of each expert's gated output
* :mod:`.experts`      counterfactual expert outputs and their DLA, per-expert logit lens, single-expert
                       substitution
* :mod:`.fragility`    routing fragility: top-k margins and selection flips under bf16 / int8 / input noise
* :mod:`.patching`     ablation sweeps over (layer, expert | head) reusing the prefix and vmapping; activation and
                       routing patching between two prompts
* :mod:`.steering`     detect then steer: per-expert activation-rate differences between two sets of texts with
                       intervals, a router-bias steering intervention, its measured effect
* :mod:`.traces`       vLLM / SGLang routed-expert traces: read, check, replay as forced routing, compare
* :mod:`.common`       prediction pairs, last real positions, one-token ids, next-token log-probs, loss and KL
* :mod:`.dataset`      batched runners over many texts with streaming aggregates (default: the bundled corpus's
                       validation split)
"""

from . import attention as attention
from . import attribution as attribution
from . import common as common
from . import dataset as dataset
from . import experts as experts
from . import fragility as fragility
from . import patching as patching
from . import routing as routing
from . import specialisation as specialisation
from . import steering as steering
from . import traces as traces
from .common import last_real_position as last_real_position
from .common import next_token_kl as next_token_kl
from .common import next_token_logprobs as next_token_logprobs
from .common import next_token_loss as next_token_loss
from .common import prediction_pairs as prediction_pairs
from .common import token_id as token_id
from .dataset import attention_stats as attention_stats
from .dataset import batches as batches
from .dataset import routing_stats as routing_stats
from .experts import counterfactual_dla as counterfactual_dla
from .experts import counterfactual_table as counterfactual_table
from .experts import expert_lens as expert_lens
from .experts import expert_outputs as expert_outputs
from .experts import single_expert_substitution as single_expert_substitution
from .experts import top_expert_agreement as top_expert_agreement
from .fragility import routing_fragility as routing_fragility
from .fragility import selection_flips as selection_flips
from .fragility import topk_margin as topk_margin
from .patching import ablation_sweep as ablation_sweep
from .patching import activation_patching as activation_patching
from .patching import patch_sweep as patch_sweep
from .patching import routing_patching as routing_patching
from .routing import coactivation as coactivation
from .routing import consecutive_baselines as consecutive_baselines
from .routing import consecutive_rates as consecutive_rates
from .routing import expert_load as expert_load
from .routing import gate_mass as gate_mass
from .routing import load_baseline_cv as load_baseline_cv
from .routing import load_cv as load_cv
from .routing import load_share as load_share
from .routing import paths_frame as paths_frame
from .routing import router_z_loss as router_z_loss
from .routing import routing_entropy as routing_entropy
from .routing import routing_flow as routing_flow
from .routing import routing_paths as routing_paths
from .routing import routing_summary as routing_summary
from .routing import switch_aux_loss as switch_aux_loss
from .specialisation import TOKEN_CLASSES as TOKEN_CLASSES
from .specialisation import expert_specialisation as expert_specialisation
from .specialisation import group_expert_counts as group_expert_counts
from .specialisation import token_class as token_class
from .specialisation import token_expert_counts as token_expert_counts
from .specialisation import top_tokens as top_tokens
from .specialisation import vocab_classes as vocab_classes
from .steering import detect as detect
from .steering import detect_tokens as detect_tokens
from .steering import steered_generation as steered_generation
from .steering import steering_effect as steering_effect
from .traces import read_sglang as read_sglang
from .traces import read_vllm as read_vllm
from .traces import replay as replay
