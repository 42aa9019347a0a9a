"""Writes notebooks/08_expert_analysis.ipynb (outputs stripped, stable cell ids).

Run: .venv/bin/python scripts/make_notebook_08.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when loaded by path
import _notebook  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "notebooks" / "08_expert_analysis.ipynb"

CELLS = [
    ("md", """
# Expert analysis: detect and steer, engine traces, prefill vs decode, counterfactual experts, fragile routing

The analyses MoE papers wrote custom code for, on the bundled tiny model (4 layers, 8 experts, top-2, trained
on the bundled corpus of Python code, Python documentation prose and synthetic numbers). Every cell runs the
same way on any model `gv.load` opens (Grok-1, Mixtral, OLMoE, Qwen-MoE, Granite, gpt-oss).

1. **Detect then steer** (SteerMoE): which experts one kind of text uses more than another, with intervals, and
   a router bias built from them; what it does to held-out text and to generation.
2. **Routing traces from serving engines**: read vLLM / SGLang `return_routed_experts` arrays, replay them as
   forced routing, and see where the engine's routing and grokviz's differ.
3. **Prefill vs decode**: expert load while reading the prompt and while writing, against random routing.
4. **Counterfactual experts, per-expert logit lens, three ablation semantics, fragile routing.**"""),
    ("code", """
import numpy as np
import pandas as pd
import grokviz as gv
from grokviz import viz
from grokviz.analysis import steering as St, traces as Tr, experts as X, fragility as Fr, patching as Pa
from grokviz.analysis.dataset import default_dataset
from grokviz.viz import steering_figures as SF, fragility as FV

model = gv.load("tiny", progress=False)
cfg = model.cfg
pieces = [model.tokenizer.id_to_piece(i) for i in range(cfg.vocab_size)]
DIGITS = np.array([i for i, p in enumerate(pieces) if p.isdigit()])   # the tokenizer splits digits: 10 ids
model"""),
    ("md", """
## 1. Detect then steer

After Fayyaz et al., *Steering MoE LLMs via Expert (De)Activation* (arXiv:2509.09660, 2025): take two sets of
texts, measure each (layer, expert)'s **activation rate** in each (the share of tokens whose top-k includes it),
rank the differences, then add a router bias that favours the experts of one set (and disfavours the other's).

The interval is Newcombe's hybrid score interval for a difference of two proportions (Newcombe 1998, method 10,
from two Wilson intervals). It treats tokens as independent; tokens of one document are not, so it is a lower
bound on the uncertainty. The default sets are the bundled validation split's code and prose documents,
alternately split into a detection half and a held-out half; here a few documents of each keep it quick."""),
    ("code", """
det_code, det_prose, held_code, held_prose = St.default_sets(a="code", b="prose")
det = St.detect(model, det_code[:2], det_prose[:8], names=("code", "prose"), max_len=128)
det.table.head(8).round(3)"""),
    ("code", """
SF.detection_heatmap(det.diff_matrix(), det.names, layers=det.counts_a.layers, num_layers=cfg.num_layers,
                     top=det.top(5)).show()
SF.ranked_bars(det.table, top=12, names=det.names).show()"""),
    ("md", """
**Digits.** The same comparison at the token level: digit tokens against every other token of the validation
split's numbers documents (`detect_tokens`)."""),
    ("code", """
numbers = [d["text"] for d in default_dataset("validation") if d["domain"] == "numbers"][:24]
dig = St.detect_tokens(model, DIGITS, numbers, names=("digits", "other tokens"), max_len=128)
dig.top(5).round(3)"""),
    ("md", """
**Steer.** `+4` on the router logits of the two experts that most favour code and `-4` on the two that most
favour prose. The effect on held-out text of each set: the boosted experts' activation rate, and the mean
next-token log-probability of the text (a classifier-free metric: steering toward code should raise code's
log-probability relative to prose's)."""),
    ("code", """
iv = det.interventions(n=2, strength=4.0)
effect = St.steering_effect(model, iv, held_code[:2], held_prose[:6], names=("code", "prose"), max_len=128)
display(effect.round(4))
display(St.effect_summary(effect).round(4))
print(f"relative log-prob shift toward code: {St.relative_logprob_shift(effect):+.4f} nats/token")
SF.steering_effect(effect).show()"""),
    ("code", """
PROMPTS = ["def mean(values):\\n    return", "The value of"]
gen = St.steered_generation(model, PROMPTS, iv, 16)
for _, r in gen.iterrows():
    print(f"{r.prompt!r}\\n  unsteered: {r.unsteered!r}\\n  steered:   {r.steered!r}")
gen[["prompt", "rate_boosted_unsteered", "rate_boosted_steered"]]"""),
    ("md", """
## 2. Routing traces from serving engines

vLLM (`--enable-return-routed-experts`) returns `prompt_routed_experts` `[prompt_len, moe_layers, top_k]` and
per choice `routed_experts` `[gen_len, moe_layers, top_k]`; SGLang (`return_routed_experts=True`) returns
`meta_info["routed_experts"]`, base64 of int32 ids `[num_tokens, num_layers, top_k]` over positions
`[0, seqlen - 1)`. `Tr.read_vllm` / `Tr.read_sglang` read those (dicts, JSON files, arrays, `.npy`);
`Tr.replay` forces the trace's experts on the sequence and compares with grokviz's own routing.

We have no server here, so the "engine" is grokviz's own KV-cache decoder: it generates a continuation, and the
trace records the routing each token got while being generated (prefill for the prompt, one decode step per
new token). A full forward over the finished sequence recomputes every token at once: any difference between
the two is the kind of numerical drift an engine trace would show (on a large bf16 model, much more of it; the
tiny fp32 model's decode routing matches its full forward exactly: agreement 1.0, Δlogprob 0)."""),
    ("code", """
result = model.generate(PROMPTS, 16, temperature=0.0, capture=["blocks.moe.top_k_experts"])  # as in section 1
prompt_trace, gen_trace = Tr.trace_from_generation(result, row=0)
response = Tr.write_vllm(prompt_trace, gen_trace)            # what the vLLM server would send back
seq = np.concatenate([result.prompt[0, result.prompt_width - result.prompt_lengths[0]:], result.new_tokens(0)])
rep = Tr.replay(model, seq, response)
print(rep.summary())
rep.layers"""),
    ("md", """
A trace that does disagree: the full forward's own routing written as an SGLang response, with the first
expert of 6 tokens at layer 2 replaced by another. The replay finds exactly those 6, and the log-probability
of the actual next tokens moves from the first changed token on."""),
    ("code", """
trace = Tr.trace_from_run(rep.own)[:-1]      # the full forward's own routing; SGLang has none for the last token
bad = trace.copy()
for t in np.linspace(3, len(trace) - 2, 6).astype(int):
    bad[t, 2, 0] = next(e for e in range(cfg.num_experts) if e not in bad[t, 2])
rep_bad = Tr.replay(model, seq, Tr.write_sglang(bad), engine="sglang")
display(rep_bad.layers)
rep_bad.tokens[rep_bad.tokens.layers_differing > 0].round(4)"""),
    ("md", """
## 3. Prefill vs decode

The load dashboard on a `GenerationResult`: the *tokens* toggle switches every plot between the prompt's tokens
(prefill), the generated ones (decode) or both; the bottom row compares the phases at the slider's layer (each
expert's share of the tokens next to random routing's k/E) and per layer (load CV of each phase next to its
random-routing baseline, and the total variation between the two phases' loads)."""),
    ("code", """
viz.ExpertLoadDashboard(result, phase="decode")"""),
    ("md", """
## 4. Counterfactual experts and the per-expert logit lens

`X.counterfactual_table`: what every expert, selected or not, would write at one position (the model's blocks up
to that layer, then every expert of the layer on its MoE input: the hook `blocks.moe.expert_outputs_all` at one
layer; `X.expert_outputs` gives the arrays), its lens readout and its direct logit attribution to a target.
`X.expert_lens` (after *MoE Lens*, arXiv 2025): each selected expert's gated write read out by the final norm
and unembedding, next to the whole MoE output's."""),
    ("code", """
TEXT = "total = 12 + 30\\nprint(total)  # prints 4"
display(X.counterfactual_table(model, TEXT, layer=1, target=pieces.index("2")).round(3))   # the digit piece "2"
X.expert_lens(model, TEXT, layer=3).round(3)"""),
    ("md", """
The single-expert substitution (keep only the top-weighted expert per token at one layer: Δloss over a few
documents); `X.top_expert_agreement(model, data)` gives, per layer, the cosine between the top expert's write and
the whole MoE write and how often their lens readouts agree:"""),
    ("code", """
SMALL = [d["text"][:400] for d in default_dataset("validation")][::60][:6]     # a few short documents
X.single_expert_substitution(model, SMALL, max_len=64).round(4)"""),
    ("md", """
## 5. Three ablation semantics

*contribution*: the expert's output x 0, routing unchanged; *route-around*: the router skips it and the
next-best expert takes the slot (gates by the family's rule); *swap*: its slots run another expert at the same
gates. The sweep ablates every expert of layer 1 each way:"""),
    ("code", """
sweeps = [Pa.ablation_sweep(model, SMALL, mode=m, layers=[1], max_len=64, progress=False).assign(mode=m)
          for m in ("contribution", "route_around", "swap")]
pd.concat(sweeps).pivot(index="expert", columns="mode", values="delta_loss").round(4)"""),
    ("md", """
## 6. Fragile routing

Per token and layer, the top-k margin (the gap between the k-th and (k+1)-th router probability) and whether
the selected set flips under bf16 activations, int8 weights (as Grok-1 ships) or small embedding noise."""),
    ("code", """
frag = Fr.routing_fragility(model, SMALL, max_len=64, batch_size=8)
print("most fragile layer:", frag.most_fragile_layer())
display(frag.layers.round(4))
FV.FragilityView(frag)"""),
]


def build():
    return _notebook.build(CELLS, "nb08")


if __name__ == "__main__":
    _notebook.write(build(), OUT)
