"""One compiled program per configuration: refitting on new data of the same shapes, with a new
key, compiles nothing."""

import jax
import numpy as np

from tests.conftest import LinearRegression, count_compiles, raw_fit


def test_second_fit_on_new_data_compiles_nothing(blr_model):
    first, second = LinearRegression(0), LinearRegression(1)
    res1 = raw_fit(blr_model, first.data, guide="meanfield", steps=600, chunk_size=250,
                  key=jax.random.key(0))
    res1.sample(jax.random.key(0), 10)
    with count_compiles() as n:
        res2 = raw_fit(blr_model, second.data, guide="meanfield", steps=600, chunk_size=250,
                      key=jax.random.key(5))
        res2.sample(jax.random.key(1), 10)
    assert n[0] == 0, f"{n[0]} compilations on a refit with same shapes"
    # and it really fitted the new data (the posterior means differ between datasets)
    assert not np.allclose(res1.params["loc"], res2.params["loc"])
    # a different step budget with the same chunk length also reuses the program
    with count_compiles() as n:
        raw_fit(blr_model, second.data, guide="meanfield", steps=700, chunk_size=250)
    assert n[0] == 0


def test_chunking_does_not_change_the_result(blr, blr_model):
    # keys are derived per global step, so the split into compiled chunks is invisible
    a = raw_fit(blr_model, blr.data, guide="meanfield", steps=600, chunk_size=250,
               key=jax.random.key(3))
    b = raw_fit(blr_model, blr.data, guide="meanfield", steps=600, chunk_size=600,
               key=jax.random.key(3))
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    np.testing.assert_allclose(a.params["loc"], b.params["loc"], rtol=1e-5)
    assert a.losses.shape == (600,) and np.all(np.isfinite(a.losses))
