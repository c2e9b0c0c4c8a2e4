"""Many processes: ``python -m vijax.launch`` (the environment it sets, its output, exit codes
and timeout) and a fit split over two ``jax.distributed`` processes on 127.0.0.1 (two host
CPU devices each, gloo collectives), which must equal the one-process fit on a 4-device mesh.

Equality of the two-process fit: both runs compile the same program for a mesh of 4
devices, draw the same keys and the same minibatch rows; only the all-reduces of the
per-device sums differ (gloo across processes, in-process otherwise), i.e. the order of
float32 additions. Measured (tests/multiprocess_fit.py, 700 steps to the stopping rule):
parameters within 2.4e-7 absolute, losses within 2.3e-7 relative, PSIS k-hat within 7e-5
relative; the two processes' values are bitwise equal (every process reads back the same
replicated values). The tolerances are those of tests/test_sharding.py (20x the measured
differences and more), k-hat's 1e-3 relative (15x).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests import multiprocess_fit
from vijax import launch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "multiprocess_fit.py"
PARAM_TOL = 5e-6  # absolute, on O(1) parameters
LOSS_TOL = 1e-5  # relative
K_HAT_TOL = 1e-3  # relative
LAUNCH_TIMEOUT_S = 150  # the launcher stops both processes (measured: 33-60 s, 2 busy cores)
SUBPROCESS_TIMEOUT_S = 180


def _launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vijax.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---------------------------------------------------------------------------------------------
# the launcher (plain Python scripts: no JAX started)
def test_launch_sets_the_environment_and_prefixes_output(tmp_path):
    script = _script(tmp_path, """
        import os, sys
        keys = ("VIJAX_PROCESS_ID", "VIJAX_NUM_PROCESSES", "VIJAX_COORDINATOR",
                "VIJAX_DEVICES_PER_PROCESS")
        print(" ".join(os.environ.get(k, "-") for k in keys), *sys.argv[1:])
    """)
    got = _launch("--processes", "3", "--devices-per-process", "2", "--port", "12345",
                  script, "a", "--b")
    assert got.returncode == 0, got.stdout + got.stderr
    lines = sorted(got.stdout.splitlines())
    assert lines == [f"[{i}] {i} 3 127.0.0.1:12345 2 a --b" for i in range(3)]


def test_launch_gpus_per_process_sets_jax_local_device_ids(tmp_path):
    script = _script(tmp_path, """
        import os
        print(os.environ["JAX_LOCAL_DEVICE_IDS"], "VIJAX_DEVICES_PER_PROCESS" in os.environ)
    """)
    got = _launch("--processes", "2", "--gpus-per-process", "2", script)
    assert sorted(got.stdout.splitlines()) == ["[0] 0,1 False", "[1] 2,3 False"]


def test_launch_returns_the_first_failure_and_stops_the_others(tmp_path):
    # process 1 fails at once; process 0 would sleep for a minute
    script = _script(tmp_path, """
        import os, sys, time
        if os.environ["VIJAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(60)
    """)
    got = _launch("--processes", "2", script, timeout=30)
    assert got.returncode == 3


def test_launch_timeout(tmp_path):
    script = _script(tmp_path, "import time\ntime.sleep(60)\n")
    got = _launch("--processes", "2", "--timeout", "1", script, timeout=30)
    assert got.returncode == launch.TIMEOUT_CODE
    assert "timeout" in got.stdout


@pytest.mark.parametrize("kwargs, match", [
    ({"processes": 0}, "processes must be an integer >= 1"),
    ({"processes": 2, "devices_per_process": 0}, "devices_per_process"),
    ({"processes": 2, "devices_per_process": 2, "gpus_per_process": 1}, "not both"),
    ({"processes": 2, "port": 70000}, "port"),
    ({"processes": 2, "timeout": 0}, "timeout"),
])
def test_launch_checks_its_arguments(tmp_path, kwargs, match):
    script = _script(tmp_path, "pass\n")
    with pytest.raises(ValueError, match=match):
        launch.launch(script, **kwargs)


def test_launch_needs_the_script():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        launch.launch("no/such/script.py", processes=2)
    got = _launch("--processes", "2", "no/such/script.py")
    assert got.returncode == 2 and "does not exist" in got.stderr


def test_initialize_without_the_launcher_does_nothing(monkeypatch):
    for name in (launch.ENV_PROCESS_ID, launch.ENV_NUM_PROCESSES, launch.ENV_COORDINATOR,
                 launch.ENV_DEVICES_PER_PROCESS):
        monkeypatch.delenv(name, raising=False)
    assert launch.initialize() == launch.ProcessInfo(0, 1, None)
    assert not jax.distributed.is_initialized()


def test_initialize_checks_the_environment(monkeypatch):
    monkeypatch.setenv(launch.ENV_PROCESS_ID, "2")
    monkeypatch.delenv(launch.ENV_COORDINATOR, raising=False)
    monkeypatch.setenv(launch.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match="VIJAX_COORDINATOR is not"):
        launch.initialize()
    monkeypatch.setenv(launch.ENV_COORDINATOR, "127.0.0.1:1")
    with pytest.raises(ValueError, match="must be below"):
        launch.initialize()


def test_initialize_after_the_backend_started_says_so(monkeypatch):
    jax.devices()  # the backend runs (with the suite's 8 devices)
    monkeypatch.setenv(launch.ENV_DEVICES_PER_PROCESS, "3")
    with pytest.raises(RuntimeError, match="before JAX starts its backend"):
        launch.initialize()


# ---------------------------------------------------------------------------------------------
# a fit over two processes
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    got = _launch("--processes", "2", "--devices-per-process", "2", "--timeout",
                  str(LAUNCH_TIMEOUT_S), str(SCRIPT), str(out), timeout=SUBPROCESS_TIMEOUT_S)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-4000:]
    return out, [dict(np.load(out / f"fits_{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def one_process():
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    results = multiprocess_fit.fits(mesh)
    results["resumed"] = multiprocess_fit.resumed(results["minibatch"], mesh)
    return {name: multiprocess_fit.summary(res) for name, res in results.items()}


@pytest.mark.slow
def test_two_processes_see_four_devices_and_agree(two_processes):
    _, (p0, p1) = two_processes
    for i, p in enumerate((p0, p1)):
        assert int(p["process"]) == i and int(p["processes"]) == 2
        assert int(p["global_devices"]) == 4 and int(p["local_devices"]) == 2
    for k in p0:
        if k not in ("process", "archive_writes", "failed_save"):  # the same everywhere
            np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("fit", ["minibatch", "stream"])
def test_two_process_fit_equals_one_process_fit_on_four_devices(two_processes, one_process,
                                                                fit):
    _, (p0, _) = two_processes
    ref = one_process[fit]
    # the stopping rule stopped both at the same step, well before steps=3000
    assert bool(p0[f"{fit}_converged"]) and ref["converged"]
    assert int(p0[f"{fit}_n_steps"]) == ref["n_steps"] < 3000
    for k, v in ref.items():
        if k.startswith("param"):
            np.testing.assert_allclose(p0[f"{fit}_{k}"], v, atol=PARAM_TOL, rtol=0)
    np.testing.assert_allclose(p0[f"{fit}_losses"], ref["losses"], rtol=LOSS_TOL)
    np.testing.assert_allclose(p0[f"{fit}_k_hat"], ref["k_hat"], rtol=K_HAT_TOL)


@pytest.mark.slow
def test_a_checkpoint_resumes_in_every_process(two_processes, one_process):
    _, (p0, _) = two_processes  # process 1's values equal process 0's (test above)
    ref = one_process["resumed"]
    assert int(p0["resumed_n_steps"]) == ref["n_steps"] == int(p0["minibatch_n_steps"]) + 200
    for k, v in ref.items():
        if k.startswith("param"):
            np.testing.assert_allclose(p0[f"resumed_{k}"], v, atol=PARAM_TOL, rtol=0)
    np.testing.assert_allclose(p0["resumed_losses"], ref["losses"], rtol=LOSS_TOL)


@pytest.mark.slow
def test_only_process_zero_writes_the_checkpoint(two_processes):
    out, (p0, p1) = two_processes
    assert int(p0["archive_writes"]) == 1 and int(p1["archive_writes"]) == 0
    # both loaded the file as soon as save returned (the barrier) and got their own result
    assert bool(p0["loaded_equal"]) and bool(p1["loaded_equal"])
    assert [p.name for p in out.iterdir() if p.suffix == ".vjx"] == ["minibatch.vjx"]
    # where process 0 cannot write, it raises its own error and process 1 says so
    assert str(p0["failed_save"]).startswith("FileNotFoundError")
    assert str(p1["failed_save"]).startswith("OSError: process 0 could not write")
