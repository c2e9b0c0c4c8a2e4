"""res.to_arviz and res.plot.

ArviZ and matplotlib are optional: the tests that need them skip without them; the numpy
helpers that assemble their inputs (arrays, dims, attributes, smoothing, panel layout) and the
ImportError messages are tested everywhere. One small fit serves the module.
"""

import importlib
import sys
import warnings

import jax
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import raw_fit

# the modules (vijax/__init__ exports no functions under these names, but be explicit)
ax_mod = importlib.import_module("vijax.arviz_export")
plots = importlib.import_module("vijax.plots")

N_DRAWS = 200  # one draw count throughout: one compiled sampler


@vj.model(mu=vj.Latent(), tau=vj.Latent(support=constraints.positive),
          theta=vj.Latent(shape=(2, 3)), k=vj.Latent(support=constraints.integer_interval(0, 3)))
def toy(z, y):
    lp = dist.Normal(0, 5).log_prob(z["mu"]) + dist.Exponential(1.0).log_prob(z["tau"])
    lp += dist.Normal(z["mu"], z["tau"]).log_prob(z["theta"]).sum()
    lp += dist.Categorical(probs=jax.numpy.full(4, 0.25)).log_prob(z["k"])
    return lp + dist.Normal(z["theta"].mean() + 0.1 * z["k"], 1.0).log_prob(y).sum()


SHAPES = {"mu": (), "tau": (), "theta": (2, 3), "k": ()}


@pytest.fixture(scope="module")
def res():
    return raw_fit(toy, jax.numpy.asarray([0.5, 1.0, 1.5]), steps=200, key=jax.random.key(0),
                  convergence=None, progress=False, psis_draws=0)


@pytest.fixture(scope="module")
def az():
    try:
        arviz, _ = ax_mod._import_arviz()
    except ImportError:
        pytest.skip("arviz is not installed")
    return arviz


@pytest.fixture(scope="module")
def figure_cls():
    try:
        return plots._import_matplotlib()
    except ImportError:
        pytest.skip("matplotlib is not installed")


# --- without the optional dependencies ---------------------------------------------------------

def test_posterior_arrays_and_dims():
    draws = {"mu": np.zeros(5), "theta": np.zeros((5, 2, 3)), "k": np.zeros(5, np.int32)}
    posterior, dims = ax_mod._posterior_arrays(draws)
    assert {k: v.shape for k, v in posterior.items()} == {"mu": (1, 5), "theta": (1, 5, 2, 3),
                                                          "k": (1, 5)}
    assert posterior["k"].dtype == np.int32
    assert dims == {"mu": [], "theta": ["theta_dim_0", "theta_dim_1"], "k": []}


def test_fit_attrs(res):
    attrs = ax_mod._fit_attrs(res)
    d = res.diagnostics
    assert attrs["inference_library"] == "vijax"
    assert attrs["guide"] == res.guide.name
    assert (attrs["objective"], attrs["estimator"]) == (d.objective, d.estimator)
    assert attrs["final_loss"] == d.final_loss and attrs["n_steps"] == 200
    # netCDF-friendly: no None, no bools
    assert all(isinstance(v, str | int | float | np.integer | np.floating)
               and not isinstance(v, bool) for v in attrs.values())


def test_smooth_is_a_trailing_moving_average():
    losses = np.arange(10.0)
    losses[3] = np.nan  # a skipped step is left out
    step, mean = plots._smooth(losses, window=2)
    np.testing.assert_array_equal(step, [1, 2, 4, 5, 6, 7, 8, 9])
    np.testing.assert_allclose(mean, [0.5, 1.5, 3.0, 4.5, 5.5, 6.5, 7.5, 8.5])
    step, mean = plots._smooth(np.full(3, np.inf))
    assert step.size == mean.size == 0


def test_panels_cap_and_labels():
    draws = {"mu": np.arange(4.0), "L": np.arange(24.0).reshape(4, 2, 3)}
    panels, total = plots._panels(draws, max_panels=4)
    assert total == 7
    assert [p[0] for p in panels] == ["mu", "L[0,0]", "L[0,1]", "L[0,2]"]
    np.testing.assert_array_equal(panels[2][2], draws["L"][:, 0, 1])


def test_latent_selection(res):
    assert plots._select(res, None) == ["mu", "tau", "theta", "k"]
    assert plots._select(res, "theta") == ["theta"]
    with pytest.raises(ValueError, match=r"latents must name latents of the model"):
        plots._select(res, ["mu", "sigma"])
    with pytest.raises(ValueError, match=r"latents must name"):
        plots._select(res, [])


def test_missing_dependencies_name_the_extra(res, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` fail
    with pytest.raises(ImportError, match=r'pip install "vijax\[arviz\]"'):
        res.to_arviz()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "vijax\[plot\]"'):
        res.plot()


def test_build_with_the_arviz_1_api():
    """ArviZ 1.x's from_dict (arviz_base) takes the groups as one dict and gives a DataTree."""
    arviz_base = pytest.importorskip("arviz_base")
    import xarray as xr

    posterior, dims = ax_mod._posterior_arrays({"mu": np.zeros(4), "th": np.ones((4, 2))})
    tree = ax_mod._build(arviz_base.from_dict, xr, posterior, dims,
                         {"guide": "meanfield", "objective": "neg_elbo"}, np.arange(6.0))
    assert isinstance(tree, xr.DataTree)
    assert tree["posterior"]["th"].dims == ("chain", "draw", "th_dim_0")
    assert tree["posterior"].attrs["guide"] == tree.attrs["guide"] == "meanfield"
    np.testing.assert_array_equal(tree["loss_trace"]["loss"], np.arange(6.0))


# --- ArviZ ----------------------------------------------------------------------------------------

def test_to_arviz(res, az):
    data = res.to_arviz(n=N_DRAWS)
    groups = data.groups() if callable(data.groups) else data.children  # arviz 0.x, 1.x
    assert {"posterior", "loss_trace"} <= set(groups)
    post = data.posterior
    assert set(post.data_vars) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert post[name].shape == (1, N_DRAWS, *shape)
        assert post[name].dims == ("chain", "draw", *(f"{name}_dim_{i}"
                                                      for i in range(len(shape))))
    assert post["k"].dtype == np.int32
    # the draws are res.sample's, with the default key jax.random.key(0)
    ref = res.sample(jax.random.key(0), N_DRAWS)
    np.testing.assert_array_equal(post["theta"].values[0], ref["theta"])
    d = res.diagnostics
    for attrs in (post.attrs, data.attrs):
        assert attrs["guide"] == res.guide.name
        assert (attrs["objective"], attrs["estimator"]) == (d.objective, d.estimator)
        assert attrs["final_loss"] == pytest.approx(d.final_loss)
    trace = data.loss_trace
    assert trace["loss"].dims == ("step",) and trace.attrs["objective"] == d.objective
    np.testing.assert_array_equal(trace["loss"].values, res.losses)


def test_to_arviz_other_key_and_netcdf(res, az, tmp_path):
    pytest.importorskip("h5netcdf")
    data = res.to_arviz(jax.random.key(1), n=N_DRAWS)
    np.testing.assert_array_equal(data.posterior["mu"].values[0],
                                  res.sample(jax.random.key(1), N_DRAWS)["mu"])
    path = tmp_path / "fit.nc"
    data.to_netcdf(str(path))  # the attributes are netCDF-friendly
    with warnings.catch_warnings():  # arviz 0.x: loss_trace is not in its group scheme
        warnings.filterwarnings("ignore", message=".*not defined in the InferenceData",
                                category=UserWarning)
        back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["theta"].values, data.posterior["theta"].values)
    assert back.posterior.attrs["objective"] == res.diagnostics.objective


# --- matplotlib -----------------------------------------------------------------------------------

def test_plot_axes_and_png(res, figure_cls, tmp_path):
    path = tmp_path / "fit.png"
    fig = res.plot(n=N_DRAWS, path=path)
    assert isinstance(fig, figure_cls)
    assert len(fig.axes) == 1 + 9  # the loss trace, then mu, tau, theta (6) and k
    assert res.diagnostics.objective in fig.axes[0].get_ylabel()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_latents_and_cap(res, figure_cls):
    fig = res.plot(latents="theta", n=N_DRAWS, max_panels=4)
    assert len(fig.axes) == 1 + 4
    assert [ax.get_title() for ax in fig.axes[1:]] == ["theta[0,0]", "theta[0,1]", "theta[0,2]",
                                                       "theta[1,0]"]
    assert "4 of 6 elements" in fig.get_suptitle()
    fig = res.plot(latents=["k", "mu"], n=N_DRAWS)
    assert [ax.get_title() for ax in fig.axes[1:]] == ["k", "mu"]
    with pytest.raises(ValueError, match="max_panels must be an int >= 1"):
        res.plot(max_panels=0)
