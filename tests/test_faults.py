"""Bad input that used to give a silently wrong answer or an unreadable error now fails (or
warns) early, saying what is wrong and what to change.

One test group per class of fault: JAX's own tracing errors kept and explained; latents the
density ignores (flat, improper posteriors) and NumPyro sites that cannot be fitted as meant
(:class:`vijax.ModelWarning`); data that would change on its way to the device; empty
supports and latents; forged or bloated checkpoints; keys, seeds, counts, guides, ``init``
values and learning rates of the wrong kind; ``summary()``. Fits are tiny (50 steps, no
stopping rule, no PSIS) so that compiles stay cheap.
"""

import io
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import precision
from vijax.checkpoint.archive import _digest
from vijax.checks import _check_key, check_data

Y = np.array([0.5, -0.3, 1.1])
FAST = dict(guide="meanfield", steps=50, convergence=None, psis_draws=0, progress=False,
            precondition=None)


def _normal(z, d):
    return dist.Normal(0, 1).log_prob(z["mu"]) + dist.Normal(z["mu"], 1).log_prob(d["y"]).sum()


MODEL = vj.Model(_normal, {"mu": vj.Latent()})


# --- 1. JAX's tracing errors: the original exception, with a note ----------------------------
def _python_if(z, d):
    if z["mu"] > 0:  # a Python branch on a traced value
        return -z["mu"] ** 2
    return -2.0 * z["mu"] ** 2


def _python_float(z, d):
    return -float(z["mu"]) ** 2


def _numpy_call(z, d):
    return -np.log(z["mu"])


@pytest.mark.parametrize("fn, error", [
    (_python_if, jax.errors.TracerBoolConversionError),
    (_python_float, jax.errors.ConcretizationTypeError),
    (_numpy_call, jax.errors.TracerArrayConversionError),
], ids=["if", "float", "numpy"])
def test_tracer_errors_are_kept_and_explained(fn, error):
    m = vj.Model(fn, {"mu": vj.Latent(support=constraints.positive)})
    # the exception is JAX's own (it used to end in "'str' object has no attribute
    # '_error_repr'"), with a note naming the function, the shapes and the way out
    with pytest.raises(error, match=r"(?s)log_joint failed when traced with latents of shapes "
                                    r"\{'mu': \(\)\}.*traceable by JAX.*jnp.where"):
        vj.fit(m, {"y": Y}, **FAST)
    fact = vj.Model(log_prior=lambda z: fn(z, None), log_likelihood=lambda z, d: -d["y"] * z["mu"],
                    latents={"mu": vj.Latent(support=constraints.positive)})
    with pytest.raises(error, match="log_prior failed when traced"):
        vj.fit(fact, {"y": Y}, **FAST)


def test_other_model_errors_keep_their_type_and_message():
    broken = vj.Model(lambda z, d: z["nope"], {"mu": vj.Latent()})
    with pytest.raises(KeyError, match=r"(?s)'nope'.*log_joint failed when traced") as info:
        vj.fit(broken, {"y": Y}, **FAST)
    assert "traceable by JAX" not in str(info.value.__notes__)  # only for tracer errors


# --- 2. flat posteriors and NumPyro sites that cannot be fitted as meant ---------------------
def test_latent_the_density_ignores_is_named():
    typo = vj.Model(lambda z, d: _normal(z, d) + 0.0 * d["y"].sum(),
                    {"mu": vj.Latent(), "sigma": vj.Latent(support=constraints.positive)})
    with pytest.warns(vj.ModelWarning, match=r"latent 'sigma' does not influence the log "
                                             r"density.*z\['sigma'\].*flat"):
        vj.fit(typo, {"y": Y}, **FAST)
    vj.fit(typo, {"y": Y + 1.0}, **FAST)  # once per model and data shapes: no second warning


def test_constant_log_joint_is_reported():
    constant = vj.Model(lambda z, d: dist.Normal(0.0, 1.0).log_prob(d["y"]).sum(),
                        {"a": vj.Latent(), "b": vj.Latent((2,))})
    with pytest.warns(vj.ModelWarning, match=r"does not depend on any latent \(\['a', 'b'\]\)"):
        vj.fit(constant, {"y": Y}, **FAST)


def test_used_latents_do_not_warn():
    # each latent reaches the density only through a branch or a product with zero: the
    # structural check counts that as use (no false alarm); filterwarnings=error checks it
    m = vj.Model(lambda z, d: jnp.where(z["b"] > 0, -z["a"] ** 2, -z["a"] ** 2 - z["b"] ** 2)
                 + 0.0 * z["c"], {"a": vj.Latent(), "b": vj.Latent(), "c": vj.Latent()})
    vj.fit(m, None, **FAST)


def _regression(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)


def test_numpyro_observed_site_passed_as_none_is_named():
    x = np.linspace(-1.0, 1.0, 4).astype(np.float32)
    with pytest.warns(vj.ModelWarning, match=r"latent site 'y' is used by no other site, and "
                                             r"argument\(s\) \['y'\] are None.*obs=None"):
        m = vj.from_numpyro(_regression, x)
    assert list(m.latents) == ["w", "y"]
    vj.from_numpyro(_regression, x, y=2.0 * x)  # with the data: no warning

    def funnel(dim=3):  # latents nothing depends on, but no argument is None: no warning
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)).expand([dim]))

    vj.from_numpyro(funnel)


def test_numpyro_obs_mask_slots_are_named():
    def missing(y, mask):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)

    y = np.array([0.1, np.nan, 0.3, 0.2], np.float32)
    with pytest.warns(vj.ModelWarning, match=r"latent site 'y_unobserved' has 3 of 4 elements "
                                             r"masked out.*flat.*obs_mask"):
        vj.from_numpyro(missing, np.nan_to_num(y), ~np.isnan(y))


# --- 3. data that would change on its way to the device -------------------------------------
def test_int64_beyond_int32_is_refused_naming_the_key():
    counts = np.array([3, 2**40, 1])
    with pytest.raises(ValueError, match=r"data\['n'\] holds int64 values beyond the int32 "
                                         r"range \(1099511627776\) at index \(1,\).*wrap"):
        check_data({"n": counts})
    check_data({"n": np.array([3, 2**31 - 1, -(2**31)])})  # in range: accepted
    with precision("float64"):
        check_data({"n": counts})  # 64-bit JAX keeps them


def test_float64_beyond_float32_is_refused_naming_the_key():
    y = np.array([1.0, 1e300])
    with pytest.raises(ValueError, match=r"data\['y'\] holds a value beyond the float32 range "
                                         r".*index \(1,\).*become inf"):
        vj.fit(MODEL, {"y": y}, **FAST)
    with precision("float64"):
        assert check_data({"y": y}, np.float64)["y"][1] == 1e300


def test_python_lists_are_refused_naming_the_key():
    with pytest.raises(TypeError, match=r"data\['y'\] is a Python list.*np.asarray"):
        vj.fit(MODEL, {"y": [0.5, -0.3, 1.1]}, **FAST)
    with pytest.raises(TypeError, match=r"data\['y'\] is a ragged Python list"):
        check_data({"y": [[1.0, 2.0], [3.0]]})
    with pytest.raises(TypeError, match=r"data\['y'\]\[1\] is a Python list"):
        check_data({"y": (np.ones(2), [1.0, 2.0])})
    check_data({"y": [np.ones(2), np.zeros(3)]})  # a list of arrays is a container


# --- 4. empty supports and latents without elements ------------------------------------------
def test_empty_or_unbounded_interval_is_refused_naming_the_latent():
    with pytest.raises(ValueError, match=r"latent 'p': its support .* is empty \(lower bound "
                                         r"1.0 is not below upper bound 0.0\)"):
        vj.Model(_normal, {"mu": vj.Latent(), "p": vj.Latent(support=constraints.interval(
            1.0, 0.0))})
    with pytest.raises(ValueError, match=r"latent 'p'.*empty.*at index \(1,\)"):
        vj.Model(_normal, {"p": vj.Latent((2,), constraints.interval(
            jnp.array([0.0, 2.0]), jnp.array([1.0, 2.0])))})
    with pytest.raises(ValueError, match="latent 'k'.*empty"):
        vj.Model(_normal, {"k": vj.Latent(support=constraints.integer_interval(3, 1))})
    with pytest.raises(ValueError, match="latent 'p'.*finite bounds.*greater_than"):
        vj.Model(_normal, {"p": vj.Latent(support=constraints.interval(0.0, jnp.inf))})


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_latent_without_elements_is_refused(shape):
    with pytest.raises(ValueError, match=rf"latent 'w' has shape \({shape[0]}, ?0?\)?.*no "
                                         "elements"):
        vj.Model(_normal, {"mu": vj.Latent(), "w": vj.Latent(shape)})

    def empty_site(y, n_groups):
        numpyro.sample("theta", dist.Normal(jnp.zeros(n_groups), 1.0))
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"latent 'theta' has shape \(0,\).*no elements"):
        vj.from_numpyro(empty_site, Y, 0)


# --- 5. checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "fit.vjx"
    vj.fit(MODEL, {"y": Y}, **FAST).save(path)
    return path


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _write(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _forge(saved, path, change):
    """A checkpoint whose manifest ``change`` edited, with a recomputed (valid) digest: what
    a forger can write. The semantic checks must catch it."""
    members = _members(saved)
    manifest = json.loads(members["manifest.json"])
    manifest.pop("sha256")
    change(manifest)
    arrays = [(m["name"], np.load(io.BytesIO(members[m["name"] + ".npy"]),
                                  allow_pickle=False)) for m in manifest["members"]]
    manifest["sha256"] = _digest(manifest, arrays)
    members["manifest.json"] = json.dumps(manifest).encode()
    return _write(path, members)


def test_checkpoint_member_is_size_checked_before_it_is_read(saved, tmp_path):
    members = _members(saved)
    members["a0.npy"] += bytes(1 << 20)  # 1 MiB more than its manifest declares
    with pytest.raises(ValueError, match="member a0.npy is .* bytes, more than the .* its "
                                         "manifest allows"):
        vj.load(_write(tmp_path / "big.vjx", members), MODEL)
    # compressed, 1 MB of zeros would inflate to any size: refused before reading
    with pytest.raises(ValueError, match="member .* is compressed"):
        vj.load(_write(tmp_path / "zip.vjx", _members(saved), zipfile.ZIP_DEFLATED), MODEL)


def test_checkpoint_with_bytes_outside_the_archive_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    (tmp_path / "tail.vjx").write_bytes(data + b"appended after the digest was taken")
    with pytest.raises(ValueError, match="data after the end of its zip archive"):
        vj.load(tmp_path / "tail.vjx", MODEL)
    (tmp_path / "head.vjx").write_bytes(b"prefix" + data)
    with pytest.raises(ValueError, match="bytes before or between its zip members"):
        vj.load(tmp_path / "head.vjx", MODEL)
    vj.load(saved, MODEL)  # the genuine file loads


def _set(group, **values):
    return lambda manifest: manifest[group].update(values)


@pytest.mark.parametrize("change, match", [
    (_set("diagnostics", n_steps=-5), "n_steps is -5, not a count"),
    (_set("diagnostics", n_nonfinite_skipped=-1), "n_nonfinite_skipped is -1, not a count"),
    (_set("diagnostics", n_nonfinite_skipped=51), r"n_nonfinite_skipped \(51\) is more than"),
    (_set("diagnostics", max_steps=10), r"max_steps \(10\) is less than n_steps \(50\)"),
    (_set("diagnostics", k_hat="0.1"), "k_hat is '0.1', not a number"),
    (_set("diagnostics", num_particles=0), "num_particles is 0"),
    (_set("diagnostics", n_steps=40, max_steps=50), "losses hold 50 steps but .* n_steps=40"),
    (_set("optimizer", learning_rate=float("nan")), "invalid default optimizer learning rate"),
    (lambda m: m["members"][0].update(shape=[-3]), r"invalid shape \[-3\]"),
    (lambda m: m["members"][0].update(dtype="O"), "invalid or unsupported dtype 'O'"),
], ids=["negative-steps", "negative-skipped", "skipped>steps", "max<steps", "k_hat-string",
        "particles", "losses-length", "nan-lr", "negative-shape", "object-dtype"])
def test_impossible_manifest_is_refused(saved, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        vj.load(_forge(saved, tmp_path / "forged.vjx", change), MODEL)


# --- 6. keys, seeds, counts, guides, init values, learning rates -----------------------------
def test_several_keys_or_bad_seeds_are_refused():
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"one PRNG key, got an array of 3 keys.*keys\[0\]"):
        vj.fit(MODEL, {"y": Y}, key=keys, **FAST)
    with pytest.raises(ValueError, match="array of 3 keys"):
        _check_key(jax.random.key_data(keys))  # raw uint32 keys, (3, 2)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            vj.fit(MODEL, {"y": Y}, key=seed, **FAST)
    # 64-bit seeds stay distinct with 64-bit JAX off (2**32 used to give seed 0's key) and
    # match jax.random.key's under 64-bit JAX
    data = {s: np.asarray(jax.random.key_data(_check_key(s))) for s in (0, 2**32, 2**40 + 5)}
    assert len({d.tobytes() for d in data.values()}) == 3
    with precision("float64"):
        np.testing.assert_array_equal(jax.random.key_data(jax.random.key(2**40 + 5)),
                                      data[2**40 + 5])


def test_counts_beyond_int32_are_refused():
    with pytest.raises(ValueError, match=r"steps must be an int <= 2147483647.*int32"):
        vj.fit(MODEL, {"y": Y}, steps=2**31, guide="meanfield")
    with pytest.raises(ValueError, match="num_particles must be an int <= 2147483647"):
        vj.fit(MODEL, {"y": Y}, **{**FAST, "steps": 5}, num_particles=2**31)


def test_guide_class_without_parentheses_says_how_to_call_it():
    with pytest.raises(TypeError, match=r"pass vj.guides.MeanField\(\)"):
        vj.fit(MODEL, {"y": Y}, **{**FAST, "guide": vj.guides.MeanField})
    with pytest.raises(TypeError, match=r"LowRank for latent\(s\) \['mu'\].*"
                                        r"vj.guides.LowRank\(\)"):
        vj.guides.resolve_spec({"mu": vj.guides.LowRank})


@pytest.mark.parametrize("value", ["1.0", None, {"a": 1.0}, [[1.0], [1.0, 2.0]]],
                         ids=["str", "None", "dict", "ragged"])
def test_init_values_must_be_numbers(value):
    with pytest.raises(TypeError, match="latent 'mu': value must be a number or an array"):
        vj.fit(MODEL, {"y": Y}, init={"mu": value}, **FAST)


def test_nan_or_negative_learning_rate_is_refused():
    for lr in (float("nan"), float("inf"), -0.1, 0.0):
        with pytest.raises(ValueError, match="learning_rate must be a positive number"):
            vj.default_optimizer(lr)


# --- 7. summary() of scalar and vector latents ------------------------------------------------
def test_summary_of_scalar_and_vector_latents():
    m = vj.Model(lambda z, d: dist.Normal(0.0, 1.0).log_prob(z["a"])
                 + dist.Normal(0.0, 1.0).log_prob(z["v"]).sum(),
                 {"a": vj.Latent(), "v": vj.Latent((2, 2))})
    res = vj.fit(m, None, **FAST)
    s = res.summary(n=200)
    assert s["a"]["mean"].shape == () and s["v"]["sd"].shape == (2, 2)
    labels = [r[0] for r in s.rows()]
    assert labels == ["a", "v[0,0]", "v[0,1]", "v[1,0]", "v[1,1]"]
    assert str(s).splitlines()[-1] == "(200 draws from the fitted guide)"
    # user draws: an entry without elements prints an empty table, no draws is refused
    assert "(3 draws" in str(res.summary(draws={"w": np.zeros((3, 0))}))
    with pytest.raises(ValueError, match="no draws"):
        res.summary(draws={"a": np.zeros((0,))})
