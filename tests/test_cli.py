"""The ``grokviz`` command line on release folders: verify says what it checked and fails when it checked nothing;
``manifest --write`` records what a later verify checks against; ``--config`` takes a file or a JSON string."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from grokviz import cli
from grokviz.checkpoint.manifest import MANIFEST_NAME

DATA = Path(__file__).resolve().parent / "data"
CKPT = DATA / "grok1_golden_ckpt"
CONFIG_JSON = str(np.load(DATA / "grok1_golden.npz")["config_json"])


@pytest.fixture
def rel(tmp_path):
    d = tmp_path / "rel"
    shutil.copytree(CKPT, d)
    return d


def test_verify_without_a_manifest_fails_saying_so(rel, capsys):
    assert cli.main(["verify", str(rel)]) == 1
    err = capsys.readouterr().err
    assert "nothing to verify the release against" in err and "manifest PATH --write" in err


def test_verify_with_a_config_string_checks_files_sizes_and_shapes(rel, capsys):
    assert CONFIG_JSON.lstrip().startswith("{") and len(CONFIG_JSON) > 255  # longer than a file name may be
    assert cli.main(["verify", str(rel), "--config", CONFIG_JSON, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "OK: all 26 tensor files present" in out and "no manifest" in out and "swapped" in out
    t = rel / "ckpt-0" / "tensor00005_000"
    t.write_bytes(t.read_bytes()[:-3])  # truncated by a few bytes: sizes alone may not tell
    assert cli.main(["verify", str(rel), "--config", CONFIG_JSON, "--quiet"]) == 1
    assert "tensor00005_000" in capsys.readouterr().err
    shutil.copy(CKPT / "ckpt-0" / "tensor00005_000", t)
    (rel / "ckpt-0" / "tensor00011_000").unlink()
    assert cli.main(["verify", str(rel), "--config", CONFIG_JSON, "--quiet"]) == 1
    assert "missing" in capsys.readouterr().err


def test_config_file_and_string_alike(rel, tmp_path, capsys):
    f = tmp_path / "cfg.json"
    f.write_text(CONFIG_JSON)
    for cfg in (CONFIG_JSON, str(f)):
        assert cli.main(["inspect", str(rel), "--config", cfg]) == 0
        assert "config:     custom: L=2 D=64 heads=4/2x16" in capsys.readouterr().out
    assert cli.main(["convert", str(rel), str(tmp_path / "conv"), "--config", CONFIG_JSON, "--quiet"]) == 0
    assert cli.main(["verify", str(tmp_path / "conv")]) == 0
    out = capsys.readouterr().out
    assert "OK: 2 files match" in out and "config.json" in out and "26 tensors" not in out
    assert cli.main(["inspect", str(rel), "--config", "{not json"]) == 1
    assert "invalid JSON" in capsys.readouterr().err


def test_manifest_write_then_verify(rel, capsys):
    assert cli.main(["manifest", str(rel / "ckpt-0"), "--write", "--quiet"]) == 0  # ckpt-0 or its parent alike
    assert (rel / MANIFEST_NAME).is_file() and not (rel / "ckpt-0" / MANIFEST_NAME).exists()
    assert not [n for n in os.listdir(rel) if n.startswith(".")]  # written via a temp file, renamed
    lines = (rel / MANIFEST_NAME).read_text().splitlines()
    assert len(lines) == 26 and lines[0].endswith("  ckpt-0/tensor00000_000")
    capsys.readouterr()
    assert cli.main(["verify", str(rel)]) == 0
    assert f"OK: 26 files match {rel / MANIFEST_NAME}" in capsys.readouterr().out
    # a rewrite does not list the manifest itself
    assert cli.main(["manifest", str(rel), "--write", "--quiet"]) == 0
    assert len((rel / MANIFEST_NAME).read_text().splitlines()) == 26
    # same size, different bytes: only the manifest can tell
    t = rel / "ckpt-0" / "tensor00003_000"
    data = bytearray(t.read_bytes())
    data[-20] ^= 1
    t.write_bytes(bytes(data))
    assert cli.main(["verify", str(rel)]) == 1
    assert "ckpt-0/tensor00003_000: sha256" in capsys.readouterr().err
    (rel / "ckpt-0" / "tensor00004_000").unlink()
    assert cli.main(["verify", str(rel)]) == 1
    assert "ckpt-0/tensor00004_000: missing" in capsys.readouterr().err


def test_manifest_to_a_file(rel, tmp_path, capsys):
    out = tmp_path / "sums.txt"
    assert cli.main(["manifest", str(rel), "-o", str(out), "--quiet"]) == 0
    assert cli.main(["verify", str(rel), "--manifest", str(out)]) == 0
    assert "OK: 26 files match" in capsys.readouterr().out


def test_help_says_what_the_release_format_cannot_detect(capsys):
    for cmd in ("verify", "manifest"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        assert "swapped between files" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_not_a_checkpoint(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
