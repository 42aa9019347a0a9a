"""Sharding: partition specs, the memory plan, and the golden forward on 8 simulated CPU devices (subprocess)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import grokviz as gv
from grokviz import cli
from grokviz.sharding import fit_spec, param_specs, plan_memory

REPO = Path(__file__).resolve().parent.parent


def test_specs_follow_the_reference_with_layer_axis_unsharded(golden):
    _, params, _ = golden
    s = param_specs(params, (1, 8))
    assert s["embed"] == P(None, ("data", "model"))
    assert s["blocks"]["w_q"] == P(None, "data", "model")
    assert s["blocks"]["w_o"] == P(None, "model", "data")
    assert s["blocks"]["w_gate"] == P(None, None, "data", "model")
    assert s["blocks"]["w_down"] == P(None, None, "model", "data")
    assert s["blocks"]["router"] == P(None, "data", None)
    assert s["blocks"]["attn_pre_norm"] == P(None, None) and s["final_norm"] == P(None)


def test_non_dividing_axes_fall_back_to_replicated():
    assert fit_spec((None, "model"), (4, 88), (1, 8)) == P(None, "model")
    assert fit_spec((None, "model"), (4, 90), (1, 8)) == P(None, None)
    assert fit_spec((None, ("data", "model")), (4, 12), (2, 4)) == P(None, "model")  # 12 % 8 != 0, 12 % 4 == 0
    assert fit_spec((None, ("data", "model")), (4, 6), (2, 4)) == P(None, "data")
    assert fit_spec(("data", "model"), (1, 32), (2, 4)) == P(None, "model")  # nb = 1 scale rows


def test_int8_scales_get_the_weight_spec(golden):
    model = gv.load(Path(__file__).parent / "data" / "grok1_golden_ckpt", config=golden[0], progress=False)
    s = param_specs(model.params, (1, 8))["blocks"]
    assert s["w_down"].weight == P(None, None, "model", "data") and s["w_down"].scales == P(None, None, "model", "data")
    assert s["w_gate"].scales == P(None, None, "data", "model")


def test_grok1_int8_plan_fits_8_devices_of_80gb():
    plan = plan_memory(gv.GrokConfig.grok1(), (1, 8), "int8")
    assert plan.num_params == 315_684_820_992
    assert 35e9 < plan.per_device_bytes < 80e9, plan.per_device_bytes
    bf16 = plan_memory(gv.GrokConfig.grok1(), (1, 8), "bf16")
    assert bf16.per_device_bytes > 1.9 * plan.per_device_bytes
    assert plan_memory(gv.GrokConfig.grok1(), (2, 4), "int8").per_device_bytes == pytest.approx(
        plan.per_device_bytes, rel=0.01)
    assert plan_memory(gv.GrokConfig.grok1(), (1, 1), "int8").per_device_bytes > 300e9


def test_cli_prints_the_grok1_plan(capsys):
    assert cli.main(["inspect", "grok-1", "--plan", "--devices", "8", "--dtype", "int8"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"parameter bytes per device ([\d.]+) GB", out)
    assert m and float(m.group(1)) < 80, out
    assert "315,684,820,992" in out and "w_gate" in out


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    import grokviz as gv
    from grokviz.sharding import make_mesh, shard_params
    from grokviz.testing import load_golden

    cfg, params, z = load_golden()
    out, logits = {}, {}
    for shape in [(1, 8), (2, 4)]:
        mesh = make_mesh(shape)
        # int8 release checkpoint, placed sharded as it is read
        model = gv.load("tests/data/grok1_golden_ckpt", config=cfg, mesh=mesh, progress=False)
        w = model.params["blocks"]["w_gate"].weight
        out[str(shape)] = dict(shard=list(w.addressable_shards[0].data.shape), ndev=len(w.sharding.device_set))
        logits[f"{shape}-int8"] = np.asarray(model.run(z["tokens"]).logits)
    # dequantised fp32 params (the golden npz) placed on a mesh after the fact
    logits["(2, 4)-fp32"] = np.asarray(gv.Model(cfg, shard_params(params, make_mesh((2, 4)))).run(z["tokens"]).logits)
    np.savez(sys.argv[1], **logits)
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_golden_forward_sharded_on_8_simulated_devices(golden_model, golden, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logits.npz")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    z = golden[2]
    unsharded = np.asarray(golden_model.run(z["tokens"]).logits)
    sharded = np.load(tmp_path / "logits.npz")
    assert sorted(sharded.files) == ["(1, 8)-int8", "(2, 4)-fp32", "(2, 4)-int8"]
    for key in sharded.files:
        assert np.abs(sharded[key] - unsharded).max() < 1e-5, key
        assert np.abs(sharded[key] - z["logits"]).max() < 2e-5, key
    # really split: D over "data", F over "model"
    assert out["(1, 8)"] == dict(shard=[2, 8, 64, 11], ndev=8)
    assert out["(2, 4)"] == dict(shard=[2, 8, 32, 22], ndev=8)
