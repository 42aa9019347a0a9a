"""Loading the Grok-1 release format: golden parity, file order, every bad-checkpoint case, malicious pickles."""

import os
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import grokviz as gv
from grokviz.checkpoint.names import reference_paths
from grokviz.checkpoint.release import (
    CheckpointError,
    UnsafePickleError,
    infer_release_shapes,
    read_tensor,
    scan_release,
    tensor_files,
)
from grokviz.params import Int8Weight

DATA = Path(__file__).resolve().parent / "data"
CKPT = DATA / "grok1_golden_ckpt"


# --- writing release-format files the way the release does (class recorded as __main__.QuantizedWeight8bit) ---

class QuantizedWeight8bit:
    def __init__(self, weight, scales):
        self.weight, self.scales = weight, scales


QuantizedWeight8bit.__module__ = "__main__"
QuantizedWeight8bit.__qualname__ = "QuantizedWeight8bit"


def write_release_file(path, value, pad_to=0):
    """Pickle ``value`` as the release does; ``pad_to``: append junk after the pickle's STOP so the file keeps the
    size the config expects (pickle ignores trailing bytes), so that only the unpickler can catch it."""
    if isinstance(value, Int8Weight):
        value = QuantizedWeight8bit(np.asarray(value.weight), np.asarray(value.scales))
    import __main__

    had = hasattr(__main__, "QuantizedWeight8bit")
    __main__.QuantizedWeight8bit = QuantizedWeight8bit  # so pickle can find the class by its recorded name
    try:
        with open(path, "wb") as f:
            pickle.dump(value, f, protocol=4)
            if f.tell() < pad_to:
                f.write(b"\0" * (pad_to - f.tell()))
    finally:
        if not had:
            del __main__.QuantizedWeight8bit


def quantize(w, nb=1):
    rows = w.shape[-2]
    blocks = w.reshape(*w.shape[:-2], nb, rows // nb, w.shape[-1])
    scale = (np.abs(blocks).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)
    q = np.round(blocks / np.maximum(scale.astype(np.float32)[..., None, :], 1e-30)).astype(np.int8)
    return Int8Weight(weight=q.reshape(w.shape), scales=scale)


def write_release(root, cfg, values):
    d = Path(root) / "ckpt-0"
    d.mkdir(parents=True)
    for i, (ref, name, layer) in enumerate(reference_paths(cfg)):
        write_release_file(d / f"tensor{i:05d}_000", values(ref, name, layer))
    return Path(root)


@pytest.fixture
def bad_ckpt(tmp_path):
    """A writable copy of the golden checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    return dst


def f(root, i):
    return Path(root) / "ckpt-0" / f"tensor{i:05d}_000"


# --- golden parity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [True, False], ids=["int8-in-memory", "dequantised-fp32"])
def test_release_reproduces_golden_logits(golden, quantized):
    cfg, _, z = golden
    model = gv.load(CKPT, config=cfg, quantized=quantized, progress=False)
    w = model.params["blocks"]["w_gate"]
    if quantized:
        assert isinstance(w, Int8Weight) and w.weight.dtype == jnp.int8 and w.scales.dtype == jnp.bfloat16
        assert w.weight.shape == (2, 8, 64, 88) and model.params["blocks"]["w_down"].scales.shape == (2, 8, 8, 64)
    else:
        assert not isinstance(w, Int8Weight) and w.dtype == jnp.float32
    err = float(np.abs(np.asarray(model.run(z["tokens"]).logits) - z["logits"]).max())
    assert err < 2e-5, err


def test_release_params_equal_golden_npz(golden):
    cfg, params, _ = golden
    model = gv.load(CKPT / "ckpt-0", config=cfg, quantized=False, progress=True)  # also accepts ckpt-0 itself
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_dequantised_option(golden):
    cfg, _, z = golden
    model = gv.load(CKPT, config=cfg, quantized=False, dtype=jnp.bfloat16, progress=False)
    assert model.params["blocks"]["w_q"].dtype == jnp.bfloat16 and model.params["embed"].dtype == jnp.bfloat16


def test_inferred_shapes_and_missing_head_split():
    info = infer_release_shapes(CKPT)
    assert info == dict(num_layers=2, vocab_size=512, d_model=64, num_experts=8, ffn_size=88, q_width=64,
                        kv_width=32, files=26)
    with pytest.raises(CheckpointError, match="head split"):
        gv.load(CKPT, progress=False)  # not Grok-1 sized: the config must be given


def test_layers_are_read_in_lexicographic_file_order(tmp_path):
    """With 11+ layers file order is 0, 1, 10, 2, ... (docs/grok1.md#checkpoint): each layer's norms carry its own
    number."""
    cfg = gv.GrokConfig.golden(num_layers=11, vocab_size=32, d_model=16, num_q_heads=2, num_kv_heads=1,
                             head_dim=8, widening_factor=1)
    shapes = gv.params.shapes_dict(cfg)

    def values(ref, name, layer):
        shape = shapes[name] if layer is None else shapes["blocks"][name][1:]
        if name.endswith("norm") and layer is not None:
            return np.full(shape, layer, np.float32)
        w = np.full(shape, 0.5 if layer is None else layer + 1, np.float32)
        return quantize(w) if name in ("w_q", "w_gate") else w

    root = write_release(tmp_path / "r", cfg, values)
    assert sorted(os.listdir(root / "ckpt-0"))[:1] == ["tensor00000_000"]
    params = gv.load(root, config=cfg, progress=False).params
    np.testing.assert_array_equal(np.asarray(params["blocks"]["attn_pre_norm"])[:, 0], np.arange(11))
    np.testing.assert_array_equal(np.round(np.asarray(params["blocks"]["w_q"].dequantize())[:, 0, 0]),
                                  np.arange(1, 12))
    np.testing.assert_array_equal(np.asarray(params["blocks"]["router"])[:, 0, 0], np.arange(1, 12))


def test_files_of_one_host_only(tmp_path):
    """A multi-host directory: host 1's files hold other tensors under the same indices and must not replace
    host 0's (sorted names put ``_001`` after ``_000``)."""
    root = tmp_path / "multi"
    shutil.copytree(CKPT, root)
    for i in range(26):
        shutil.copy(f(CKPT, (i + 1) % 26), root / "ckpt-0" / f"tensor{i:05d}_001")
    assert tensor_files(root) == {i: f(root, i) for i in range(26)}
    assert tensor_files(root, host=1)[0] == root / "ckpt-0" / "tensor00000_001"
    assert infer_release_shapes(root) == infer_release_shapes(CKPT)
    with pytest.raises(CheckpointError, match=r"tensor00000_001 \(language_model/in_out_embed/embeddings\): "
                                              r"shape \(64,\), expected 2 dimensions"):
        infer_release_shapes(root, host=1)  # host 1's file 0 is a copy of a norm scale
    with pytest.raises(CheckpointError, match=r"multi: host must be an int in 0\.\.999.*-1"):
        tensor_files(root, host=-1)


# --- bad checkpoints: each error names the file and the parameter ----------------------------------------

def test_missing_file(bad_ckpt, golden):
    cfg = golden[0]
    f(bad_ckpt, 7).unlink()
    with pytest.raises(CheckpointError, match=r"tensor00007_000.*multi_head_attention/query/w"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_extra_file(bad_ckpt, golden):
    cfg = golden[0]
    shutil.copy(f(bad_ckpt, 1), f(bad_ckpt, 26))
    with pytest.raises(CheckpointError, match=r"extra tensor file.*tensor00026_000"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_config_with_wrong_layer_count(golden):
    cfg = golden[0]
    with pytest.raises(CheckpointError, match=r"missing.*tensor00026_000.*decoder_layer_2"):
        scan_release(CKPT, cfg.replace(num_layers=3))
    with pytest.raises(CheckpointError, match=r"extra"):
        scan_release(CKPT, cfg.replace(num_layers=1))


def test_truncated_file_detected_before_loading(bad_ckpt, golden):
    cfg = golden[0]
    p = f(bad_ckpt, 14)  # layer 1 moe/linear: checked before any tensor is read
    p.write_bytes(p.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match=r"tensor00014_000.*truncated.*decoder_layer_1/moe/linear/w"):
        scan_release(bad_ckpt, cfg)


def test_truncated_tail_detected_while_reading(bad_ckpt, golden):
    cfg = golden[0]
    p = f(bad_ckpt, 0)
    p.write_bytes(p.read_bytes()[:-200])  # still big enough to pass the size check
    with pytest.raises(CheckpointError,
                       match=r"tensor00000_000 \(language_model/in_out_embed/embeddings\).*truncated"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_corrupt_file(bad_ckpt, golden):
    cfg = golden[0]
    p = f(bad_ckpt, 3)
    data = bytearray(p.read_bytes())
    data[2:40] = b"\xff" * 38
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError,
                       match=r"tensor00003_000 \(transformer/decoder_layer_0/moe/linear_1/w\).*corrupt"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_not_a_pickle(bad_ckpt, golden):
    cfg = golden[0]
    f(bad_ckpt, 1).write_bytes(b"hello world, not a pickle" * 20)
    with pytest.raises(CheckpointError, match=r"tensor00001_000.*language_model/rms_norm/scale"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_wrong_shape_same_size(bad_ckpt, golden):
    cfg = golden[0]
    w = read_tensor(f(bad_ckpt, 5))  # layer 0 key: int8 [64, 32]
    swapped = Int8Weight(np.ascontiguousarray(w.weight.T), np.ones((1, 64), ml_dtypes.bfloat16))
    write_release_file(f(bad_ckpt, 5), swapped)
    with pytest.raises(CheckpointError, match=r"tensor00005_000.*multi_head_attention/key/w.*\(32, 64\).*\(64, 32\)"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_wrong_shape_too_large(bad_ckpt, golden):
    cfg = golden[0]
    write_release_file(f(bad_ckpt, 1), np.ones((64, 64), np.float32))  # final norm should be [64]
    with pytest.raises(CheckpointError, match=r"tensor00001_000.*too large.*language_model/rms_norm/scale"):
        scan_release(bad_ckpt, cfg)


def test_scales_that_do_not_fit(bad_ckpt, golden):
    cfg = golden[0]
    w = read_tensor(f(bad_ckpt, 6))  # attention output linear, scales [8, 64]
    write_release_file(f(bad_ckpt, 6), Int8Weight(w.weight, np.ones((7, 64), ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError, match=r"tensor00006_000.*linear/w.*scales of shape \(7, 64\)"):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_quantised_where_release_never_quantises(bad_ckpt, golden):
    cfg = golden[0]
    write_release_file(f(bad_ckpt, 1), Int8Weight(np.ones((1, 64), np.int8), np.ones((1, 64), ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError):
        gv.load(bad_ckpt, config=cfg, progress=False)


def test_object_dtype_refused(tmp_path):
    p = tmp_path / "obj"
    p.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"obj"):
        read_tensor(p)


# --- malicious pickles: nothing runs ---------------------------------------------------------------------

CALLED = []


def _record_call(*args):  # a function a pickle might try to call
    CALLED.append(args)
    return np.zeros(3, np.float32)


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _CallFunction:
    def __reduce__(self):
        return (_record_call, ("pwned",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


@pytest.mark.parametrize("kind", ["os.system", "open", "function", "eval", "nested-in-quantized"])
def test_malicious_pickle_is_refused_and_nothing_runs(bad_ckpt, golden, tmp_path, kind):
    cfg = golden[0]
    marker = tmp_path / "PWNED"
    payload = {"os.system": _SystemCall(marker), "open": _OpenFile(marker), "function": _CallFunction(),
               "eval": _Eval(marker)}.get(kind)
    target = f(bad_ckpt, 1)
    if kind == "nested-in-quantized":
        target = f(bad_ckpt, 5)
        payload = QuantizedWeight8bit(_SystemCall(marker), np.ones((1, 32), ml_dtypes.bfloat16))
    write_release_file(target, payload, pad_to=target.stat().st_size)
    names = {"os.system": r"(posix|os|nt)\.system", "open": r"(builtins|io)\.open", "function": r"[\w.]*_record_call",
             "eval": r"builtins\.eval", "nested-in-quantized": r"(posix|os|nt)\.system"}[kind]
    CALLED.clear()
    with pytest.raises(UnsafePickleError, match=rf"{target.name}.*refused to load global {names}"):
        gv.load(bad_ckpt, config=cfg, progress=False)
    assert not marker.exists(), "the pickle's payload ran"
    assert CALLED == []


def test_malicious_array_subclass_refused(tmp_path):
    """The reconstructor may only build a plain ndarray, even when asked for another (allowed-looking) class."""
    p = tmp_path / "masked"
    p.write_bytes(pickle.dumps(np.ma.masked_array([1.0, 2.0], mask=[0, 1]), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"masked.*refused to load global numpy\.ma"):
        read_tensor(p)
