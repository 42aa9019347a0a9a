"""Writes notebooks/06_generation.ipynb (outputs stripped, stable cell ids).

Run: .venv/bin/python scripts/make_notebook_06.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by path
import _notebook  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "notebooks" / "06_generation.ipynb"

PROMPT = "The router of a mixture-of-experts layer sends every token to"

CELLS = [
    ("md", """
# Generation: watch and steer routing while the model writes

`model.generate` prefills the prompt once into a KV cache and writes the continuation in one compiled decode
loop, capturing routing at every generated token on the device (no host round trip per step). This notebook
generates with the bundled tiny model, watches its routing token by token, removes an expert and compares the
two continuations, and steers the router with a bias. The last section runs the same cells on the real Grok-1
checkpoint when one is available."""),
    ("code", f"""
import os
import numpy as np
import grokviz as gv
from grokviz import viz

model = gv.load("tiny")
cfg = model.cfg
PROMPT = {PROMPT!r}
model"""),
    ("md", """
## 1. Generate, streaming tokens as they are made

`stream=True` returns an iterator of step events (the token of every row, its sampler probability and the
model's log-probability) produced while the loop runs; `.result()` then gives the whole `GenerationResult`.
`"routing"` captures router logits and probabilities, the selected experts, their gates and the expert load,
and `blocks.attn.pattern` the attention maps, for the prompt (`result.prefill`) and for every generated token
(`result.steps`, a leading step axis; there the new token's attention row over the cache). The explorer below
captures the same set, so all the cells share one compiled program.
Sampling is the Grok-1 runner's: temperature, nucleus (`top_p`), plus `top_k`; `temperature=0` is greedy."""),
    ("code", """
CAPTURE = ["routing", "blocks.attn.pattern"]
stream = model.generate(PROMPT, 24, temperature=0.8, top_p=0.95, seed=0, capture=CAPTURE, stream=True)
for event in stream:
    print(model.tokenizer.id_to_piece(int(event.tokens[0])).replace("\\u2581", " "), end="|")
result = stream.result()
print()
print(repr(result.text))
{k: v.shape for k, v in result.steps.items()}"""),
    ("md", """
Each generated token's first-choice expert at every layer, and its log-probability under the model:"""),
    ("code", """
first = np.stack([result.first_choice(l)[0] for l in cfg.moe_layer_ids])   # [MoE layer, step]
print("first choices, layer x step:\\n", first)
print("log p of each token:", result.logprobs[0, :result.lengths[0]].round(2))"""),
    ("md", """
## 2. Watch routing in the explorer

* the strip: the prompt and the continuation (dotted) coloured by each token's first-choice expert at the
  layer of the slider;
* the timeline: layers x generated tokens, filled in step by step as tokens stream (change the seed to watch
  it again; the routing of the tokens is filled in when the run ends);
* click a token in the strip or the timeline (or move the token slider) to see its router probabilities at
  every layer and its attention over the tokens before it;
* the load: the fraction of prompt tokens (prefill) and of generated tokens (decode) each expert received at
  the layer, next to random routing's k/E;
* the field `remove` regenerates with those experts removed at the slider's layer (same seed and settings) and
  shows both continuations: where they diverge and the log-probability of each choice."""),
    ("code", """
explorer = viz.GenerationExplorer(model, PROMPT, 24, temperature=0.8, top_p=0.95, seed=0)
explorer"""),
    ("md", """
## 3. Remove an expert and compare the continuations

The same as typing into the `remove` field: remove the expert that most generated tokens chose first at
layer 0. Interventions persist through decoding (the expert is out of the prompt's routing and of every
generated step), and they are values: regenerating does not recompile."""),
    ("code", """
base = explorer.traces["baseline"]
busiest = int(np.bincount(base.experts[0, base.n_prompt:, 0], minlength=cfg.num_experts).argmax())
explorer.set_removed(cfg.moe_layer_ids[0], [busiest])
new = explorer.traces["removed"]
print(f"expert {busiest} removed at layer {cfg.moe_layer_ids[0]}; still chosen there:",
      busiest in new.experts[0])
print(explorer.compare_fig.layout.title.text)"""),
    ("md", """
## 4. Steer the router with a bias

`Interventions.with_router(layer, bias=...)` adds a bias to the router logits at every step: here +2 on one
expert at one layer, so more tokens go to it. The explorer keeps the steering in every run it makes."""),
    ("code", """
layer, expert = cfg.moe_layer_ids[-1], 3
bias = np.zeros(cfg.num_experts, np.float32)
bias[expert] = 2.0
steer = gv.Interventions.none(cfg).with_router(layer, bias=bias)
steered = model.generate(PROMPT, 24, temperature=0.8, top_p=0.95, seed=0, capture=CAPTURE,
                         interventions=steer, stream=True).result()

def share(res):
    top = res.step("blocks.moe.top_k_experts")[:, list(cfg.moe_layer_ids).index(layer), 0]   # [step, k]
    return float((top == expert).any(-1).mean())

print(f"tokens routed to expert {expert} at layer {layer}: {share(result):.0%} -> {share(steered):.0%}")
print("plain:  ", repr(result.text))
print("steered:", repr(steered.text))"""),
    ("code", """
viz.GenerationExplorer(model, PROMPT, 24, temperature=0.8, top_p=0.95, seed=0, interventions=steer)"""),
    ("md", """
## 5. The same on Grok-1

Set `GROKVIZ_GROK1_CHECKPOINT` to the release's `checkpoints/ckpt-0` directory (with its `tokenizer.model`
next to it, or `$GROKVIZ_GROK1_TOKENIZER`) to run the cells below on the real 314B model. It needs about
8 x 80 GB of accelerator memory (int8 weights; see `05_grok1_at_scale`) and loading takes minutes.
**Without the checkpoint these cells do nothing, and that is how CI runs them: they have not been run on the
real weights as part of this project's tests.** The explorer skips the attention maps there
(`attention=False`): the prompt's maps over 64 layers x 48 heads are large."""),
    ("code", """
GROK1_CHECKPOINT = os.environ.get("GROKVIZ_GROK1_CHECKPOINT")
if GROK1_CHECKPOINT:
    from grokviz.sharding import make_mesh
    import jax
    grok = gv.load(GROK1_CHECKPOINT, config=gv.GrokConfig.grok1(), quantized=True,
                   mesh=make_mesh((1, len(jax.devices()))))
    out = grok.generate("The answer to life the universe and everything is of course", 32, temperature=0.8,
                        top_p=0.95, seed=0, capture="routing")
    print(repr(out.text))
else:
    grok = None
    print("no Grok-1 checkpoint (GROKVIZ_GROK1_CHECKPOINT unset): skipped")"""),
    ("code", """
if grok is not None:
    big = viz.GenerationExplorer(grok, "The answer to life the universe and everything is of course", 32,
                                 temperature=0.8, top_p=0.95, seed=0, attention=False)
    big.set_removed(0, [int(np.bincount(big.traces["baseline"].experts[0, :, 0]).argmax())])
    display(big)"""),
    ("code", """
if grok is not None:
    g_bias = np.zeros(grok.cfg.num_experts, np.float32)
    g_bias[3] = 2.0
    g_steer = gv.Interventions.none(grok.cfg).with_router(grok.cfg.moe_layer_ids[-1], bias=g_bias)
    display(viz.GenerationExplorer(grok, "The answer to life the universe and everything is of course", 32,
                                   temperature=0.8, top_p=0.95, seed=0, interventions=g_steer, attention=False))"""),
]


def build():
    return _notebook.build(CELLS, "nb06")


if __name__ == "__main__":
    _notebook.write(build(), OUT)
