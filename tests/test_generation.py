"""Generation on the golden model (sequence_len 64): cached decoding against full forwards, captured routing and
attention per step, interventions and step patches, no recompilation, bad input. Every generate call below has
one static signature (prompt bucket 16, new-token bucket 16, batch 1, CAPTURE, keep_logits), so they share one
compiled program; the step-patch tests share a second."""

import numpy as np
import pytest

import grokviz as gv
from grokviz.generation import TRACE_COUNT, force_routing_steps, generate

CAPTURE = ["routing", "blocks.attn.pattern"]
PROMPT = [85, 406, 80, 298, 159, 214, 45]
N = 12


@pytest.fixture(scope="module")
def model(golden):
    cfg, params, _ = golden
    return gv.Model(cfg.replace(sequence_len=64), params)


def gen(model, prompt=PROMPT, n=N, **kw):
    kw = {"temperature": 0.9, "top_p": 0.95, "seed": 3, "stop": (), **kw}
    return generate(model, prompt, n, capture=CAPTURE, keep_logits=True, **kw)


@pytest.fixture(scope="module")
def base(model):
    return gen(model)


def full_forward(model, res, **kw):
    return model.run(res.sequences(), capture=["blocks.moe.top_k_experts", "blocks.moe.router_probs",
                                               "blocks.moe.top_k_weights", "blocks.attn.pattern"], **kw)


def check_against_full_forward(model, res, **kw):
    """Per step: logits, routing and the attention row of the cached loop equal a full forward over the buffer
    (prompt + generated tokens) at that position. Returns the max logit error."""
    run = full_forward(model, res, **kw)
    P, n = res.prompt_width, res.steps_run
    logit_err = np.abs(run.logits[:, P - 1:P - 1 + n] - res.logits[:, :n]).max()
    assert logit_err < 1e-5, logit_err
    want = {k: np.moveaxis(np.asarray(run.cache[k])[:, :, P:P + n], 2, 0) for k in
            ("blocks.moe.top_k_experts", "blocks.moe.router_probs", "blocks.moe.top_k_weights")}  # [n, L, b, ...]
    np.testing.assert_array_equal(res.steps["blocks.moe.top_k_experts"], want["blocks.moe.top_k_experts"])
    np.testing.assert_allclose(res.steps["blocks.moe.router_probs"], want["blocks.moe.router_probs"], atol=1e-6)
    np.testing.assert_allclose(res.steps["blocks.moe.top_k_weights"], want["blocks.moe.top_k_weights"], atol=1e-6)
    one_hot = np.eye(model.cfg.num_experts, dtype=np.int32)[want["blocks.moe.top_k_experts"]]  # [n, L, b, k, E]
    np.testing.assert_array_equal(res.steps["blocks.moe.expert_load"], one_hot.sum(axis=(2, 3)))
    pattern, row = np.asarray(run.cache["blocks.attn.pattern"]), res.steps["blocks.attn.pattern"]  # [n, L, b, H, S]
    for t in range(n):
        np.testing.assert_allclose(row[t, ..., :P + t + 1], pattern[:, :, :, P + t, :P + t + 1], atol=1e-5)
        assert not row[t, ..., P + t + 1:].any()  # later slots are not attended
    return logit_err


def test_cached_decoding_equals_a_full_forward(model, base):
    assert base.tokens.shape == (1, N) and base.steps_run == N and base.prompt_width == 16
    assert base.steps["blocks.attn.pattern"].shape == (N, 2, 1, 4, 16 + 16)
    assert base.prefill["blocks.moe.top_k_experts"].shape == (2, 1, 16, 2)
    check_against_full_forward(model, base)
    # the prefill capture is the prompt's routing in the full forward
    run = full_forward(model, base)
    P, t = base.prompt_width, len(PROMPT)
    np.testing.assert_array_equal(base.prefill["blocks.moe.top_k_experts"][:, :, P - t:],
                                  run.cache["blocks.moe.top_k_experts"][:, :, P - t:P])


def test_reported_probabilities_are_the_samplers(base):
    from grokviz.generation.sampler import filtered_logits

    logits = base.logits[0]
    l = np.asarray(filtered_logits(logits, np.full(N, 0.9, np.float32), np.full(N, 0.95, np.float32),
                                   np.zeros(N, np.int32)))
    probs = np.exp(l - l.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(base.token_prob[0], probs[np.arange(N), base.tokens[0]], rtol=1e-5)
    np.testing.assert_allclose(base.top_probs[0], -np.sort(-probs, axis=-1)[:, :8], rtol=1e-5, atol=1e-9)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    np.testing.assert_allclose(base.logprobs[0], lp[np.arange(N), base.tokens[0]], atol=1e-5)


def test_same_seed_same_text_and_no_recompilation(model, base):
    start = TRACE_COUNT[0]
    again = gen(model)
    np.testing.assert_array_equal(again.tokens, base.tokens)
    np.testing.assert_array_equal(again.logits, base.logits)
    other_seed = gen(model, seed=4)
    assert not np.array_equal(other_seed.tokens, base.tokens)
    gen(model, temperature=0.0)                               # greedy shares the program
    gen(model, temperature=2.0, top_p=0.5, top_k=7)
    gen(model, prompt=[9, 8, 7, 6, 5], n=15)                  # other content and lengths within the buckets
    iv = gv.Interventions.none(model.cfg).remove_expert(0, 3).with_router(1, bias=np.arange(8.0))
    gen(model, interventions=iv)
    gen(model, interventions=iv.remove_expert(1, 5).ablate_head(0, 1))
    gen(model, stop=[5, 6])
    assert TRACE_COUNT[0] == start


def test_greedy_is_the_argmax_of_repeated_full_forwards(model):
    res = gen(model, temperature=0.0)
    seq = list(PROMPT)
    for t in range(N):
        logits = model.run(np.array([seq]), bucket=True).logits[0, -1]
        assert res.tokens[0, t] == int(np.argmax(logits)), t
        seq.append(int(res.tokens[0, t]))


def test_removed_expert_is_never_selected_while_decoding(model, base):
    layer, expert = 1, int(np.bincount(base.steps["blocks.moe.top_k_experts"][:, 1, 0].ravel()).argmax())
    iv = gv.Interventions.none(model.cfg).remove_expert(layer, expert)
    res = gen(model, interventions=iv)
    assert not np.any(res.steps["blocks.moe.top_k_experts"][:, layer] == expert)
    P, t = res.prompt_width, len(PROMPT)
    assert not np.any(res.prefill["blocks.moe.top_k_experts"][layer, :, P - t:] == expert)
    check_against_full_forward(model, res, interventions=iv)


def test_router_bias_steers_every_step(model):
    iv = gv.Interventions.none(model.cfg).with_router(bias=np.eye(8, dtype=np.float32)[6] * 50)
    res = gen(model, interventions=iv)
    assert np.all(res.steps["blocks.moe.top_k_experts"][..., 0] == 6)
    assert res.steps["blocks.moe.expert_load"][:, :, 6].min() == 1


def patched(model, routing=None, resid=None):
    """``gen`` with a routing and a resid_post step patch (either all-unmasked when not given): one program."""
    L, D, k = model.cfg.num_layers, model.cfg.d_model, model.cfg.top_k
    routing = routing or (np.zeros((N, L, 1, k), np.int32), np.zeros((N, L, 1), bool))
    resid = resid or (np.zeros((N, L, 1, D), np.float32), np.zeros((N, L, 1), bool))
    return gen(model, step_patches={"blocks.moe.top_k_experts": routing, "blocks.resid_post": resid})


def test_forced_routing_at_chosen_steps(model, base):
    """Forcing experts at generated steps 3 and 4 of layer 0 equals a full forward with those positions forced:
    the patched tokens' keys and values in the cache carry the patch into every later step."""
    forced = np.array([4, 7])
    patches = force_routing_steps(model.cfg, forced, [3, 4], max_new_tokens=N, layers=[0])
    res = patched(model, routing=patches["blocks.moe.top_k_experts"])
    top = res.steps["blocks.moe.top_k_experts"]
    np.testing.assert_array_equal(top[3:5, 0, 0], [forced, forced])
    np.testing.assert_array_equal(res.tokens[:, :4], base.tokens[:, :4])  # tokens up to 3 were drawn before
    np.testing.assert_array_equal(res.logits[:, :4], base.logits[:, :4])
    assert np.abs(res.logits[:, 4] - base.logits[:, 4]).max() > 1e-4
    P = res.prompt_width
    experts = np.zeros((2, 1, res.sequences().shape[1], 2), np.int32)
    experts[0, 0, P + 3:P + 5] = forced
    iv = gv.Interventions.none(model.cfg).force_routing(experts, layers=[0], positions=[P + 3, P + 4])
    check_against_full_forward(model, res, interventions=iv, bucket=False)
    start = TRACE_COUNT[0]  # other patch values reuse the program
    patched(model, routing=force_routing_steps(model.cfg, [1, 2], [0, 7], max_new_tokens=N)["blocks.moe.top_k_experts"])
    assert TRACE_COUNT[0] == start


def test_residual_step_patch(model, base):
    """A resid_post patch at step 2 of the last layer replaces token 2's output: the logits of token 3 change,
    the earlier ones do not."""
    L, D = model.cfg.num_layers, model.cfg.d_model
    value = np.zeros((N, L, 1, D), np.float32)
    value[2, -1] = 5.0
    mask = np.zeros((N, L, 1), bool)
    mask[2, -1] = True
    res = patched(model, resid=(value, mask))
    np.testing.assert_array_equal(res.logits[:, :3], base.logits[:, :3])
    assert np.abs(res.logits[:, 3] - base.logits[:, 3]).max() > 1e-2
    np.testing.assert_allclose(patched(model).logits, base.logits, atol=0)  # unmasked patches change nothing


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=58), "exceeds the model's context of 64"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
    (dict(temperature=-0.1), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), r"top_k must be in \[0, 512\]"),
    (dict(top_k=513), r"top_k must be in \[0, 512\]"),
    (dict(stop=[512]), r"stop token 512 \(row 0\) is outside the vocabulary \[0, 512\)"),
    (dict(stop=[-1]), "stop token -1"),
    (dict(seed=-1), "seed -1 is outside"),
    (dict(seed=2**32), "outside"),
    (dict(rng="jax"), "rng must be one of"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[3, 600]), r"token id 600 is outside the vocabulary \[0, 512\)"),
    (dict(temperature=[1.0, 2.0]), "one value or one per row"),
])
def test_bad_input_is_a_clear_error(model, kwargs, match):
    kwargs = {"prompt": PROMPT, "max_new_tokens": 4, **kwargs}
    start = TRACE_COUNT[0]
    with pytest.raises(ValueError, match=match):
        generate(model, kwargs.pop("prompt"), kwargs.pop("max_new_tokens"), **kwargs)
    assert TRACE_COUNT[0] == start  # refused on the host, before anything compiles


def test_prompt_buckets_are_model_runs_buckets():
    from grokviz.api import bucket_length
    from grokviz.generation import inputs

    assert inputs.bucket_length is bucket_length  # one rule for both
    assert [bucket_length(t, 8192) for t in (1, 16, 17, 255, 256, 257, 513, 1300)] == [16, 16, 32, 256, 256, 512,
                                                                                         768, 1536]


def test_bad_interventions_and_step_patches(model):
    iv = gv.Interventions.none(model.cfg)
    with pytest.raises(ValueError, match="give per-step patches as step_patches"):
        generate(model, PROMPT, 4, interventions=iv.patch("blocks.resid_post", np.zeros((2, 1, 7, 64))))
    with pytest.raises(ValueError, match="remove at most 6 per layer"):
        generate(model, PROMPT, 4, interventions=iv.remove_expert(0, [0, 1, 2, 3, 4]).remove_expert(0, [5, 6]))
    bad = force_routing_steps(model.cfg, [1, 2], [0], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"must be \[step, layer, batch, k\] = \(5, 2, 1, 2\)"):
        generate(model, PROMPT, 5, step_patches=bad)
    with pytest.raises(ValueError, match="steps must be ints in"):
        force_routing_steps(model.cfg, [1, 2], [4], max_new_tokens=4)
    value, mask = bad["blocks.moe.top_k_experts"]
    with pytest.raises(ValueError, match="expert id 9 is outside the 8 experts"):
        generate(model, PROMPT, 4, step_patches={"blocks.moe.top_k_experts": (value + 8, mask)})
    with pytest.raises(ValueError, match="only blocks.. hooks with axes"):
        generate(model, PROMPT, 4, step_patches={"blocks.attn.pattern": (value, mask)})
    with pytest.raises(KeyError, match="Unknown hook name"):
        generate(model, PROMPT, 4, capture=["blocks.moe.routr"])
