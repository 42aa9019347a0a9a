"""Hugging Face checkpoint folders of six MoE families, against the outputs of transformers' own modeling code.

``tests/data/hf/<family>/`` are tiny random models saved by transformers 5.24 with ``golden.npz`` (its README says
how they were made). Per family: logits at real positions, raw router logits, the selected experts, attention
weights and hidden states per layer, over a batch with a full row, a right-padded and a left-padded row. Then the
same weights laid out as Hub checkpoints often are (two shards + index, bf16, a legacy ``rope_theta`` /
``rope_scaling`` config), MXFP4 expert weights packed here, the tokenizer, the CLI, and the errors. No torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import grokviz as gv
from grokviz.checkpoint.hf import dequantize_mxfp4, is_hf, load_hf
from grokviz.checkpoint.hf_config import config_from_hf, read_hf_config
from grokviz.checkpoint.release import CheckpointError
from grokviz.checkpoint.safetensors_io import _ShardWriter, memmap_tensor, read_safetensors_header

DATA = Path(__file__).parent / "data" / "hf"
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss"]
CAPTURE = ["blocks.moe.router_logits", "blocks.moe.top_k_experts", "blocks.attn.pattern", "blocks.resid_post",
           "final_norm.out"]


@pytest.fixture(scope="module")
def golden_run():
    """family -> (model, golden arrays, run over the golden batch); each family loaded and run once."""
    done = {}

    def get(family):
        if family not in done:
            model = gv.load(DATA / family, progress=False)
            z = dict(np.load(DATA / family / "golden.npz"))
            done[family] = (model, z, model.run(z["tokens"], capture=CAPTURE))
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(golden_run, family):
    model, z, run = golden_run(family)
    real = z["attention_mask"]
    assert real[1].sum() == 14 and not real[1, -1] and not real[2, 0]  # rows 1, 2: right and left padding
    err = np.abs(np.asarray(run.logits) - z["logits"])[real]
    assert err.max() < 1e-4, f"{family}: max logit error {err.max():.3g}"
    for row in (1, 2):  # each padded row on its own, at real positions
        assert np.abs(np.asarray(run.logits)[row][real[row]] - z["logits"][row][real[row]]).max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_and_selected_experts(golden_run, family):
    model, z, run = golden_run(family)
    real = z["attention_mask"]
    assert tuple(model.cfg.moe_layer_ids) == tuple(z["moe_layers"])
    ours, ref = np.asarray(run.cache["blocks.moe.router_logits"]), z["router_logits"]
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)[:, real].max() / np.abs(ref).max()
    assert err < 1e-5, f"{family}: router logits off by {err:.3g} x max|ref|"
    picked, ref_idx = np.asarray(run.cache["blocks.moe.top_k_experts"]), z["expert_index"]
    assert picked.shape == ref_idx.shape
    diff = [(layer, b, t) for layer in range(ref_idx.shape[0]) for b, t in zip(*np.nonzero(real))
            if set(picked[layer, b, t].tolist()) != set(ref_idx[layer, b, t].tolist())]
    assert not diff, f"{family}: different experts at (layer, row, position) {diff[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_and_hidden_states(golden_run, family):
    model, z, run = golden_run(family)
    real, L = z["attention_mask"], model.cfg.num_layers
    pattern = np.asarray(run.cache["blocks.attn.pattern"])
    assert pattern.shape == z["attentions"].shape
    for b in range(real.shape[0]):  # real query rows (transformers' rows at pads are not meaningful)
        err = np.abs(pattern[:, b][:, :, real[b]] - z["attentions"][:, b][:, :, real[b]]).max()
        assert err < 1e-5, f"{family} row {b}: attention weights off by {err:.3g}"
    resid = np.asarray(run.cache["blocks.resid_post"])
    for i in range(L):  # golden hidden_states[i + 1]: after layer i; the last one after the final norm
        ours = resid[i] if i < L - 1 else np.asarray(run.cache["final_norm.out"])
        ref = z["hidden_states"][i + 1]
        err = np.abs(ours - ref)[real].max()
        assert err < 1e-5 * np.abs(ref[real]).max() + 1e-6, f"{family}: hidden state {i + 1} off by {err:.3g}"


# --- the same weights in other layouts --------------------------------------------------------------------------

def _tensors(folder: Path) -> dict[str, np.ndarray]:
    entries, start = read_safetensors_header(folder / "model.safetensors")
    return {k: np.array(memmap_tensor(folder / "model.safetensors", e, start)) for k, e in entries.items()}


def _write(path: Path, tensors: dict):
    w = _ShardWriter(path, 64 << 10)
    for k, v in tensors.items():
        w.add(k, v)
    w.close()


def _copy_folder(src: Path, dst: Path, *, weights: bool = True) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "golden.npz" and (weights or f.suffix != ".safetensors"):
            shutil.copyfile(f, dst / f.name)
    return dst


def _same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.fixture(scope="module")
def reference_params():
    done = {}

    def get(family):
        if family not in done:
            done[family] = load_hf(DATA / family)
        return done[family]

    return get


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_two_shards_with_index(tmp_path, reference_params, family):
    folder = _copy_folder(DATA / family, tmp_path / family, weights=False)
    tensors = _tensors(DATA / family)
    names = list(tensors)
    half = {n: ("model-00001-of-00002.safetensors" if i < len(names) // 2 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)}
    for shard in sorted(set(half.values())):
        _write(folder / shard, {n: tensors[n] for n in names if half[n] == shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
    assert is_hf(folder)
    cfg, params, _ = load_hf(folder)
    ref_cfg, ref_params, _ = reference_params(family)
    assert cfg == ref_cfg.replace(name=family)
    _same_params(params, ref_params)
    model = gv.load(folder, progress=False)  # gv.load takes it for Hugging Face, not for a converted folder
    assert model.cfg.family == family
    # a shard the index names but that is absent, and a truncated shard
    (folder / "model-00002-of-00002.safetensors").rename(folder / "gone.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_hf(folder)
    raw = (folder / "gone.safetensors").read_bytes()
    (folder / "model-00002-of-00002.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        load_hf(folder)


def test_bf16_stays_bf16_unless_asked(tmp_path, reference_params):
    folder = _copy_folder(DATA / "qwen2_moe", tmp_path / "q", weights=False)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(DATA / "qwen2_moe").items()}
    _write(folder / "model.safetensors", bf16)
    cfg, params, _ = load_hf(folder)
    _, ref, _ = reference_params("qwen2_moe")
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        assert x.dtype == ml_dtypes.bfloat16
        assert np.array_equal(np.asarray(x), np.asarray(y).astype(ml_dtypes.bfloat16))
    m32 = gv.load(folder, dtype=np.float32, progress=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(m32.params)} == {np.dtype(np.float32)}


def _legacy(d: dict, *, old_key: bool = False) -> dict:
    d = dict(d)
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {("type" if old_key else "rope_type"): kind, **rope}
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_rope_config_reads_the_same(family):
    cfg, d = read_hf_config(DATA / family)
    assert config_from_hf(_legacy(d), name=family) == cfg
    assert config_from_hf(_legacy(d, old_key=True), name=family) == cfg
    bare = {k: v for k, v in _legacy(d).items() if k not in ("rope_scaling", "rope_theta")}
    theta = {"mixtral": 1e6, "gpt_oss": 150000.0}.get(family, 10000.0)  # the config classes' default_theta
    if family != "gpt_oss":
        assert config_from_hf(bare).rope_base == theta


def test_legacy_config_folder_loads(tmp_path, reference_params):
    folder = _copy_folder(DATA / "gpt_oss", tmp_path / "g")
    (folder / "config.json").write_text(json.dumps(_legacy(json.loads((DATA / "gpt_oss/config.json").read_text()))))
    cfg, params, _ = load_hf(folder)
    ref_cfg, ref, _ = reference_params("gpt_oss")
    assert cfg == ref_cfg.replace(name="g") and cfg.rope_type == "yarn" and cfg.rope_truncate is False
    _same_params(params, ref)


# --- MXFP4 (gpt-oss) ----------------------------------------------------------------------------------------------

def _e2m1(code: int) -> float:
    """FP4 e2m1 from its definition: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 subnormal."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def _pack(codes: np.ndarray) -> np.ndarray:
    """codes [..., 32] in 0..15 -> bytes [..., 16], element 2i in the low nibble, 2i + 1 in the high one."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _mxfp4_of(rng, e: int, n_in: int, n_out: int):
    """Random packed blocks/scales of an [e, n_in, n_out] matrix and its value, decoded independently."""
    codes = rng.integers(0, 16, size=(e, n_out, n_in // 32, 32))
    scales = rng.integers(120, 132, size=(e, n_out, n_in // 32)).astype(np.uint8)
    lut = np.array([_e2m1(c) for c in range(16)])
    value = lut[codes] * 2.0 ** (scales.astype(np.float64)[..., None] - 127)  # [e, n_out, groups, 32]
    value = value.reshape(e, n_out, n_in).transpose(0, 2, 1)                 # [e, n_in, n_out]
    return _pack(codes), scales, value.astype(np.float32)


def test_dequantize_mxfp4_on_packed_data(rng):
    blocks, scales, value = _mxfp4_of(rng, 3, 64, 10)
    assert blocks.shape == (3, 10, 2, 16) and scales.shape == (3, 10, 2)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), value)
    one = np.zeros((1, 1, 1, 16), np.uint8)
    one[0, 0, 0, 0] = 0x2F  # low nibble 15 (-6) first, high nibble 2 (+1) second
    got = dequantize_mxfp4(one, np.full((1, 1, 1), 128, np.uint8))  # scale 2**1
    assert got.shape == (1, 32, 1) and got[0, 0, 0] == -12.0 and got[0, 1, 0] == 2.0 and not got[0, 2:].any()
    with pytest.raises(CheckpointError, match="overflow"):
        dequantize_mxfp4(np.full((1, 1, 1, 16), 0x77, np.uint8), np.full((1, 1, 1), 255, np.uint8))


def test_mxfp4_gpt_oss_folder_equals_its_dequantised_twin(tmp_path, rng):
    src = DATA / "gpt_oss"
    d = json.loads((src / "config.json").read_text())
    E, D, F = d["num_local_experts"], d["hidden_size"], d["intermediate_size"]
    plain, packed = _tensors(src), _tensors(src)
    for layer in range(d["num_hidden_layers"]):
        for proj, (n_in, n_out) in (("gate_up_proj", (D, 2 * F)), ("down_proj", (F, D))):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks, scales, value = _mxfp4_of(rng, E, n_in, n_out)
            plain[key] = value
            del packed[key]
            packed[key + "_blocks"], packed[key + "_scales"] = blocks, scales
    q = _copy_folder(src, tmp_path / "q", weights=False)
    twin = _copy_folder(src, tmp_path / "twin", weights=False)
    _write(twin / "model.safetensors", plain)
    _write(q / "model.safetensors", packed)
    (q / "config.json").write_text(json.dumps({**d, "quantization_config": {"quant_method": "mxfp4",
                                                                            "modules_to_not_convert": []}}))
    _, pq, _ = load_hf(q)
    _, pt, _ = load_hf(twin)
    _same_params(pq, pt)
    # the quantised names are expected only with the quantisation config
    (q / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="missing.*gate_up_proj"):
        load_hf(q)


def test_onto_a_mesh_as_read(reference_params):
    from jax.sharding import NamedSharding

    from grokviz.sharding import make_mesh

    cfg, params, _ = load_hf(DATA / "gpt_oss", mesh=make_mesh((1, 1)))
    assert isinstance(params["blocks"]["w_gate"].sharding, NamedSharding)
    _same_params(params, reference_params("gpt_oss")[1])
