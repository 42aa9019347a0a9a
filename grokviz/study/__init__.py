"""Dataset-scale routing studies as jobs: ``grokviz study SPEC`` (or :func:`run` in a notebook).

::

    from grokviz import study

    result = study.run("examples/study_validation.toml")   # one process, or every process of a job
    result.routing.summary()                               # a grokviz.analysis RoutingStats
    result = study.load("runs/validation.npz")             # what the job wrote

A spec (:mod:`.spec`) names the model, the dataset, the batch size and what to collect. The job runs
data-parallel over the processes of a ``jax.distributed`` job (``grokviz launch -n 2 -- grokviz study SPEC``
on one machine; SLURM / Kubernetes: see the README's "Multi-host runs"), reduces the statistics exactly
(integer counts as int64; float sums in global batch order, so any process count gives bit-identical results),
checkpoints its progress after every round and resumes from it (with any process count) after a kill. See
:mod:`.runner` for the work assignment and the reduction.
"""

from .results import StudyResult as StudyResult
from .results import load as load
from .runner import prepare as prepare
from .runner import run as run
from .spec import Spec as Spec
from .spec import load_spec as load_spec
