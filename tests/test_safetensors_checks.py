"""Converted checkpoints trust nothing in their files: every safetensors header lie, every wrongly shaped tensor
and every malformed index is refused with an error naming the file and the tensor (never a broadcast, a NaN or
a bare KeyError)."""

import json
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import grokviz as gv
from grokviz import cli
from grokviz.checkpoint import converted as cv
from grokviz.checkpoint.assemble import ParamAssembler
from grokviz.checkpoint.release import CheckpointError
from grokviz.checkpoint.safetensors_io import ConvertedCheckpointError, SafetensorsError, read_safetensors_header
from grokviz.params import Int8Weight

SHARD = "model-00001-of-00001.safetensors"


def write_st(path, header, data: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# a valid two-tensor file: a = F32 [2, 2] (16 bytes), b = BF16 [3] (6 bytes)
GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}


def lie(**changes):
    h = json.loads(json.dumps(GOOD))
    for key, entry in changes.items():
        h[key] = entry if not isinstance(entry, dict) else {**h.get(key, {}), **entry}
    return h


def test_a_valid_file_reads(tmp_path):
    entries, start = read_safetensors_header(write_st(tmp_path / "ok.safetensors", GOOD, bytes(22)))
    assert entries["a"]["shape"] == (2, 2) and entries["b"]["np_dtype"] == np.dtype(ml_dtypes.bfloat16)
    assert start == 8 + len(json.dumps(GOOD))


HEADER_LIES = {
    "unknown dtype": (lie(a={"dtype": "F8_E9M9"}), 22, r"tensor a: dtype 'F8_E9M9'"),
    "flipped dtype (F32 read as BF16)": (lie(a={"dtype": "BF16"}), 22, r"tensor a: data_offsets \[0, 16\] span 16"),
    "dtype not a string": (lie(a={"dtype": 5}), 22, r"tensor a: dtype 5"),
    "negative dim": (lie(a={"shape": [-2, -2]}), 22, r"tensor a: shape \[-2, -2\]"),
    "shape not a list": (lie(a={"shape": "2x2"}), 22, r"tensor a: shape '2x2'"),
    "float dim": (lie(a={"shape": [2.0, 2]}), 22, r"tensor a: shape \[2.0, 2\]"),
    "bool dim": (lie(a={"shape": [True, 4]}), 22, r"tensor a: shape \[True, 4\]"),
    "one offset": (lie(a={"data_offsets": [0]}), 22, r"tensor a: data_offsets \[0\]"),
    "string offset": (lie(a={"data_offsets": [0, "16"]}), 22, r"tensor a: data_offsets"),
    "negative offsets": (lie(a={"data_offsets": [-16, 0]}), 22, r"tensor a: data_offsets \[-16, 0\]"),
    "reversed offsets": (lie(a={"data_offsets": [16, 0]}), 22, r"tensor a: data_offsets \[16, 0\]"),
    "swapped offsets": (lie(a={"data_offsets": [16, 22]}, b={"data_offsets": [0, 16]}), 22,
                        r"tensor a: data_offsets \[16, 22\] span 6 bytes but F32 \[2, 2\] needs 16"),
    "overlapping tensors": (lie(b={"data_offsets": [10, 16]}, c={"dtype": "U8", "shape": [6],
                                                              "data_offsets": [16, 22]}),
                            22, r"tensor b: .*overlaps a|tensor b:.*span"),
    "overlap with exact spans": (lie(a={"shape": [1, 2], "data_offsets": [0, 8]},
                                     b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}),
                                 12, r"tensor b: data_offsets \[4, 12\] overlaps a"),
    "gap between tensors": (lie(b={"data_offsets": [18, 24]}), 24, r"tensor b: .*gap of 2 bytes after a"),
    "data before the first tensor": (lie(a={"data_offsets": [2, 18]}, b={"data_offsets": [18, 24]}), 24,
                                     r"tensor a: .*gap of 2 bytes after the header"),
    "bytes no entry covers": (GOOD, 30, r"8 bytes after the last tensor"),
    "truncated data": (GOOD, 20, r"tensor b extends past the end of the file \(truncated\)"),
    "entry missing data_offsets": ({**GOOD, "a": {"dtype": "F32", "shape": [2, 2]}}, 22,
                                   r"tensor a: header entry must have dtype, shape and data_offsets"),
    "entry not an object": ({**GOOD, "a": [0, 16]}, 22, r"tensor a: header entry must have"),
    "header not an object": (b"[1, 2]      ", 0, r"header is a JSON list"),
    "metadata not an object": ({**GOOD, "__metadata__": "np"}, 22, r"__metadata__ is a str"),
    "corrupt JSON": (b'{"a": ', 0, r"corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_header_lie_is_refused_naming_file_and_tensor(tmp_path, case):
    header, nbytes, pattern = HEADER_LIES[case]
    f = write_st(tmp_path / "lie.safetensors", header, bytes(nbytes))
    with pytest.raises(SafetensorsError, match=pattern) as exc:
        read_safetensors_header(f)
    assert str(f) in str(exc.value)


def test_header_length_lies(tmp_path):
    f = tmp_path / "len.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsError, match="corrupt safetensors header length"):
        read_safetensors_header(f)
    f.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(SafetensorsError, match=r"truncated safetensors file \(header of 100 bytes"):
        read_safetensors_header(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="no header"):
        read_safetensors_header(f)


def test_error_hierarchy():
    assert issubclass(SafetensorsError, ConvertedCheckpointError)
    assert issubclass(ConvertedCheckpointError, CheckpointError)
    assert cv.ConvertedCheckpointError is ConvertedCheckpointError and issubclass(CheckpointError, ValueError)


# --- whole checkpoints ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(golden, tmp_path_factory):
    cfg, params, _ = golden
    return cv.save(params, tmp_path_factory.mktemp("st") / "fp32", cfg)


def rewrite_header(shard, edit):
    """Change a shard's header in place (keeping its length), as a tampered or buggy writer would."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    assert len(raw) <= n
    shard.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_swapped_offsets_of_a_real_shard_do_not_load(saved, tmp_path):
    bad = copy(saved, tmp_path / "swap")

    def swap(h):  # embed [512, 64] and final_norm [64] trade byte ranges
        h["embed"]["data_offsets"], h["final_norm"]["data_offsets"] = (h["final_norm"]["data_offsets"],
                                                                        h["embed"]["data_offsets"])
    rewrite_header(bad / SHARD, swap)
    with pytest.raises(SafetensorsError, match=rf"{SHARD}: tensor (embed|final_norm): data_offsets"):
        gv.load(bad, progress=False)


def test_layer_tensor_of_shape_1_is_not_broadcast(golden, tmp_path):
    cfg, params, _ = golden
    stream = list(cv.params_tensors(params, cfg))
    i = next(k for k, (n, l, _) in enumerate(stream) if n == "attn_pre_norm" and l == 1)
    stream[i] = ("attn_pre_norm", 1, np.ones((1,), np.float32))  # would broadcast into the [2, 64] buffer
    dst = cv.write_checkpoint(tmp_path / "b", cfg, iter(stream))
    with pytest.raises(CheckpointError, match=rf"{SHARD}: tensor layers\.1\.attn_pre_norm: attn_pre_norm layer 1: "
                                              rf"shape \(1,\), config 'grok1-golden' expects \(64,\)"):
        gv.load(dst, progress=False)


def test_assembler_checks_every_tensor_exactly(golden):
    cfg = golden[0]
    asm = ParamAssembler(cfg)
    with pytest.raises(CheckpointError, match=r"f.bin: embed: shape \(512, 1\), config 'grok1-golden' expects "
                                              r"\(512, 64\)"):
        asm.put("embed", None, np.zeros((512, 1), np.float32), where="f.bin")
    with pytest.raises(CheckpointError, match=r"w_q layer 2 is not one of the config's layers 0-1"):
        asm.put("w_q", 2, np.zeros((64, 64), np.float32))
    with pytest.raises(CheckpointError, match="unknown parameter 'w_qq'"):
        asm.put("w_qq", 0, np.zeros((64, 64), np.float32))
    with pytest.raises(CheckpointError, match=r"embed: dtype int32, expected a float type"):
        asm.put("embed", None, np.zeros((512, 64), np.int32))
    u8 = Int8Weight(np.zeros((64, 64), np.uint8), np.ones((1, 64), np.float32))
    with pytest.raises(CheckpointError, match="quantised weight has dtype uint8, expected int8"):
        asm.put("w_q", 0, u8)
    with pytest.raises(CheckpointError, match=r"scales of shape \(3, 64\) do not fit"):
        asm.put("w_q", 0, Int8Weight(np.zeros((64, 64), np.int8), np.ones((3, 64), np.float32)))
    asm.put("w_q", 0, np.zeros((64, 64), np.float32))
    with pytest.raises(CheckpointError, match="w_q layer 0 arrived twice"):
        asm.put("w_q", 0, np.zeros((64, 64), np.float32))


def test_quantised_top_level_leaves(golden, tmp_path):
    cfg, params, _ = golden
    emb = np.asarray(params["embed"])
    scales = (np.abs(emb).max(0, keepdims=True) / 127).astype(ml_dtypes.bfloat16)
    q = np.clip(np.round(emb / scales.astype(np.float32)), -127, 127).astype(np.int8)
    qparams = {**params, "embed": Int8Weight(jnp.asarray(q), jnp.asarray(scales))}
    dst = cv.save(gv.Model(cfg, qparams), tmp_path / "qe")  # exporting a quantised top-level leaf
    kept = gv.load(dst, progress=False).params["embed"]
    assert isinstance(kept, Int8Weight)
    np.testing.assert_array_equal(np.asarray(kept.weight), q)
    deq = gv.load(dst, quantized=False, progress=False).params["embed"]
    np.testing.assert_array_equal(np.asarray(deq), q.astype(np.float32) * scales.astype(np.float32))
    asm = ParamAssembler(cfg)
    with pytest.raises(CheckpointError, match=r"final_norm: scales of shape \(1, 64\) do not fit"):
        asm.put("final_norm", None, Int8Weight(np.zeros((64,), np.int8), np.ones((1, 64), np.float32)))


def test_exporting_int8_params(golden, tmp_path):
    cfg = golden[0]
    model = gv.load(Path(__file__).parent / "data" / "grok1_golden_ckpt", config=cfg, progress=False)
    with pytest.raises(TypeError, match=r"needs its config: save\(params, dst, cfg=\.\.\.\)"):
        cv.save(model.params, tmp_path / "x")
    dst = cv.save(model.params, tmp_path / "int8", cfg)
    back = gv.load(dst, progress=False).params["blocks"]["w_down"]
    assert isinstance(back, Int8Weight) and back.weight.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(model.params["blocks"]["w_down"].scales))
    broken = {**model.params, "blocks": {**model.params["blocks"], "w_q": (1, 2)}}
    with pytest.raises(ValueError, match=r"params\['blocks'\]\['w_q'\]"):
        cv.save(broken, tmp_path / "y", cfg)
    assert not (tmp_path / "y").exists()


def test_malformed_index_is_named(saved, tmp_path):
    bad = copy(saved, tmp_path / "idx")
    index = json.loads((bad / cv.INDEX).read_text())
    for edit, pattern in [(lambda i: i.update(weight_map=[1]), "weight_map must map"),
                          (lambda i: i.update(files={SHARD: {"sha256": 3}}), r"files\['model-00001"),
                          (lambda i: i.pop("version"), "version None"),
                          (lambda i: i["weight_map"].update({"layers.x.w_q": SHARD}), "unrecognised tensor name")]:
        i = json.loads(json.dumps(index))
        edit(i)
        (bad / cv.INDEX).write_text(json.dumps(i))
        with pytest.raises(ConvertedCheckpointError, match=pattern):
            gv.load(bad, progress=False)
    (bad / cv.INDEX).write_text("[]")
    with pytest.raises(ConvertedCheckpointError, match="index is a JSON list"):
        cv.read_index(bad)


def test_shard_holding_an_unlisted_tensor(saved, tmp_path):
    bad = copy(saved, tmp_path / "unlisted")
    index = json.loads((bad / cv.INDEX).read_text())
    del index["weight_map"]["layers.0.router"]
    (bad / cv.INDEX).write_text(json.dumps(index))
    with pytest.raises(ConvertedCheckpointError, match=r"in the shard but not listed \['layers.0.router'\]"):
        gv.load(bad, progress=False)


def test_cli_inspect_of_a_bad_shard_is_one_line(saved, tmp_path, capsys):
    bad = copy(saved, tmp_path / "cli")
    rewrite_header(bad / SHARD, lambda h: h["embed"].update(dtype="BF16"))
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("grokviz inspect: error: ") and f"{SHARD}: tensor embed" in err
    (bad / SHARD).write_bytes(b"\xff" * 4)
    assert cli.main(["inspect", str(bad)]) == 1
    assert "no header" in capsys.readouterr().err
