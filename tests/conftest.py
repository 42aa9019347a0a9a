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
