"""Notebook sources live here as lists of cells, so they stay reviewable; run to (re)write notebooks/*.ipynb.

Every notebook: outputs stripped, one markdown cell per idea, runs top to bottom on the bundled tiny model, and
has one variable (``GROK1_CHECKPOINT``) that points it at the real Grok-1 release checkpoint instead.
(``05_grok1_at_scale.ipynb`` is written by its own script.)
"""

from pathlib import Path

import nbformat

NB = Path(__file__).resolve().parent.parent / "notebooks"


def md(s):
    return nbformat.v4.new_markdown_cell(s.strip())


def code(s):
    return nbformat.v4.new_code_cell(s.strip())


MODEL_MD = md("""
## The model
`GROK1_CHECKPOINT = None` uses the small trained Grok-architecture model shipped with grokviz (4 layers, 8 experts,
top-2, its own 4096-piece tokenizer). Set it to the directory of the official release (`.../checkpoints/ckpt-0`,
int8, about 300 GB; it needs a host with enough accelerator memory, see `05_grok1_at_scale`) and every cell below
runs unchanged on Grok-1 itself: 64 layers, 48 query / 8 KV heads, 8 experts.""")

MODEL_CODE = code("""
GROK1_CHECKPOINT = None   # e.g. "/data/grok-1/checkpoints/ckpt-0" for the real 314B model

import numpy as np
import grokviz as gv
from grokviz import viz

if GROK1_CHECKPOINT:
    model = gv.load(GROK1_CHECKPOINT, config=gv.GrokConfig.grok1())
else:
    model = gv.load("tiny")
cfg = model.cfg
model""")

PROMPT = ("The router of a mixture-of-experts layer sends every token to two of its eight experts. "
          "Some experts specialise in punctuation, others in numbers like 1, 2 and 3, or in names.")

QUICKSTART = [
    md("""
# grokviz quickstart

A Grok-1-architecture model in pure JAX: run it, capture its routing, change it, and look at it.
This notebook uses the small bundled model, so it runs anywhere in seconds."""),
    md("## 1. A model\n`GrokConfig.grok1()` is the real 314B configuration; the bundled model has the same "
       "architecture at toy size."),
    code("""
import grokviz as gv
print(gv.GrokConfig.grok1().describe())"""),
    MODEL_MD,
    MODEL_CODE,
    md("## 2. A forward pass with routing captured\nText is tokenized by the model's tokenizer (token id 0 is "
       "padding); capture names are globs over the hook registry `gv.HOOKS`."),
    code(f"""
run = model.run({PROMPT!r}, capture=["blocks.moe.*"])
print(run.logits.shape, run.str_tokens()[:8])
run.cache"""),
    md("## 3. A first look at the routing\nThe first-choice expert of every token at every layer, and how many "
       "tokens each expert received."),
    code("""
import plotly.express as px

first = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, 0, :, 0]   # [layer, seq]
px.imshow(first, labels=dict(x="token position", y="layer", color="expert"),
          color_continuous_scale="Turbo", title="first-choice expert per token and layer")"""),
    code("""
load = np.asarray(run.cache["blocks.moe.expert_load"])   # [layer, expert], padding excluded
px.bar(x=np.arange(cfg.num_experts), y=load[0], labels=dict(x="expert", y="tokens (both slots)"),
       title="expert load at layer 0")"""),
    md("## 4. An intervention\nRemove expert 0 from layer 0's routing: its load drops to zero, tokens take "
       "their next choice. Interventions are data, so changing them never recompiles."),
    code("""
iv = gv.Interventions.none(cfg).remove_expert(layer=0, expert=0)
ablated = model.run(run.tokens, capture=["blocks.moe.expert_load"], interventions=iv)
print(iv)
print("load at layer 0 before:", load[0], "after:", np.asarray(ablated.cache["blocks.moe.expert_load"])[0])
assert np.asarray(ablated.cache["blocks.moe.expert_load"])[0, 0] == 0"""),
    md("## 5. Interactive views\n`grokviz.viz` has widgets for routing, expert load, attention, ablations and "
       "routing flow; the other notebooks explore each. Move the layer slider, or pick a token."),
    code("viz.RoutingExplorer(run)"),
]

EXPLORING_ROUTING = [
    md("""
# Exploring routing

Which expert does each token go to, how sure is the router, and does the load spread evenly? This notebook
walks through grokviz's routing views: a per-token explorer, a load dashboard and the flow of tokens between
experts across layers."""),
    MODEL_MD,
    MODEL_CODE,
    md("## A prompt, with every routing hook captured\n`blocks.moe.*` captures router logits and probabilities, "
       "the selected experts (`top_k_experts`, descending probability) and their gates (`top_k_weights`)."),
    code(f"""
PROMPT = {PROMPT!r}
run = model.run(PROMPT, capture=["blocks.moe.*"])
run"""),
    md("""
## The routing explorer
* top: the prompt's tokens coloured by their first-choice expert at the layer of the slider (hover a chip for
  both experts and gates), and the same as a strip with both slots;
* bottom left: the first choice of every token at every layer (click a cell, or use the token slider);
* bottom right: the selected token's router probabilities at every layer. Outlined cells are the selected
  experts, and the printed numbers are their gates *as Grok-1 uses them*: the softmax probabilities over all
  eight experts, **not renormalised** over the two chosen, so a row's gates sum to less than one."""),
    code("""
explorer = viz.RoutingExplorer(run)
explorer"""),
    md("## Gates are router probabilities\nThe check behind the right-hand plot: each gate equals the router "
       "probability of its expert, and the two gates of a token sum to less than 1."),
    code("""
probs = np.asarray(run.cache["blocks.moe.router_probs"])
experts = np.asarray(run.cache["blocks.moe.top_k_experts"])
gates = np.asarray(run.cache["blocks.moe.top_k_weights"])
assert np.allclose(np.take_along_axis(probs, experts, -1), gates)
print("mean gate mass per layer:", gv.analysis.gate_mass(gates, run.real).round(3))"""),
    md("""
## Expert load over a small dataset
Load statistics pool every real token of a batch. The dashboard shows the share of routing slots each expert
receives per layer (diverging around the uniform share 1/E), one layer's bars with the uniform share marked,
which experts are chosen together, and how often consecutive tokens share experts compared with random routing
(the Mixtral paper's measurement)."""),
    code("""
DATASET = [
    PROMPT,
    "def add(a, b):\\n    return a + b\\n\\nprint(add(1, 2))",
    "In 1969 the first people walked on the Moon; the mission was called Apollo 11.",
    "Once upon a time there was a little fox who lived at the edge of a forest.",
]
dashboard = viz.ExpertLoadDashboard(model, DATASET)
dashboard"""),
    md("## The numbers behind it\n`grokviz.analysis` returns plain arrays and tables; the widgets only draw "
       "them."),
    code("""
batch = model.run(DATASET, capture=["blocks.moe.*"])
gv.analysis.routing_summary(batch.cache, batch.real, cfg.num_experts).round(3)"""),
    md("## Routing flow\nHow first choices at one layer continue at the next: a Sankey across consecutive layers "
       "(pick the range with the slider). Thick bands are expert paths many tokens share."),
    code("""
flow = viz.RoutingFlow(batch)
flow"""),
    md("## Export\nAny view or figure can be written as a standalone HTML file with plotly.js inlined, to share "
       "or open offline."),
    code("""
import tempfile, pathlib
out = viz.export_html(explorer, pathlib.Path(tempfile.gettempdir()) / "grokviz_routing_explorer.html")
print(out, f"{out.stat().st_size / 1e6:.1f} MB")"""),
]

TEACHING_MOE = [
    md("""
# Mixture of experts, from scratch

What a router does, how top-k selection and gates work, why an unconstrained router collapses onto a few
experts, and how the load-balancing loss prevents it. We build each piece in a few lines of numpy, check it
against the Grok model's own captures, then train a toy MoE live, with and without the auxiliary loss."""),
    md("""
## 1. A router is a linear map and a softmax
Each token's hidden vector `x` (size `d_model`) is multiplied by a router matrix `W` (`d_model x E`), giving one
logit per expert; a softmax turns the logits into a probability per expert."""),
    code("""
import numpy as np
import plotly.express as px

rng = np.random.default_rng(0)
T, D, E, K = 12, 16, 8, 2              # tokens, width, experts, experts per token
x = rng.normal(size=(T, D))
W = rng.normal(size=(D, E)) / np.sqrt(D)
logits = x @ W                          # [token, expert]
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
px.imshow(probs, labels=dict(x="expert", y="token", color="p"), title="router probabilities")"""),
    md("""
## 2. Top-k selection and gates
Each token goes to its `k` most probable experts. Grok-1 uses the chosen experts' probabilities directly as
gates (**no renormalisation**: they sum to less than 1); Mixtral renormalises them over the chosen `k`. The
layer's output is the gate-weighted sum of the chosen experts' outputs."""),
    code("""
top = np.argsort(-probs, axis=-1)[:, :K]                 # [token, k], descending probability
gates = np.take_along_axis(probs, top, -1)               # Grok-1 gates
renorm = gates / gates.sum(-1, keepdims=True)            # Mixtral-style gates
experts = [rng.normal(size=(D, D)) / np.sqrt(D) for _ in range(E)]   # toy linear experts
out = np.stack([sum(g * (x[t] @ experts[e]) for e, g in zip(top[t], gates[t])) for t in range(T)])
print("token 0 -> experts", top[0], "gates", gates[0].round(3), "sum", gates[0].sum().round(3),
      "| renormalised", renorm[0].round(3))
print("output", out.shape)"""),
    md("## 3. The same quantities in the Grok model\nThe bundled model's captures follow exactly these rules: "
       "`top_k_weights` are the router probabilities of `top_k_experts`."),
    MODEL_CODE,
    code("""
run = model.run("Experts are chosen per token, per layer.", capture=["blocks.moe.*"])
p, e, g = (np.asarray(run.cache[n]) for n in ("blocks.moe.router_probs", "blocks.moe.top_k_experts",
                                               "blocks.moe.top_k_weights"))
assert np.allclose(np.take_along_axis(p, e, -1), g) and np.all(g.sum(-1) < 1)
print("layer 0, first token: experts", e[0, 0, 0], "gates", g[0, 0, 0].round(3))"""),
    md("""
## 4. Load balancing
Nothing in the language-modelling loss asks the router to spread tokens: an expert that is slightly better early
gets more tokens, trains more, and wins more tokens. The Switch-Transformer auxiliary loss counters this. With
`f_e` the share of routing slots sent to expert `e` and `P_e` the mean router probability of `e`,
`aux = E * sum_e f_e * P_e`. It equals 1 when routing is uniform and grows towards `E` as routing collapses."""),
    code("""
def aux_loss(probs, top, E):
    f = np.bincount(top.ravel(), minlength=E) / top.size
    return E * np.sum(f * probs.mean(0))

skewed = probs * np.array([8, 4, 1, 1, 1, 1, 1, 1])
skewed /= skewed.sum(-1, keepdims=True)
uniform = np.full_like(probs, 1 / E)
top_uniform = np.stack([rng.permutation(E)[:K] for _ in range(T)])
for name, pr, tp in [("random router", probs, top), ("skewed router", skewed, np.argsort(-skewed, -1)[:, :K]),
                     ("perfectly uniform", uniform, top_uniform)]:
    print(f"{name:18s} aux = {aux_loss(pr, tp, E):.3f}")"""),
    md("""
## 5. Training a toy MoE, with and without the auxiliary loss
`grokviz.train` trains the same Grok-architecture forward pass with optax (the `quick` preset: 2 layers,
8 experts, top-2, a few thousand tokens per step on the bundled corpus). We train twice from the same
initialisation: once with `aux_coef = 0`, once with the load-balancing loss on, and record each expert's share
of the routing slots as training goes."""),
    code("""
from grokviz.train import PRESETS, load_data, train

qcfg, qtc = PRESETS["quick"]
data = load_data()
STEPS = 100
runs = {}
for name, aux in [("no aux loss", 0.0), ("aux loss 0.05", 0.05)]:
    params, hist = train(qcfg, data, tc=qtc, steps=STEPS, aux_coef=aux, z_coef=0.0)
    runs[name] = hist
    print(f"{name}: final cross-entropy {hist['ce'][-1]:.3f}, aux {hist['aux'][-1]:.3f}")"""),
    md("## 6. Expert load during training\nEach line is one expert's share of routing slots at layer 0; the "
       "dashed line is the uniform share 1/E. Without the auxiliary loss, shares drift apart; with it they stay "
       "near uniform."),
    code("""
import plotly.graph_objects as go
from plotly.subplots import make_subplots

fig = make_subplots(rows=1, cols=2, subplot_titles=list(runs), shared_yaxes=True)
for col, hist in enumerate(runs.values(), start=1):
    share = np.asarray(hist["expert_load"])          # [logged step, layer, expert]
    for ex in range(qcfg.num_experts):
        fig.add_trace(go.Scatter(x=hist["step"], y=share[:, 0, ex], mode="lines", name=f"E{ex}",
                                 line=dict(color=viz.expert_color(ex)), showlegend=col == 1), row=1, col=col)
    fig.add_hline(y=1 / qcfg.num_experts, line_dash="dash", row=1, col=col)
fig.update_layout(title="Layer 0 expert load share during training", template="grokviz", height=380)
fig.update_xaxes(title="step")
fig"""),
    code("""
for name, hist in runs.items():
    share = np.asarray(hist["expert_load"])[-1]       # [layer, expert] at the end
    cv = share.std(-1) / share.mean(-1)
    print(f"{name:15s} load CV per layer at the end: {cv.round(3)} (0 = perfectly balanced)")"""),
]

ABLATION = [
    md("""
# Ablation experiments

What happens to the prediction if an expert is taken away? grokviz interventions are data (masks and scales
scanned with the parameters), so changing which expert or head is ablated re-runs the same compiled program:
interactive ablation is fast."""),
    MODEL_MD,
    MODEL_CODE,
    md("""
## The ablation lab
Pick a layer, then the experts or attention heads to ablate there: tick their boxes, or type a list with
ranges (`3, 17, 90-95`), which works the same for a model with 128 experts. Each change re-runs the model and
shows:
the next-token distribution after the last token (baseline in grey), the loss and KL divergence, and where the
first-choice routing changed. **remove** takes the expert out of the router's choice (tokens fall back to their
next choice, keeping its probability as gate); **zero output** keeps the routing and multiplies the expert's
output by 0."""),
    code(f"""
PROMPT = {PROMPT!r}
lab = viz.AblationLab(model, PROMPT)
lab"""),
    md("## The same, from code\nThe lab is a thin view over `Interventions`; its state turns into one:"),
    code("""
iv = gv.Interventions.none(cfg).remove_expert(layer=0, expert=1).ablate_head(layer=1, head=0)
print(iv)
run = model.run(PROMPT, interventions=iv, capture=["blocks.moe.expert_load"])
print("layer 0 load with expert 1 removed:", np.asarray(run.cache["blocks.moe.expert_load"])[0])"""),
    md("""
## A sweep: every expert, one at a time
Loss change when each (layer, expert) is removed, on the prompt. Only intervention values change between runs,
so there is one compilation for the whole sweep."""),
    code("""
from grokviz.analysis.common import next_token_loss
import time

tokens = model.to_tokens(PROMPT)
none = gv.Interventions.none(cfg)
def loss_with(iv):
    r = model.run(tokens, interventions=iv)
    return next_token_loss(r.logits, r.tokens, cfg.pad_token)

base = loss_with(none)
t0 = time.perf_counter()
delta = np.array([[loss_with(none.remove_expert(l, e)) - base for e in range(cfg.num_experts)]
                  for l in range(cfg.num_layers)])
print(f"baseline loss {base:.3f}; {delta.size} ablations in {time.perf_counter() - t0:.1f} s")"""),
    code("""
import plotly.graph_objects as go
span = np.abs(delta).max()
go.Figure(go.Heatmap(z=delta, colorscale="RdBu_r", zmid=0, zmin=-span, zmax=span,
                     colorbar=dict(title="\u0394 loss"))).update_layout(
    title="Loss change when one expert is removed", xaxis_title="expert", yaxis_title="layer",
    template="grokviz", height=320)"""),
    md("## Remove vs zero\nRemoving lets tokens reroute to a substitute expert; zeroing leaves a hole. The "
       "difference measures how much the router's second choices can stand in."),
    code("""
l, e = np.unravel_index(np.argmax(delta), delta.shape)
print(f"most harmful removal: layer {l} expert {e}")
print(f"  remove (reroute): \u0394loss = {loss_with(none.remove_expert(l, e)) - base:+.4f}")
print(f"  zero output     : \u0394loss = {loss_with(none.zero_expert(l, e)) - base:+.4f}")"""),
    md("## A dataset sweep: every expert over held-out text\n"
       "`grokviz.analysis.patching.ablation_sweep` runs all (layer, expert) ablations over many texts at once: "
       "it runs the layers before the ablated one once, and batches the ablations with `vmap`. The result is a "
       "tidy table (Δloss and KL to the baseline, in nats)."),
    code("""
from grokviz.analysis import patching
from grokviz.analysis.dataset import default_dataset

docs = default_dataset("validation")[::40]          # a slice of the bundled corpus's held-out split
table = patching.ablation_sweep(model, docs, kind="expert", mode="zero", batch_size=8)
table.sort_values("delta_loss", ascending=False).head(8)"""),
    code("""
grid = table.pivot(index="layer", columns="expert", values="delta_loss")
go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, colorscale="Reds",
                     colorbar=dict(title="Δ loss"))).update_layout(
    title=f"Zeroing one expert: Δ loss over {len(docs)} held-out documents", xaxis_title="expert",
    yaxis_title="layer", template="grokviz", height=320)"""),
]

ATTENTION = [
    md("""
# Attention maps

Grok-1 uses grouped-query attention (48 query heads share 8 key/value heads; the bundled model: 4 share 2) and
soft-caps its attention logits with `30 * tanh(x / 30)`. This notebook looks at the patterns, the effect of the
cap, and per-head summaries."""),
    MODEL_MD,
    MODEL_CODE,
    md("""
## The attention explorer
Pick a layer and a head (the list groups query heads by the KV head they read). Left: the attention pattern
with token labels (rows are queries, columns keys). Right: every causal pre-cap logit against its capped score,
on the `30 tanh(x/30)` curve, and the layer's per-head summaries (entropy, attention to the first token,
previous-token attention), coloured by KV head."""),
    code(f"""
PROMPT = {PROMPT!r}
run = model.run(PROMPT, capture=["blocks.attn.pattern", "blocks.attn.scores", "blocks.attn.logits"])
explorer = viz.AttentionExplorer(run)
explorer"""),
    md("## How much does the soft-cap bite?\nThe fraction of causal logits beyond half the cap, per layer; in a "
       "small model the cap is mostly inactive."),
    code("""
logits = np.asarray(run.cache["blocks.attn.logits"])[:, 0]     # [layer, head, seq, kv_seq]
causal = np.tril(np.ones(logits.shape[-2:], bool))
for l in range(cfg.num_layers):
    x = logits[l][:, causal]
    beyond = np.mean(np.abs(x) > cfg.attn_softcap / 2)
    print(f"layer {l}: max |logit| {np.abs(x).max():6.2f}, beyond cap/2: {beyond:.2%}")"""),
    md("## Per-head summaries for every layer\nThe same numbers as the explorer's bar chart, as a table."),
    code("""
from grokviz.analysis import attention as aa
aa.head_summary(run.cache["blocks.attn.pattern"], run.real, run.cache["blocks.attn.logits"],
                group_size=cfg.group_size).round(3)"""),
    md("## Do heads that share keys and values attend alike?\nCorrelation between the patterns of every pair of "
       "query heads at layer 0; heads in the same KV group share keys but have their own queries."),
    code("""
import plotly.express as px
flat = np.asarray(run.cache["blocks.attn.pattern"])[0, 0].reshape(cfg.num_q_heads, -1)
corr = np.corrcoef(flat)
labels = [f"h{h} (kv {h // cfg.group_size})" for h in range(cfg.num_q_heads)]
px.imshow(corr, x=labels, y=labels, zmin=-1, zmax=1, color_continuous_scale="RdBu_r",
          title="Layer 0 head-pattern correlation")"""),
]

NOTEBOOKS = {
    "00_quickstart.ipynb": QUICKSTART,
    "01_exploring_routing.ipynb": EXPLORING_ROUTING,
    "02_teaching_moe.ipynb": TEACHING_MOE,
    "03_ablation_experiments.ipynb": ABLATION,
    "04_attention_maps.ipynb": ATTENTION,
}


def write(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.from_dict(dict(c)) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"{Path(name).stem}-{i}"
    nbformat.write(nb, NB / name)


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        write(name, cells)
