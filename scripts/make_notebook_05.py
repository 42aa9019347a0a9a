"""Writes notebooks/05_grok1_at_scale.ipynb (outputs stripped, stable cell ids).

Run: .venv/bin/python scripts/make_notebook_05.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by path
import _notebook  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "notebooks" / "05_grok1_at_scale.ipynb"

CELLS = [
    ("md", """
# Grok-1 at scale: real weights, safely

This notebook walks through everything needed to go from the released Grok-1 checkpoint (about 300 GB of
pickles, int8 weights) to a sharded grokviz model: **load** it without executing anything from the pickles,
**inspect** it, **convert** it to safetensors with hashes, **verify** it, **plan** memory for 8 devices, and
**run** it.

Here it runs on `tests/data/grok1_golden_ckpt`, a 2-layer model written in exactly the release's format by the
official code. To use the real checkpoint, point `CHECKPOINT` at its `checkpoints/` directory (the one holding
`ckpt-0/`) and set `CONFIG = None` (Grok-1 is recognised from the shapes)."""),
    ("code", """
from pathlib import Path
import json, tempfile
import numpy as np
import grokviz as gv
from grokviz.checkpoint import converted as cv
from grokviz.sharding import plan_memory

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
CHECKPOINT = REPO / "tests" / "data" / "grok1_golden_ckpt"   # <- the real one: /path/to/grok-1/checkpoints
# the release format does not record how the query width splits into heads: give the config for non-Grok-1 sizes
golden = np.load(REPO / "tests" / "data" / "grok1_golden.npz")
CONFIG = json.loads(str(golden["config_json"]))            # <- None for the real Grok-1"""),
    ("md", """
## 1. Inspect before loading

`inspect` reports the format, what the shapes say about the model, and the bytes on disk. For the release it
reads only the embedding and layer-0 files."""),
    ("code", """
info = cv.inspect(CHECKPOINT)
{k: v for k, v in info.items() if k != "config"}"""),
    ("md", """
## 2. Load safely, keeping int8 in memory

Each `tensor{i:05d}_000` file is a pickle. grokviz unpickles with an allow-list: numpy arrays and dtypes,
`bfloat16`, and the release's `QuantizedWeight8bit` (mapped to `gv.Int8Weight`). Anything else is refused with
an error naming the file and the class, before it could run. Files are checked (count, sizes against the
config) before anything is read, then read one at a time. Files map to layers in *lexicographic* order
(0, 1, 10, 11, ..., 2, ...), as the reference's sorted keys do.

With `quantized=True` the seven quantised matrices stay int8 (+ bf16 scales) and are dequantised inside each
matmul: the only form in which the full model fits on 8 x 80 GB."""),
    ("code", """
model = gv.load(CHECKPOINT, config=CONFIG, quantized=True)
w = model.params["blocks"]["w_gate"]
print(model)
print(type(w).__name__, w.weight.dtype, w.weight.shape, "scales", w.scales.dtype, w.scales.shape)"""),
    ("md", """
## 3. It reproduces the reference

The golden logits come from the official Grok-1 code on the same weights."""),
    ("code", """
run = model.run(golden["tokens"])
print("max |logits - reference| =", float(np.abs(np.asarray(run.logits) - golden["logits"]).max()))"""),
    ("md", """
## 4. What a malicious checkpoint gets

A pickle can name any importable function and have it called on load. Here one tries `os.system`; the
restricted unpickler refuses it, and the marker file it would create does not appear."""),
    ("code", """
import os, pickle
from grokviz.checkpoint.release import read_tensor, UnsafePickleError

class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/grokviz_pwned",))

bad = Path(tempfile.mkdtemp()) / "tensor00000_000"
bad.write_bytes(pickle.dumps(Evil()))
try:
    read_tensor(bad)
except UnsafePickleError as e:
    print("refused:", str(e)[:160], "...")
print("marker exists:", Path("/tmp/grokviz_pwned").exists())"""),
    ("md", """
## 5. Convert to safetensors, with a hash per file

`convert` streams the release one tensor at a time into safetensors shards plus an index (SHA-256 and size of
every file) and a `config.json`. It writes into a temporary directory and renames it into place at the end, so
an interrupted conversion never leaves a half-written checkpoint (nor, with `--overwrite`, loses the old one).
Shell: `grokviz convert SRC DST`."""),
    ("code", """
work = Path(tempfile.mkdtemp())
dst = cv.convert(CHECKPOINT, work / "grok1-converted", config=CONFIG)
sorted(p.name for p in dst.iterdir())"""),
    ("md", """
## 6. Verify and reload (no config needed, memory-mapped)

`verify` re-hashes every file against the index and names any that differ (`grokviz verify PATH`). A converted
checkpoint carries its config, and its shards are memory-mapped when read. The round trip is bit-exact."""),
    ("code", """
print(len(cv.verify(dst)), "files verified")
model2 = gv.load(dst, verify=True)
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(__import__("jax").tree_util.tree_leaves(model.params),
                           __import__("jax").tree_util.tree_leaves(model2.params)))
print("bit-exact round trip:", same)"""),
    ("md", """
The release records no hashes, and its format cannot itself detect two same-shaped tensors swapped between
files (each pickle holds only its array). `grokviz manifest PATH --write` (or
`grokviz.checkpoint.manifest.write_manifest`) hashes every file in `sha256sum` format and records
`MANIFEST.sha256` next to `ckpt-0/` (atomically); do it on a trusted copy, or compare it with published
checksums. `gv.load(..., verify=True)` and `grokviz verify PATH` then check every tensor file against it; with no
manifest there is nothing to verify against, and both fail rather than pass."""),
    ("code", """
import shutil
from grokviz.checkpoint.manifest import verify_release, write_manifest

copy = Path(tempfile.mkdtemp()) / "release"
shutil.copytree(CHECKPOINT, copy)
print(write_manifest(copy).read_text().splitlines()[0])
print(len(verify_release(copy)), "tensor files match the manifest")
model3 = gv.load(copy, config=CONFIG, verify=True, progress=False)"""),
    ("md", """
## 7. Memory plan for the full Grok-1 on 8 devices

Computed from shapes only (nothing is allocated), with the reference's partition specs over a
`("data", "model")` mesh. Shell: `grokviz inspect grok-1 --plan --devices 8 --dtype int8`."""),
    ("code", """
plan = plan_memory(gv.GrokConfig.grok1(), (1, 8), "int8")
print(plan.table())
bf16 = plan_memory(gv.GrokConfig.grok1(), (1, 8), 'bf16')
print(f"bf16 instead: {bf16.per_device_bytes / 1e9:.1f} GB per device")"""),
    ("md", """
## 8. Running sharded

On a machine with 8 accelerators, `gv.load(CHECKPOINT, mesh=make_mesh((1, 8)))` places every tensor straight
onto its shards as it is read (host memory holds one tensor at a time). Here there may be only one device, so
the mesh below uses what is available; the logits match the unsharded run."""),
    ("code", """
import jax
from grokviz.sharding import make_mesh

n = len(jax.devices())
mesh = make_mesh((1, n))
sharded = gv.load(CHECKPOINT, config=CONFIG, mesh=mesh, progress=False)
err = np.abs(np.asarray(sharded.run(golden["tokens"]).logits) - np.asarray(run.logits)).max()
print(f"{n} device(s): max |sharded - unsharded| = {float(err):.2e}")"""),
    ("md", """
On several hosts, each should read only the bytes of its own devices' shards: `grokviz.distributed.sharded.load`
parses every pickle's opcodes (the same safety checks as above) to find where each array's bytes lie, then reads
only each local shard's byte ranges, and reports how many bytes it read. In one process it reads everything once;
with 2 processes over a `(2, 4)` mesh each reads about half (`tests/test_distributed.py`)."""),
    ("code", """
from grokviz.distributed import sharded as dsh

by_shard, reads = dsh.load(CHECKPOINT, mesh, config=CONFIG)
logits = [np.asarray(m.run(golden["tokens"]).logits) for m in (by_shard, sharded)]
same = np.array_equal(*logits)
print(reads, "| same logits as gv.load:", same)"""),
    ("md", """
## 9. Text in, logits out

With the real checkpoint, put the release's `tokenizer.model` next to `ckpt-0/` (or pass `tokenizer=`), then
`model.run("The answer to life the universe and everything is of course")` works directly: encoding is the
runner's (no BOS, pad 0)."""),
    ("code", """
from grokviz.tokenizer import find_grok1_tokenizer

path = find_grok1_tokenizer()
if path is not None:
    from grokviz.tokenizer import Tokenizer
    tok = Tokenizer(path)
    print(tok, tok.encode("The answer to life the universe and everything is of course"))
else:
    print("Grok-1 tokenizer not found (set $GROKVIZ_GROK1_TOKENIZER)")"""),
    ("md", """
## 10. Routing statistics over a dataset, as a job

Statistics worth citing need many tokens. `grokviz study SPEC` runs a small TOML/JSON spec (model, dataset,
batch size, what to collect) as a job: data-parallel over every process of a `jax.distributed` job (or in one
process, as here), with integer counts reduced exactly and float sums added in global batch order, so any number
of processes gives **bit-identical** results. Progress is checkpointed atomically after every round; a job killed
at any point (even with `SIGKILL`) resumes where it stopped, with the same or another number of processes, and ends
with the same results. The results are one `.npz` file that `grokviz.study.load` turns back into the
`RoutingStats` of `grokviz.analysis`.

Here: the bundled tiny model over the start of the corpus's held-out split."""),
    ("code", """
import subprocess, sys
from grokviz import study

runs = Path(tempfile.mkdtemp())
spec_path = runs / "tiny_validation.toml"
spec_path.write_text('''
model = "tiny"
output = "tiny_validation.npz"
batch_size = 4
max_len = 64
batches_per_round = 2
collect = ["routing", "top_tokens"]
[dataset]
corpus = "validation"
limit = 2
''')
one = study.run(spec_path, progress=False)          # in this process
one.routing.summary().round(3)"""),
    ("md", """
The same spec with 2 local processes of 2 CPU devices each: `grokviz launch` starts them with a coordinator on
127.0.0.1 and gloo collectives, forwards their output prefixed `[p0]`/`[p1]`, and fails within a few seconds,
naming the process and what it was doing, if one dies or never joins. The counts and sums are identical."""),
    ("code", """
spec2 = runs / "two.toml"
spec2.write_text(spec_path.read_text().replace("tiny_validation.npz", "two_processes.npz"))
job = subprocess.run([sys.executable, "-m", "grokviz.cli", "launch", "-n", "2", "--devices-per-process", "2", "--",
                      "grokviz", "study", str(spec2), "--quiet"], capture_output=True, text=True)
print("exit status", job.returncode, job.stderr[-500:])
two = study.load(runs / "two_processes.npz")
print("2 processes == 1 process, bit for bit:", two.same_as(one), f"({two.routing.n_tokens:,} tokens)")"""),
    ("md", """
### The study's results in the load dashboard

`result.routing` is a `RoutingStats`. `ExpertLoadDashboard.from_stats` opens the load dashboard on it: the same
plots and controls as for one batch (load share per layer, one layer's bars against uniform, co-activation,
consecutive-token rates against random routing), here from the exact counts of the whole dataset. The
first-choice flows between layers go into the routing views' Sankey figure."""),
    ("code", """
from grokviz.viz import ExpertLoadDashboard
from grokviz.viz import load_figures as LF

st = study.load(runs / "tiny_validation.npz").routing
layer = 1
ExpertLoadDashboard.from_stats(st, cfg=gv.load("tiny", progress=False).cfg, layer=layer)"""),
    ("code", """
LF.routing_sankey(list(st.flow)).show()"""),
    ("code", """
st.top_tokens(k=5).head(8)"""),
    ("md", """
Next to the dataset-level figures, the interactive views show one document token by token: which experts it
uses, and whether the dataset's busiest expert at that layer dominates it too."""),
    ("code", """
from grokviz.viz import RoutingExplorer

tiny = gv.load("tiny", progress=False)
doc = study.load_spec(spec_path).documents()[0]["text"][:300]
busiest = int(np.argmax(st.load[layer]))
print(f"layer {layer}: busiest expert over the dataset is {busiest} "
      f"({100 * st.load_share()[layer, busiest]:.1f} % of the routed slots)")
ExpertLoadDashboard(tiny, doc, layer=layer)"""),
    ("code", """
RoutingExplorer(tiny, doc, layer=layer)"""),
    ("md", """
### On a cluster

The spec does not change. Every process runs `grokviz study SPEC` (the output folder must be shared; only
process 0 writes); `grokviz.distributed.initialize()` finds the job from the environment:

* **SLURM**: `srun --nodes 2 --ntasks-per-node 1 grokviz study spec.toml` (JAX reads the `SLURM_*` variables;
  one task per host, with all its GPUs).
* **Kubernetes, or anything else**: set `GROKVIZ_COORDINATOR=host0:port`, `GROKVIZ_NUM_PROCESSES` and
  `GROKVIZ_PROCESS_ID` in each pod (an indexed Job gives the index), or pass them to
  `grokviz.distributed.initialize(coordinator, num_processes, process_id)`.

A process that dies takes the job down within about twice the heartbeat timeout (`GROKVIZ_HEARTBEAT_S`, default
10 s); rerun the same command (with as many processes as are available) and it resumes from the progress file.
For a model larger than one host, add `mesh = [data, model]` to the spec (`data * model` = every device of every
process): the model is then placed on that mesh by `grokviz.distributed.sharded.load` (release pickles, converted
safetensors or a Hugging Face folder, MXFP4 included), each host reading only the bytes of its own devices' shards,
and every batch runs on the whole mesh. The counts are those of the one-process run. In code:
`model, reads = grokviz.distributed.sharded.load(path, grokviz.distributed.global_mesh((hosts, devices)))`;
`grokviz inspect --plan grok-1 --hosts 2 --devices 8` gives the memory per device and per host."""),
]


def build():
    return _notebook.build(CELLS, "nb05")


if __name__ == "__main__":
    _notebook.write(build(), OUT)
