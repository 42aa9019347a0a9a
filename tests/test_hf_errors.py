"""Hugging Face folders: what is refused (each message names the file, the tensor or field, and what was expected),
the tokenizer, and ``grokviz inspect`` / ``verify`` / ``convert`` on a folder (the converted copy round-trips)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import grokviz as gv
from grokviz.checkpoint.hf import is_hf, load_hf
from grokviz.checkpoint.hf_config import config_from_hf
from grokviz.checkpoint.release import CheckpointError
from grokviz.checkpoint.safetensors_io import _ShardWriter, memmap_tensor, read_safetensors_header
from grokviz.cli import main
from grokviz.hf_tokenizer import HFTokenizer

DATA = Path(__file__).parent / "data" / "hf"


def _config(family: str) -> dict:
    return json.loads((DATA / family / "config.json").read_text())


def _folder(tmp_path: Path, family: str, *, edit=None, config=None) -> Path:
    """A copy of a golden folder; ``edit(tensors)`` rewrites its tensors, ``config`` replaces config.json."""
    dst = tmp_path / family
    dst.mkdir()
    for f in (DATA / family).iterdir():
        if f.name != "golden.npz":
            shutil.copyfile(f, dst / f.name)
    if edit is not None:
        entries, start = read_safetensors_header(dst / "model.safetensors")
        tensors = {k: np.array(memmap_tensor(dst / "model.safetensors", e, start)) for k, e in entries.items()}
        edit(tensors)
        w = _ShardWriter(dst / "model.safetensors", 64 << 10)
        for k, v in tensors.items():
            w.add(k, v)
        w.close()
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_model_type_lists_the_supported(tmp_path):
    folder = _folder(tmp_path, "mixtral", config={**_config("mixtral"), "model_type": "llama"})
    assert is_hf(folder)
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llama' is not supported \(supported: mixtral, "
                                         r"olmoe, qwen2_moe, qwen3_moe, granitemoe, gpt_oss\)"):
        gv.load(folder, progress=False)


@pytest.mark.parametrize("change, match", [
    ({"clip_qkv": 8.0}, "clip_qkv = 8.0 is not supported for model_type 'olmoe'"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'.*SiLU only"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type = 'linear'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}},
     r"rope_parameters = \['factor'\]"),
    ({"some_new_switch": True}, "some_new_switch = True.*refused rather than ignored"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"sliding_window": 16}, "sliding_window = 16.*olmoe models attend to the whole prefix"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder = True"),
    ({"num_experts": 16, "num_local_experts": 8}, "num_experts=16 and num_local_experts=8"),
    ({"head_dim": 8}, "head_dim = 8.*hidden_size / heads"),
])
def test_unsupported_config_values_are_refused(change, match):
    with pytest.raises(ValueError, match=match) as e:
        config_from_hf({**_config("olmoe"), **change}, where="/x/config.json")
    assert str(e.value).startswith("/x/config.json: ")


def test_sliding_window_rules():
    q2 = _config("qwen2_moe")
    on = config_from_hf({**q2, "use_sliding_window": True, "sliding_window": 8, "layer_types": None,
                         "max_window_layers": 28})
    assert on.sliding_window == 8 and on.layer_types == ("sliding", "full")  # transformers' default pattern
    with pytest.raises(ValueError, match="sliding_window = 0.*use_sliding_window must be true"):
        config_from_hf({**q2, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ValueError, match="layer_types = \\['full_attention'\\]"):
        config_from_hf({**_config("gpt_oss"), "layer_types": ["full_attention"]})
    q3 = config_from_hf({**_config("qwen3_moe"), "use_sliding_window": True, "sliding_window": 6})
    assert q3.sliding_window == 6 and all(q3.layer_is_sliding)
    assert config_from_hf({**_config("qwen3_moe"), "sliding_window": 6}).sliding_window is None  # not in use
    mix = config_from_hf({**_config("mixtral"), "sliding_window": 5})
    assert mix.sliding_window == 5 and all(mix.layer_is_sliding)


def test_dense_layers_of_qwen():
    cfg = config_from_hf({**_config("qwen3_moe"), "num_hidden_layers": 4, "mlp_only_layers": [0],
                          "decoder_sparse_step": 2})
    assert cfg.moe_layer_ids == (1, 3) and cfg.dense_layer_ids == (0, 2) and cfg.dense_ffn == 128
    with pytest.raises(ValueError, match=r"mlp_only_layers = \[7\]"):
        config_from_hf({**_config("qwen3_moe"), "mlp_only_layers": [7]})


def _drop(key):
    return lambda t: t.pop(key)


def _misshape(key):
    def edit(t):
        t[key] = t[key][:-1]
    return edit


def _add(key, like):
    def edit(t):
        t[key] = np.zeros_like(t[like])
    return edit


@pytest.mark.parametrize("family, edit, match", [
    ("mixtral", _drop("model.layers.1.block_sparse_moe.experts.5.w3.weight"),
     r"missing from the checkpoint, e\.g\. \['model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight'\]"),
    ("granitemoe", _misshape("model.layers.0.block_sparse_moe.input_linear.weight"),
     r"model\.safetensors: tensor model\.layers\.0\.block_sparse_moe\.input_linear\.weight: shape \[7, 96, 64\], "
     r"but config\.json implies \[8, 96, 64\]"),
    ("qwen3_moe", _add("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_norm.weight"),
     r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias \(a tensor of this family "
     r"that this config does not use"),
    ("granitemoe", _add("lm_head.weight", "model.embed_tokens.weight"), r"unexpected tensor lm_head\.weight.*tie_word"),
    ("olmoe", _add("model.layers.0.mlp.mystery.weight", "model.norm.weight"),
     r"unexpected tensor model\.layers\.0\.mlp\.mystery\.weight \(not a tensor name of the olmoe family\)"),
])
def test_tensor_errors_name_file_tensor_and_expectation(tmp_path, family, edit, match):
    folder = _folder(tmp_path, family, edit=edit)
    with pytest.raises(CheckpointError, match=match):
        gv.load(folder, progress=False)


def test_wrong_dtype_and_truncated_file(tmp_path):
    def as_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    folder = _folder(tmp_path, "olmoe", edit=as_int)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight: dtype I32, expected a float type"):
        load_hf(folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* extends past the end of the file"):
        load_hf(folder)


def test_tokenizer(tmp_path):
    tok = HFTokenizer(DATA / "mixtral" / "tokenizer.json")
    assert tok.vocab_size == 488 and tok.pad_id == 0 and tok.eos_id == 2 and tok.id_to_piece(1) == "<s>"
    ids = tok.encode("the cat sat on the mat")
    assert ids and min(ids) >= 4 and tok.decode(ids) == "the cat sat on the mat"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_piece(488)
    model = gv.load(DATA / "mixtral", progress=False)
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.encode("cat") == tok.encode("cat")
    assert gv.load(DATA / "mixtral", progress=False, tokenizer=False).tokenizer is None


def test_cli_inspect_verify_convert_roundtrip(tmp_path, capsys):
    src = DATA / "gpt_oss"
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "family:     gpt_oss" in out and "tensors:    37" in out and "L=2 D=64" in out
    assert main(["verify", str(src)]) == 0
    assert "all 37 tensors" in capsys.readouterr().out
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert not is_hf(dst)
    back = gv.load(dst, progress=False)
    cfg, params, _ = load_hf(src)
    assert back.cfg == cfg  # the family fields (layer_types, yarn, sinks, biases, ...) survive the config JSON
    assert back.tokenizer is not None and back.tokenizer.encode("hello") == gv.load(src).tokenizer.encode("hello")
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(back.params),
                                 jax.tree_util.tree_leaves_with_path(params)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), path
    assert main(["verify", str(dst)]) == 0
    broken = _folder(tmp_path, "olmoe", edit=_drop("model.norm.weight"))
    assert main(["verify", str(broken)]) == 1
    assert "model.norm.weight" in capsys.readouterr().err
