"""Writes notebooks/07_other_moe_families.ipynb (outputs stripped, stable cell ids).

Run: .venv/bin/python scripts/make_notebook_07.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by path
import _notebook  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "notebooks" / "07_other_moe_families.ipynb"

CELLS = [
    ("md", """
# Other MoE families: OLMoE, Qwen-MoE, Mixtral, Granite, gpt-oss

`gv.load` opens a Hugging Face checkpoint folder (`config.json` + `model.safetensors` or its shards) of six MoE
families and runs it through the same forward pass, hooks, interventions and analysis as Grok-1. This notebook
loads one folder per family, prints each configuration, compares their routing statistics with what uniformly
random routing would give, and runs the same ablation (remove one expert at one layer) in two families.

**What runs here.** By default the folders are the golden test models bundled in `tests/data/hf/`: tiny
*random* models (2 layers, width 64, 8 or 16 experts) saved by transformers for grokviz's tests. Their routing
is that of random weights, so the numbers below show how to measure, not what trained models do. To study a
real model, download it (for example `allenai/OLMoE-1B-7B-0924` or `Qwen/Qwen1.5-MoE-A2.7B`) and put its
folder in `FOLDERS`; weights stay in their stored dtype (bf16: 2 bytes per parameter, about 14 GB for OLMoE's
7B parameters and 29 GB for Qwen1.5-MoE's 14B)."""),
    ("code", """
from pathlib import Path
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import grokviz as gv
from grokviz import analysis as A
from grokviz import viz
from grokviz.viz import figures as F

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss"]
FOLDERS = {f: REPO / "tests" / "data" / "hf" / f for f in FAMILIES}
# a real checkpoint instead, e.g.:
# FOLDERS = {"olmoe": "/path/to/OLMoE-1B-7B-0924", "qwen2_moe": "/path/to/Qwen1.5-MoE-A2.7B"}

models = {name: gv.load(path, progress=False) for name, path in FOLDERS.items()}
for name, m in models.items():
    print(f"{name:11s} {m.cfg.describe()}")"""),
    ("md", """
## 1. What makes each family different

The families share one forward pass; they differ in configuration fields: norm placement, QK-norm, biases,
attention sinks and sliding windows, and, for routing, the **gate rule**. `softmax_topk` takes the top-k of the
softmax over all experts (the gates are those probabilities, renormalised to sum to 1 when
`router_renormalize`); `topk_softmax` takes the top-k logits and softmaxes over those k only."""),
    ("code", """
fields = ["router_rule", "router_renormalize", "router_bias", "num_experts", "top_k", "shared_expert_ffn",
          "qk_norm", "attn_sinks", "expert_act", "tie_embeddings"]
pd.DataFrame({name: {f: getattr(m.cfg, f) for f in fields} for name, m in models.items()}).T"""),
    ("md", """
## 2. Routing statistics against random routing

Every model reads the same texts (the golden folders share one tokenizer; a real checkpoint brings its own).
For each MoE layer we compare with uniformly random top-k routing of the same tokens:

* **load CV** (std / mean of the per-expert load): random routing of `n` tokens gives about
  `load_baseline_cv(n, E, k)`, not 0;
* **router entropy** against its maximum `log E`;
* **co-activation**: P(expert j selected | expert i selected), `(k - 1) / (E - 1)` when random;
* **consecutive tokens**: how often neighbours share their first choice (random: `1 / E`)."""),
    ("code", """
TEXTS = ["The cat sat on the mat and looked at the dog.",
         "Experts in a mixture of experts layer each see only some tokens.",
         "the cat sat on the mat"]
CAPTURE = ["blocks.moe.top_k_experts", "blocks.moe.router_probs", "blocks.moe.top_k_weights"]
# interventions are data: running with "none" now lets the ablation below reuse the same compiled program
runs = {name: m.run(TEXTS, capture=CAPTURE, interventions=gv.Interventions.none(m.cfg))
        for name, m in models.items()}

rows = []
for name, run in runs.items():
    cfg, real = run.cfg, run.real
    ex = run.cache["blocks.moe.top_k_experts"]
    E, k, n = cfg.num_experts, cfg.top_k, int(real.sum())
    co = A.coactivation(ex, real, E)
    summary = A.routing_summary(run.cache, real, E)
    for i, layer in enumerate(cfg.moe_layer_ids):
        off = ~np.eye(E, dtype=bool)
        cond = F.coactivation_conditional(co[i])[off]
        rows.append(dict(family=name, layer=layer, E=E, k=k, tokens=n,
                         load_cv=summary.load_cv[i], load_cv_random=A.load_baseline_cv(n, E, k),
                         entropy=summary.entropy[i], entropy_max=np.log(E),
                         coact_max=np.nanmax(cond), coact_random=(k - 1) / (E - 1),
                         first_repeat=summary.first_repeat[i], first_repeat_random=1 / E))
stats = pd.DataFrame(rows)
stats.round(3)"""),
    ("md", """
Each statistic divided by its random baseline (1 = indistinguishable from random routing). The random tiny
models sit near 1 for entropy; a trained model's router is typically more confident (entropy ratio below 1)
and its loads less even."""),
    ("code", """
ratios = pd.DataFrame({"family": stats.family + " L" + stats.layer.astype(str),
                       "load CV": stats.load_cv / stats.load_cv_random,
                       "entropy": stats.entropy / stats.entropy_max,
                       "max co-activation": stats.coact_max / stats.coact_random,
                       "first-choice repeat": stats.first_repeat / stats.first_repeat_random})
fig = go.Figure([go.Bar(name=col, x=ratios.family, y=ratios[col]) for col in ratios.columns[1:]])
fig.add_hline(y=1, line=dict(dash="dash", color="#888"), annotation_text="random routing")
fig.update_layout(barmode="group", title="Routing statistics / their random baseline", height=380,
                  yaxis_title="ratio", template="plotly_white")
fig"""),
    ("md", """
The same figures the load dashboard draws, for two families side by side: load share per layer (diverging
around the uniform share 1/E) and one layer's co-activation map."""),
    ("code", """
for name in ["olmoe", "qwen3_moe"]:
    run = runs[name]
    ex, E = run.cache["blocks.moe.top_k_experts"], run.cfg.num_experts
    F.load_share_heatmap(A.load_share(ex, run.real, E), f"{name}: expert load share",
                         layers=run.cfg.moe_layer_ids, num_layers=run.cfg.num_layers).show()
    F.coactivation_heatmap(A.coactivation(ex, run.real, E)[0], layer=run.cfg.moe_layer_ids[0],
                           k=run.cfg.top_k, order="load").show()"""),
    ("md", """
The interactive dashboard works on any family (layer slider over the MoE layers, top-N experts, ordering):"""),
    ("code", """
viz.ExpertLoadDashboard(runs["qwen2_moe"])  # a Run that holds the routing captures: nothing is re-run"""),
    ("md", """
## 3. The same ablation in two families

Remove the busiest expert of the last MoE layer: the router skips it and each token that used it takes its next
choice. The gates are then formed by the family's own rule over the experts actually chosen, so OLMoE (gates are
the router probabilities, not renormalised) and Qwen3-MoE (renormalised to sum to 1) handle the substitution
differently, as the gate sums show. We measure the next-token loss and the KL divergence from the unablated
model over the texts' real next-token pairs."""),
    ("code", """
effects, changes = [], {}
for name in ["olmoe", "qwen3_moe"]:
    m, run = models[name], runs[name]
    layer = m.cfg.moe_layer_ids[-1]
    load = A.expert_load(run.cache["blocks.moe.top_k_experts", layer], run.real, m.cfg.num_experts)[0]
    expert = int(np.argmax(load))
    iv = gv.Interventions.none(m.cfg).remove_expert(layer, expert)
    ablated = m.run(TEXTS, capture=CAPTURE, interventions=iv)
    toks, pad = run.tokens, m.cfg.pad_token
    valid = np.asarray(A.prediction_pairs(toks, pad))
    kl = float((np.asarray(A.next_token_kl(run.logits, ablated.logits)) * valid).sum() / valid.sum())
    gates = ablated.cache["blocks.moe.top_k_weights", layer][run.real].sum(-1)
    effects.append(dict(family=name, layer=layer, expert=expert, token_slots=int(load[expert]),
                        loss=float(A.next_token_loss(run.logits, toks, pad)),
                        loss_ablated=float(A.next_token_loss(ablated.logits, toks, pad)), kl=kl,
                        gate_sum_min=gates.min(), gate_sum_max=gates.max()))
    pos = run.positions(0)[-1]
    changes[name] = [np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                     for z in (run.logits[0, pos].astype(np.float64), ablated.logits[0, pos].astype(np.float64))]
pd.DataFrame(effects).round(4)"""),
    ("md", """
The next-token distribution after the first text, before and after the removal, in each family:"""),
    ("code", """
labels = [models["olmoe"].tokenizer.id_to_piece(i) for i in range(models["olmoe"].cfg.vocab_size)]
for name, (before, after) in changes.items():
    F.next_token_change(before, after, labels, top=8, title_extra=f" ({name})").show()"""),
    ("md", """
On these random models the effects say nothing about what the experts do; on a real checkpoint the same cells
show which experts the model relies on. `A.ablation_sweep(model, tokens, mode="remove", layers=[layer])`
measures every expert of a layer the same way, and `viz.AblationLab(model, prompt)` explores single ablations
interactively, in every family."""),
]


def build():
    return _notebook.build(CELLS, "nb07")


if __name__ == "__main__":
    _notebook.write(build(), OUT)
