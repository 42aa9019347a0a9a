"""Notebook sources live here as lists of cells, so they stay reviewable; run to (re)write notebooks/*.ipynb."""

from pathlib import Path

import nbformat

NB = Path(__file__).resolve().parent.parent / "notebooks"


def md(s):
    return nbformat.v4.new_markdown_cell(s.strip())


def code(s):
    return nbformat.v4.new_code_cell(s.strip())


QUICKSTART = [
    md("""
# grokviz quickstart

A Grok-1-architecture model in pure JAX: run it, capture its routing, and change it.
This notebook uses a small model so it runs anywhere in seconds."""),
    md("## 1. A model\n`GrokConfig.grok1()` is the real 314B configuration; here we use the same architecture at toy size."),
    code("""
import jax, numpy as np
import grokviz as gv

print(gv.GrokConfig.grok1().describe())
cfg = gv.GrokConfig.tiny(vocab_size=512, num_layers=4, sequence_len=128)
model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(0)))
model"""),
    md("## 2. A forward pass with routing captured\nToken id 0 is padding; capture names are globs over the hook registry."),
    code("""
tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(2, 32)).astype(np.int32)
run = model.run(tokens, capture=["blocks.moe.*"])
print(run.logits.shape)
run.cache"""),
    md("## 3. A first look at the routing\nThe first-choice expert of every token at every layer, and how many tokens each expert received."),
    code("""
import plotly.express as px

first = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, 0, :, 0]   # [layer, seq]
px.imshow(first, labels=dict(x="token position", y="layer", color="expert"),
          color_continuous_scale="Turbo", title="first-choice expert per token and layer")"""),
    code("""
load = np.asarray(run.cache["blocks.moe.expert_load"])   # [layer, expert], padding excluded
px.bar(x=np.arange(cfg.num_experts), y=load[0], labels=dict(x="expert", y="tokens (both slots)"),
       title="expert load at layer 0")"""),
    md("## 4. An intervention\nRemove expert 0 from layer 0's routing: its load drops to zero, tokens take their next choice."),
    code("""
iv = gv.Interventions.none(cfg).remove_expert(layer=0, expert=0)
ablated = model.run(tokens, capture=["blocks.moe.expert_load"], interventions=iv)
print(iv)
print("load at layer 0 before:", load[0], "after:", np.asarray(ablated.cache["blocks.moe.expert_load"])[0])
assert np.asarray(ablated.cache["blocks.moe.expert_load"])[0, 0] == 0"""),
]

NOTEBOOKS = {"00_quickstart.ipynb": QUICKSTART}


def write(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"{Path(name).stem}-{i}"
    nbformat.write(nb, NB / name)


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        write(name, cells)
