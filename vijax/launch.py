"""Many processes on one machine: ``python -m vijax.launch`` starts them, :func:`initialize`
joins each to the others (``jax.distributed``).

Launch::

    python -m vijax.launch --processes N [--devices-per-process K | --gpus-per-process K]
        [--port P] [--timeout S] script.py [args...]

starts ``N`` copies of ``python script.py args...`` on the loopback address, each with the
environment variables

- ``VIJAX_PROCESS_ID``: ``0 .. N-1``;
- ``VIJAX_NUM_PROCESSES``: ``N``;
- ``VIJAX_COORDINATOR``: ``127.0.0.1:P`` (``P`` a free port unless ``--port`` names one),
  where process 0 serves ``jax.distributed``'s coordinator;
- ``VIJAX_DEVICES_PER_PROCESS``: ``K`` with ``--devices-per-process K`` (host CPU devices
  per process, ``jax_num_cpu_devices``: the way to test a multi-device, multi-process fit
  on a CPU);
- ``JAX_LOCAL_DEVICE_IDS``: ``i*K, ..., i*K+K-1`` for process ``i`` with
  ``--gpus-per-process K`` (read by ``jax.distributed.initialize``, which then shows the
  process only those GPUs, as ``CUDA_VISIBLE_DEVICES`` would);

prints their output line by line, prefixed by ``[i]``, and exits with the first non-zero
return code among them (the others are then stopped), with 124 when ``--timeout`` seconds
pass first, or with 0 when all succeed.

The script calls :func:`initialize` before anything starts JAX's backend (``import
vijax`` does not), and then calls ``vj.fit(..., mesh=)`` on a mesh of all the processes'
devices (``jax.make_mesh((jax.device_count(),), ("data",))``) with the same arguments and
the full data in every process: see :func:`vijax.fit`. Without the variables,
:func:`initialize` does nothing, so the same script runs as one process.

One process per GPU on a machine with several GPUs is ``--gpus-per-process 1``. Tested:
CPU processes only (``--devices-per-process``, gloo collectives over the loopback address;
``tests/test_multiprocess.py``); the GPU option only sets JAX's own variable.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["initialize", "launch", "ProcessInfo", "free_port", "ENV_PROCESS_ID",
           "ENV_NUM_PROCESSES", "ENV_COORDINATOR", "ENV_DEVICES_PER_PROCESS"]

ENV_PROCESS_ID = "VIJAX_PROCESS_ID"
ENV_NUM_PROCESSES = "VIJAX_NUM_PROCESSES"
ENV_COORDINATOR = "VIJAX_COORDINATOR"
ENV_DEVICES_PER_PROCESS = "VIJAX_DEVICES_PER_PROCESS"
_ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"  # jax.distributed.initialize reads it

TIMEOUT_CODE = 124  # the exit code of a launch stopped by --timeout (as timeout(1))
_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL when stopping the other processes


class ProcessInfo(NamedTuple):
    """Where this process stands: ``process_id`` in ``0 .. num_processes - 1`` and the
    coordinator's address (``None`` for a single process that was not launched)."""

    process_id: int
    num_processes: int
    coordinator: str | None


# ---------------------------------------------------------------------------------------------
# inside each process
def _env_int(name: str, low: int) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < low:
        raise ValueError(f"environment variable {name}={value} must be at least {low}")
    return value


def initialize(local_device_ids: Sequence[int] | None = None) -> ProcessInfo:
    """Join this process to the others started by ``python -m vijax.launch``: reads
    ``VIJAX_PROCESS_ID``, ``VIJAX_NUM_PROCESSES``, ``VIJAX_COORDINATOR`` and
    ``VIJAX_DEVICES_PER_PROCESS`` and calls ``jax.distributed.initialize(coordinator,
    num_processes, process_id, local_device_ids)``, after setting
    ``jax_cpu_collectives_implementation="gloo"`` (collectives across CPU processes; JAX's
    default, set explicitly) and, when ``VIJAX_DEVICES_PER_PROCESS`` is set,
    ``jax_num_cpu_devices`` to it. Without ``VIJAX_PROCESS_ID`` in the environment it does
    nothing (one process; ``VIJAX_DEVICES_PER_PROCESS`` still applies when set), and a
    second call does nothing either.

    Call it at the top of the script, before anything starts JAX's backend (a computation,
    ``jax.devices()``); ``import vijax`` does not start it.

    Args:
        local_device_ids: the accelerators this process uses (e.g. ``[process_id]`` for one
            GPU per process); ``None``: as ``JAX_LOCAL_DEVICE_IDS`` says
            (``--gpus-per-process``), else every device the process sees.

    Returns:
        ``ProcessInfo(process_id, num_processes, coordinator)``; ``(0, 1, None)`` when not
        launched.

    Example:
        >>> from vijax.launch import initialize
        >>> initialize().num_processes  # not launched: one process, nothing done
        1
    """
    import jax

    if ENV_DEVICES_PER_PROCESS in os.environ:
        k = _env_int(ENV_DEVICES_PER_PROCESS, 1)
        if jax.config.jax_num_cpu_devices != k:
            _before_backend(f"it sets jax_num_cpu_devices={k} ({ENV_DEVICES_PER_PROCESS})")
            jax.config.update("jax_num_cpu_devices", k)
    if ENV_PROCESS_ID not in os.environ:
        return ProcessInfo(jax.process_index(), jax.process_count(), None) \
            if jax.distributed.is_initialized() else ProcessInfo(0, 1, None)
    missing = [v for v in (ENV_NUM_PROCESSES, ENV_COORDINATOR) if v not in os.environ]
    if missing:
        raise ValueError(f"{ENV_PROCESS_ID} is set but {', '.join(missing)} is not: start "
                         "the processes with python -m vijax.launch")
    n = _env_int(ENV_NUM_PROCESSES, 1)
    pid = _env_int(ENV_PROCESS_ID, 0)
    if pid >= n:
        raise ValueError(f"{ENV_PROCESS_ID}={pid} must be below {ENV_NUM_PROCESSES}={n}")
    coordinator = os.environ[ENV_COORDINATOR]
    info = ProcessInfo(pid, n, coordinator)
    if jax.distributed.is_initialized():
        return info
    _before_backend("it calls jax.distributed.initialize")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=n, process_id=pid,
                               local_device_ids=local_device_ids)
    return info


def _before_backend(why: str) -> None:
    from jax._src import xla_bridge  # no public way to ask (jax 0.10)

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError("vijax.launch.initialize() must be called before JAX starts its "
                           "backend (a computation, jax.devices(), jax.process_count()): "
                           f"{why}; call it at the top of the script")


# ---------------------------------------------------------------------------------------------
# the launcher
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that no one listens on now (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _environment(i: int, n: int, coordinator: str, devices: int | None,
                 gpus: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({ENV_PROCESS_ID: str(i), ENV_NUM_PROCESSES: str(n),
                ENV_COORDINATOR: coordinator, "PYTHONUNBUFFERED": "1"})
    if devices is not None:
        env[ENV_DEVICES_PER_PROCESS] = str(devices)
    if gpus is not None:
        env[_ENV_LOCAL_DEVICE_IDS] = ",".join(str(i * gpus + j) for j in range(gpus))
    return env


def _relay(i: int, stream, out, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(f"[{i}] {text}\n")
            out.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the process group of every process still running, SIGKILL after a grace
    period (each process is the leader of its own group: its children go with it)."""
    alive = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + _GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in alive):
            time.sleep(0.05)
        alive = [p for p in alive if p.poll() is None]
        if not alive:
            return


def launch(script: str, args: Sequence[str] = (), *, processes: int,
           devices_per_process: int | None = None, gpus_per_process: int | None = None,
           port: int | None = None, timeout: float | None = None, out=None) -> int:
    """Run ``processes`` copies of ``python script args...`` joined by ``jax.distributed``
    on ``127.0.0.1:port`` (the environment in the module docstring) and wait for them.

    Args:
        script: path of the Python script every process runs (it calls :func:`initialize`).
        args: its command-line arguments, the same for every process.
        processes: how many processes (>= 1).
        devices_per_process: host CPU devices per process (``jax_num_cpu_devices``).
        gpus_per_process: GPUs per process: process ``i`` gets GPUs ``i*K .. i*K+K-1``
            (``JAX_LOCAL_DEVICE_IDS``). Not tested here (CPU only).
        port: the coordinator's port; ``None``: a free one.
        timeout: seconds before every process is stopped (return code 124); ``None``: no
            limit.
        out: where the prefixed output goes (default ``sys.stdout``).

    Returns:
        The first non-zero return code of a process (the others are stopped), 124 after a
        timeout, else 0.

    Example:
        >>> launch("fit.py", ["--steps", "2000"], processes=2,
        ...        devices_per_process=2)  # doctest: +SKIP
        0
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    for name, k in (("devices_per_process", devices_per_process),
                    ("gpus_per_process", gpus_per_process)):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    if devices_per_process is not None and gpus_per_process is not None:
        raise ValueError("give devices_per_process (host CPU devices) or gpus_per_process, "
                         "not both")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"script {script!r} does not exist (or is not a file)")
    out = sys.stdout if out is None else out
    coordinator = f"127.0.0.1:{free_port() if port is None else port}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    try:
        for i in range(processes):
            p = subprocess.Popen(
                [sys.executable, script, *args],
                env=_environment(i, processes, coordinator, devices_per_process,
                                 gpus_per_process),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True)
            t.start()
            relays.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        code = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    out.write(f"vijax.launch: stopped after the timeout of {timeout} s\n")
                code = TIMEOUT_CODE
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for t in relays:
            t.join(timeout=_GRACE_S)
    if code < 0:  # killed by a signal: the shell's convention
        code = 128 - code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vijax.launch",
        description="Start N local processes of `python script.py args...` joined by "
                    "jax.distributed on 127.0.0.1 (the script calls "
                    "vijax.launch.initialize()).")
    parser.add_argument("--processes", "-n", type=int, required=True,
                        help="number of processes (>= 1)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--devices-per-process", type=int, default=None,
                         help="host CPU devices per process (jax_num_cpu_devices)")
    devices.add_argument("--gpus-per-process", type=int, default=None,
                         help="GPUs per process: process i gets GPUs i*K..i*K+K-1 "
                              "(JAX_LOCAL_DEVICE_IDS)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free port)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every process after this many seconds (exit code 124)")
    parser.add_argument("script", help="the Python script every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    ns = parser.parse_args(argv)
    try:
        return launch(ns.script, ns.args, processes=ns.processes,
                      devices_per_process=ns.devices_per_process,
                      gpus_per_process=ns.gpus_per_process, port=ns.port,
                      timeout=ns.timeout)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        return 130
    return 0  # unreachable (parser.error exits)


if __name__ == "__main__":
    sys.exit(main())
