"""Smoke test of ``examples/vae.py``: its ``main`` end to end at tiny settings (scikit-learn's
digits, one epoch, VAE only, K = 50 on 5 test rows, the three PNGs)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "vae.py"


def _load():
    spec = importlib.util.spec_from_file_location("vae_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the example's smoke run, 15 s
def test_vae_example_runs(tmp_path):
    vae = _load()
    table = vae.main(["--skip-mnist", "--digits-epochs", "1", "--iwae-k", "--test-rows", "5",
                      "--is-samples", "50", "--plot-dir", str(tmp_path)])
    assert [(name, r.label) for name, r in table] == [("digits", "VAE")]
    run = table[0][1]
    assert run.epoch_bound.shape == (1,) and run.test_rows == 5
    # a log-likelihood of 64 binary pixels lies in (-64 log 2 * a few, 0)
    assert np.isfinite(run.test_ll) and -200.0 < run.test_ll < 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "vae_digits_bound.png", "vae_digits_reconstructions.png", "vae_digits_samples.png"]
