import jax
import numpy as np
import pytest

from grokviz.testing import load_golden

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def golden():
    cfg, params, z = load_golden()
    return cfg, params, z


@pytest.fixture(scope="session")
def golden_model(golden):
    import grokviz as gv

    cfg, params, _ = golden
    return gv.Model(cfg, params)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def moe_family():
    """``load(name) -> (model, tokens)``, cached for the session: ``"tiny"`` is the tiny Grok on two short texts
    (one right-padded), any other name a Hugging Face family from tests/data/hf/<name>/ on its golden tokens
    (int32 [batch, seq]). Shared by the expert-analysis and ablation tests' ``fam`` fixtures."""
    from pathlib import Path

    import grokviz as gv

    data = Path(__file__).parent / "data" / "hf"
    texts = ["The cat sat on the mat and then it went home.", "Once upon a time, 42 dogs ran"]
    loaded = {}

    def load(name):
        if name not in loaded:
            if name == "tiny":
                model = gv.load("tiny", progress=False)
                tokens = np.asarray(model.to_tokens(texts), np.int32)
            else:
                model = gv.load(data / name, progress=False)
                tokens = np.load(data / name / "golden.npz")["tokens"].astype(np.int32)
            loaded[name] = (model, tokens)
        return loaded[name]

    return load
