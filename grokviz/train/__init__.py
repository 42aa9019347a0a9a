"""Training any Grok-architecture config with optax AdamW, on the same forward pass the workbench runs.

* :mod:`.config`         :class:`TrainConfig`, the ``tiny`` / ``quick`` presets;
* :mod:`.data`           the shipped corpus as resumable random batches (:func:`load_data`);
* :mod:`.step`           losses (cross-entropy + load balancing + router z-loss), optimiser, jitted steps;
* :mod:`.checkpointing`  atomic training checkpoints and the checks that make resuming safe;
* :mod:`.loop`           :func:`train`: progress bar, logging, evaluation, checkpoints, exact resume;
* :mod:`.export`         the trained model in grokviz's converted format (``gv.load(folder)`` opens it);
* :mod:`.cli`            ``grokviz train``.

Python use (the teaching notebook)::

    from grokviz.train import train, PRESETS, load_data
    cfg, tc = PRESETS["quick"]          # 2 layers, d_model 64, 8 experts top-2; 400 steps of 16 x 64 tokens
    params, hist = train(cfg, load_data(), tc=tc, aux_coef=0.0)   # hist["expert_load"]: [step][layer][expert]
    params, hist = train(cfg, load_data(), tc=tc, aux_coef=0.1)   # same compiled step, balanced routing

Expert implementation: training needs reverse-mode differentiation through the experts; if the configured
``expert_impl`` cannot be differentiated, :func:`differentiable_impl` falls back to ``"dense"`` with a warning.
"""

from .checkpointing import TrainCheckpointError as TrainCheckpointError
from .checkpointing import load_checkpoint as load_checkpoint
from .checkpointing import save_checkpoint as save_checkpoint
from .cli import cli_main as cli_main
from .config import ASSETS as ASSETS
from .config import PRESETS as PRESETS
from .config import TOKENIZER_PATH as TOKENIZER_PATH
from .config import TrainConfig as TrainConfig
from .config import quick_config as quick_config
from .config import tiny_config as tiny_config
from .data import TokenData as TokenData
from .data import load_data as load_data
from .export import save_model as save_model
from .loop import train as train
from .step import CAPTURE as CAPTURE
from .step import compiled as compiled
from .step import differentiable_impl as differentiable_impl
from .step import evaluate as evaluate
from .step import expert_counts as expert_counts
from .step import loss_fn as loss_fn
from .step import make_optimizer as make_optimizer
from .step import router_losses as router_losses

_compiled = compiled  # the name earlier versions (and their notebooks) used
