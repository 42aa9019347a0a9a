"""Converted format: bit-exact round trip, memory-mapped reading without a config, hashes, atomic writes, CLI."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import grokviz as gv
from grokviz import cli
from grokviz.checkpoint import converted as cv
from grokviz.checkpoint.manifest import MANIFEST_NAME, verify_release
from grokviz.checkpoint.release import CheckpointError
from grokviz.tokenizer import find_grok1_tokenizer

DATA = Path(__file__).resolve().parent / "data"
CKPT = DATA / "grok1_golden_ckpt"


def same_params(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def release_model(golden):
    return gv.load(CKPT, config=golden[0], progress=False)


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "grok1-tiny"
    cv.convert(CKPT, dst, config=golden[0], progress=False)
    return dst


def test_layout_and_index(converted):
    names = sorted(os.listdir(converted))
    assert names == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    index = json.loads((converted / cv.INDEX).read_text())
    assert index["format"] == cv.FORMAT
    for fname, rec in index["files"].items():
        assert rec["sha256"] == hashlib.sha256((converted / fname).read_bytes()).hexdigest()
    assert index["weight_map"]["layers.1.w_down.scales"] == "model-00001-of-00001.safetensors"
    assert not any(n.startswith(".") for n in os.listdir(converted.parent))  # no temp dirs left


def test_round_trip_is_bit_exact_and_needs_no_config(converted, release_model, golden):
    model = gv.load(converted, progress=False)  # no config argument
    assert model.cfg == golden[0]
    same_params(model.params, release_model.params)
    z = golden[2]
    np.testing.assert_array_equal(np.asarray(model.run(z["tokens"]).logits),
                                  np.asarray(release_model.run(z["tokens"]).logits))
    assert float(np.abs(np.asarray(model.run(z["tokens"]).logits) - z["logits"]).max()) < 2e-5


def test_reading_is_memory_mapped(converted):
    items = list(cv.iter_converted(converted, progress=False))
    w = next(v for n, l, v in items if n == "w_gate")
    assert isinstance(w.weight, np.memmap) and w.weight.dtype == np.int8


def test_dequantised_load_of_converted(converted, golden):
    model = gv.load(converted, quantized=False, progress=False)
    same_params(model.params, golden[1])


def test_shards_readable_by_safetensors(converted):
    from safetensors.numpy import load_file

    t = load_file(str(converted / "model-00001-of-00001.safetensors"))
    assert t["layers.0.w_q.weight"].dtype == np.int8 and str(t["layers.0.w_q.scales"].dtype) == "bfloat16"
    assert t["embed"].shape == (512, 64)


def test_many_shards_round_trip(tmp_path, release_model, golden):
    dst = cv.convert(CKPT, tmp_path / "sharded", config=golden[0], progress=False, max_shard_bytes=60_000)
    shards = [n for n in os.listdir(dst) if n.endswith(".safetensors")]
    assert len(shards) > 4
    same_params(gv.load(dst, verify=True, progress=False).params, release_model.params)


def test_save_in_memory_model(tmp_path, golden):
    cfg, params, _ = golden
    dst = cv.save(gv.Model(cfg, params), tmp_path / "fp32")
    same_params(gv.load(dst, progress=False).params, params)


def test_verify_names_the_changed_file(converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    assert set(cv.verify(bad)) == set(json.loads((bad / cv.INDEX).read_text())["files"])
    shard = bad / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(cv.ConvertedCheckpointError, match=r"model-00001-of-00001\.safetensors: sha256"):
        cv.verify(bad)
    with pytest.raises(cv.ConvertedCheckpointError, match="model-00001-of-00001"):
        gv.load(bad, verify=True, progress=False)
    (bad / "config.json").unlink()
    with pytest.raises(cv.ConvertedCheckpointError, match=r"config\.json: missing"):
        cv.verify(bad)
    assert cli.main(["verify", str(bad)]) == 1


def test_truncated_shard_detected(converted, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(converted, bad)
    shard = bad / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(cv.ConvertedCheckpointError, match=r"model-00001-of-00001.*truncated"):
        gv.load(bad, progress=False)


def test_interrupted_conversion_leaves_nothing(tmp_path, golden, monkeypatch):
    import grokviz.checkpoint.release as rl

    real = rl.read_tensor
    count = {"n": 0}

    def flaky(path, param=None):
        count["n"] += 1
        if count["n"] == 10:
            raise KeyboardInterrupt("simulated interruption")
        return real(path, param)

    monkeypatch.setattr(rl, "read_tensor", flaky)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cv.convert(CKPT, dst, config=golden[0], progress=False)
    assert not dst.exists()
    assert os.listdir(tmp_path) == []  # the temporary directory was removed too


def test_existing_destination(tmp_path, golden, converted):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        cv.convert(CKPT, dst, config=golden[0], progress=False)
    assert (dst / "keep").exists()
    cv.convert(CKPT, dst, config=golden[0], progress=False, overwrite=True)
    assert not (dst / "keep").exists() and cv.verify(dst)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_tokenizer_travels_with_the_checkpoint(tmp_path, golden):
    tok = find_grok1_tokenizer()
    if tok is None:
        pytest.skip("Grok-1 tokenizer.model not available (../shared/reference or $GROKVIZ_GROK1_TOKENIZER)")
    src = tmp_path / "release"
    shutil.copytree(CKPT, src)
    shutil.copy(tok, src / "tokenizer.model")
    assert gv.load(src, config=golden[0], progress=False).tokenizer is not None
    dst = cv.convert(src, tmp_path / "conv", config=golden[0], progress=False)
    assert "tokenizer.model" in json.loads((dst / cv.INDEX).read_text())["files"]
    assert gv.load(dst, progress=False).tokenizer.vocab_size == 131072


# --- manifest of a release directory -----------------------------------------------------------------------

def test_manifest_and_release_verify(tmp_path, capsys):
    from grokviz.checkpoint.manifest import format_manifest, manifest
    m = manifest(CKPT)
    assert len(m) == 26 and m["ckpt-0/tensor00000_000"] == hashlib.sha256(
        (CKPT / "ckpt-0" / "tensor00000_000").read_bytes()).hexdigest()
    assert cli.main(["manifest", str(CKPT), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out == format_manifest(m) and out.splitlines()[0].endswith("  ckpt-0/tensor00000_000")

    rel = tmp_path / "rel"
    shutil.copytree(CKPT, rel)
    (rel / MANIFEST_NAME).write_text(out)  # as a user would with published checksums (sha256sum format)
    assert len(verify_release(rel)) == 26  # the 26 tensor files it lists
    p = rel / "ckpt-0" / "tensor00004_000"
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match=r"ckpt-0/tensor00004_000: sha256"):
        gv.load(rel, config=tmp_config(tmp_path), verify=True, progress=False)


def tmp_config(tmp_path):
    z = np.load(DATA / "grok1_golden.npz")
    p = tmp_path / "golden_config.json"
    p.write_text(str(z["config_json"]))
    return p


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_convert_inspect_verify(tmp_path, capsys, release_model):
    cfg_json = tmp_config(tmp_path)
    dst = tmp_path / "cli-out"
    assert cli.main(["convert", str(CKPT), str(dst), "--config", str(cfg_json), "--quiet"]) == 0
    same_params(gv.load(dst, progress=False).params, release_model.params)
    capsys.readouterr()
    assert cli.main(["verify", str(dst)]) == 0
    assert "OK: 2 files" in capsys.readouterr().out
    assert cli.main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "grokviz-safetensors" in out and "329,280" in out and "I8: 294,912" in out and "BF16" in out
    assert cli.main(["inspect", str(CKPT)]) == 0
    out = capsys.readouterr().out
    assert "release" in out and "'q_width': 64" in out and "pass --config" in out
    assert cli.main(["inspect", str(CKPT), "--config", str(cfg_json), "--plan", "--mesh", "2x4"]) == 0
    assert "mesh (data, model) = (2, 4)" in capsys.readouterr().out


def test_cli_convert_without_config_for_a_non_grok1_release(tmp_path, capsys):
    assert cli.main(["convert", str(CKPT), str(tmp_path / "x"), "--quiet"]) == 1
    assert "head split" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_train_delegates(monkeypatch, capsys):
    import sys
    import types

    calls = []
    fake = types.ModuleType("grokviz.train")
    fake.cli_main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "grokviz.train", fake)
    assert cli.main(["train", "--steps", "3"]) == 0 and calls == [["--steps", "3"]]
    monkeypatch.setitem(sys.modules, "grokviz.train", None)  # import fails
    assert cli.main(["train"]) == 2
    assert "grokviz train is not available" in capsys.readouterr().err


# --- crash leftovers, the overwrite swap, permissions ------------------------------------------------------

def dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def small_stream(golden, fail_after=None):
    cfg, params, _ = golden
    for i, item in enumerate(cv.params_tensors(params, cfg)):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("simulated crash inside the tensor stream")
        yield item


def test_crash_in_the_stream_during_overwrite_keeps_the_old_checkpoint(tmp_path, golden):
    cfg = golden[0]
    dst = cv.write_checkpoint(tmp_path / "out", cfg, small_stream(golden))
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(RuntimeError, match="simulated crash"):
        cv.write_checkpoint(dst, cfg, small_stream(golden, fail_after=7), overwrite=True, max_shard_bytes=50_000)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert os.listdir(tmp_path) == ["out"]


def test_killed_runs_leave_nothing_behind_after_the_next_write(tmp_path, golden):
    cfg, dead = golden[0], dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-abc123_x", tmp_path / f".out.old-{dead}-zz9"]
    alive = tmp_path / f".out.tmp-{os.getpid()}-inprogress"  # a concurrent write of this process: kept
    other = tmp_path / f".other.tmp-{dead}-abc"                # another destination's: kept
    lookalike = tmp_path / f".out.tmp-{dead}-a.b"              # not a name we make: kept
    for d in [*stale, alive, other, lookalike]:
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "out").mkdir()  # dst exists, so the .old- backup is garbage, not something to restore
    with pytest.warns(UserWarning, match=rf"removed \.out\.tmp-{dead}-abc123_x"):
        cv.write_checkpoint(tmp_path / "out", cfg, small_stream(golden), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["out", alive.name, other.name, lookalike.name])
    assert cv.verify(tmp_path / "out")


def test_an_overwrite_killed_mid_swap_is_restored(tmp_path, golden):
    cfg, dead = golden[0], dead_pid()
    old = cv.write_checkpoint(tmp_path / "v1", cfg, small_stream(golden))
    # the state a kill between "old -> backup" and "new -> dst" leaves: no dst, the backup, the new temp folder
    os.rename(old, tmp_path / f".out.old-{dead}-k1ll3d")
    (tmp_path / f".out.tmp-{dead}-n3w").mkdir()
    with pytest.warns(UserWarning, match=r"restored .*out from \.out\.old-"):
        with pytest.raises(FileExistsError):
            cv.write_checkpoint(tmp_path / "out", cfg, small_stream(golden))
    assert sorted(os.listdir(tmp_path)) == ["out"] and cv.verify(tmp_path / "out")


def test_a_failing_swap_puts_the_old_checkpoint_back(tmp_path, golden, monkeypatch):
    from grokviz.checkpoint import fsutil

    cfg = golden[0]
    dst = cv.write_checkpoint(tmp_path / "out", cfg, small_stream(golden))
    before = (dst / cv.INDEX).read_text()
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # no atomic exchange: the two-rename path
    real = os.rename

    def flaky(a, b):
        if Path(b) == dst and ".tmp-" in Path(a).name:
            raise OSError("simulated failure renaming the new folder into place")
        return real(a, b)

    monkeypatch.setattr(fsutil.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated failure"):
        cv.write_checkpoint(dst, cfg, small_stream(golden), overwrite=True, max_shard_bytes=50_000)
    assert (dst / cv.INDEX).read_text() == before and os.listdir(tmp_path) == ["out"]
    monkeypatch.setattr(fsutil.os, "rename", real)
    cv.write_checkpoint(dst, cfg, small_stream(golden), overwrite=True, max_shard_bytes=50_000)
    assert len(cv.read_index(dst)["files"]) > 2 and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_the_folder_gets_the_umask_permissions(tmp_path, golden, umask, mode):
    old = os.umask(umask)
    try:
        dst = cv.write_checkpoint(tmp_path / "out", golden[0], small_stream(golden))
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == mode
    assert (dst / cv.CONFIG).stat().st_mode & 0o777 == mode & 0o666


# --- verify: full coverage, paths confined to the folder ---------------------------------------------------

@pytest.fixture
def small(tmp_path, golden):
    return cv.write_checkpoint(tmp_path / "ck", golden[0], small_stream(golden), max_shard_bytes=800_000)


def edit_index(path, fn):
    index = json.loads((path / cv.INDEX).read_text())
    fn(index)
    (path / cv.INDEX).write_text(json.dumps(index))


def test_verify_reports_what_it_matched(small):
    ok = cv.verify(small)
    assert sorted(ok) == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert cli.main(["verify", str(small)]) == 0


def test_verify_refuses_an_index_that_covers_nothing(small):
    edit_index(small, lambda i: i.update(files={}))
    with pytest.raises(cv.ConvertedCheckpointError, match=r"(?s)model-00001-of-00002.safetensors: shard named in the "
                                                          r"weight_map but not in files.*config\.json: not in files"):
        cv.verify(small)


def test_verify_refuses_an_index_without_a_shard(small):
    edit_index(small, lambda i: i["files"].pop("model-00002-of-00002.safetensors"))
    with pytest.raises(cv.ConvertedCheckpointError, match=r"model-00002-of-00002.safetensors: shard named in the "
                                                          r"weight_map but not in files"):
        cv.verify(small)
    assert cli.main(["verify", str(small)]) == 1


def test_verify_refuses_uncovered_files_of_the_format(small):
    (small / "model-00003-of-00002.safetensors").write_bytes(b"extra")
    with pytest.raises(cv.ConvertedCheckpointError, match=r"model-00003-of-00002.safetensors: present in the folder "
                                                          r"but not in the index"):
        cv.verify(small)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_index_paths_outside_the_folder_are_refused(small, name):
    def point(i):
        i["files"][name] = {"sha256": "0" * 64, "bytes": 1}

    edit_index(small, point)
    with pytest.raises(cv.ConvertedCheckpointError, match="outside the checkpoint folder"):
        cv.verify(small)
    edit_index(small, lambda i: (i["files"].pop(name), i["weight_map"].update(embed=name)))
    with pytest.raises(cv.ConvertedCheckpointError, match="outside the checkpoint folder"):
        gv.load(small, progress=False)


def test_symlinks_escaping_the_folder_are_refused(small, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(small / "model-00002-of-00002.safetensors", outside)
    (small / "model-00002-of-00002.safetensors").symlink_to(outside)
    with pytest.raises(cv.ConvertedCheckpointError, match="resolves to .*elsewhere.safetensors, outside the "
                                                          "checkpoint folder"):
        gv.load(small, verify=True, progress=False)


def test_loading_writes_nothing_and_maps_read_only(small):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in small.iterdir()}
    gv.load(small, verify=True, progress=False)
    arr = next(v for n, _, v in cv.iter_converted(small, progress=False) if n == "embed")
    with pytest.raises(ValueError):
        arr[0, 0] = 1.0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in small.iterdir()} == before


# --- release manifests: coverage ----------------------------------------------------------------------------

@pytest.fixture
def rel(tmp_path):
    d = tmp_path / "rel"
    shutil.copytree(CKPT, d)
    return d


def test_release_verify_needs_a_manifest(rel, tmp_path):
    from grokviz.checkpoint.manifest import NoManifestError

    with pytest.raises(NoManifestError, match="nothing to verify the release against"):
        verify_release(rel)
    with pytest.raises(NoManifestError):
        gv.load(rel, config=tmp_config(tmp_path), verify=True, progress=False)


def test_an_empty_release_manifest_is_not_ok(rel):
    (rel / MANIFEST_NAME).write_text("")
    with pytest.raises(CheckpointError, match="lists no files"):
        verify_release(rel)


def test_a_release_manifest_must_cover_every_tensor_file(rel):
    from grokviz.checkpoint.manifest import format_manifest, manifest

    m = manifest(rel)
    del m["ckpt-0/tensor00007_000"]
    (rel / MANIFEST_NAME).write_text(format_manifest(m))
    with pytest.raises(CheckpointError, match=r"tensor00007_000: present but not in the manifest"):
        verify_release(rel)


def test_release_manifest_paths_stay_inside(rel):
    from grokviz.checkpoint.manifest import format_manifest, manifest

    m = manifest(rel)
    m["../../etc/hostname"] = "0" * 64
    (rel / MANIFEST_NAME).write_text(format_manifest(m))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        verify_release(rel)
    (rel / MANIFEST_NAME).write_text("not a manifest line\n")
    with pytest.raises(CheckpointError, match="line 1 is not"):
        verify_release(rel)


def test_atomic_file_keeps_the_old_file_on_error_and_follows_the_umask(tmp_path):
    from grokviz.checkpoint.fsutil import atomic_file, write_file_atomic

    target = tmp_path / "state.bin"
    write_file_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    old = os.umask(0o027)
    try:
        write_file_atomic(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640
