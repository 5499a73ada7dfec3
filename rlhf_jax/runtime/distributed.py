"""Many processes, one program: joining JAX's distributed runtime, and the local launcher.

A multi-host run is N copies of the same command, one per host (or per GPU), tied together by
`jax.distributed.initialize`. After it, `jax.devices()` lists every device of every process, the
mesh spans them all, and each jitted step is one program over the global arrays. What differs
per process is only what touches the host (see mesh.put_global / mesh.local_rows, and run.py:
only process 0 writes logs).

How a process learns its place, first match wins:
  1. explicit settings: `--coordinator_address`, `--num_processes`, `--process_id` on the command
     line, or the variables RLHF_JAX_COORDINATOR_ADDRESS / RLHF_JAX_NUM_PROCESSES /
     RLHF_JAX_PROCESS_ID (what `rlhf-jax launch` sets for its children);
  2. a cluster JAX configures by itself (SLURM with more than one task, Open MPI, a TPU slice
     naming its workers, JAX_COORDINATOR_ADDRESS, or RLHF_JAX_DISTRIBUTED=auto, e.g. on a Cloud
     TPU VM slice): `jax.distributed.initialize()` with no arguments;
  3. neither: one process, nothing to join.
These are settings of the launch, not of the experiment, so they stay out of the config: the
config.json of a run is the same on 1 or N processes, and a run may be resumed on another count.

CPU processes exchange data through gloo (`jax_cpu_collectives_implementation`), which must be
chosen before the runtime starts.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.runtime import config as config_lib

ENV_COORDINATOR = "RLHF_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"


class DistributedError(config_lib.UserError):
    """The processes of a run could not join each other (coordinator unreachable, bad settings)."""

    kind = "distributed error"


def _cluster_detected() -> bool:
    """A cluster `jax.distributed.initialize()` configures from its environment by itself.
    RLHF_JAX_DISTRIBUTED=auto says so where the environment does not show it (a Cloud TPU VM
    slice, which JAX recognises through its metadata server)."""
    env = os.environ
    if env.get("RLHF_JAX_DISTRIBUTED") == "auto" or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    # A multi-host TPU slice names its workers; one host alone needs no runtime.
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> bool:
    """Join the distributed runtime if this process is one of several; returns whether it did.

    Call before anything touches a JAX device (the device list is fixed once a backend starts).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get(ENV_PROCESS_ID, "-1") or -1)
    explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if explicit:
        if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, process_id={process_id}: "
                "give all three (host:port, a count >= 1, an id in [0, num_processes))")
        if num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    # The CPU backend talks between processes through gloo (it has no collectives otherwise);
    # the setting does not touch GPU or TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and process_id != 0:
        # JAX aborts the whole process (a C++ fatal error, no exception) when it cannot reach
        # the coordinator: find that out here first, where it can be said in one line.
        _wait_for_coordinator(coordinator_address, process_id, timeout_s)
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=int(timeout_s))
        else:
            jax.distributed.initialize(initialization_timeout=int(timeout_s))
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE), ValueError, RuntimeError
        where = f"coordinator {coordinator_address}" if explicit else "the coordinator the cluster names"
        raise DistributedError(
            f"process {process_id if explicit else '?'} could not join {where} within {timeout_s} s: is process 0 "
            f"running and is that address reachable from this host? ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:200]})") from e
    return True


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator_address={address!r}: expected host:port")
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.time() >= deadline:
                raise DistributedError(
                    f"process {process_id} could not join coordinator {address} within {timeout_s} s: is process 0 "
                    f"running and is that address reachable from this host? ({e})") from None
            time.sleep(0.2)


def is_main_process() -> bool:
    """Process 0 writes what a run writes once (metrics, TensorBoard, config.json, DONE, reports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process reaches this point before any goes on (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (one small collective)."""
    if jax.process_count() == 1:
        return bool(flag)

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


# ----------------------------------------------------------------------------- the local launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices_per_process: int) -> dict:
    env = dict(os.environ)
    env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(process_id)})
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


LATENCY_S = 0.5  # how long `launch` holds a child's stderr line before it decides to show it


def launch(command: list[str], num_processes: int, devices_per_process: int = 0, port: int = 0,
           grace_s: float = 3.0) -> int:
    """Run `rlhf-jax <command>` as `num_processes` cooperating processes on this machine; return
    the exit status to report (0 when all succeed).

    When one process fails, the others would wait for it in their next collective for ever: they
    get SIGTERM after `grace_s` (time for those that fail the same way to say so), then SIGKILL.
    SIGTERM or SIGINT to the launcher is passed on to every process (they checkpoint and stop).
    """
    if num_processes < 1:
        raise config_lib.ConfigError(f"--num_processes={num_processes}: expected an integer >= 1")
    if devices_per_process < 0:
        raise config_lib.ConfigError(f"--devices_per_process={devices_per_process}: expected an integer >= 0")
    if not command:
        raise config_lib.ConfigError("launch: no command after `--` (e.g. -- train --config=... --workdir=...)")
    port = port or free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "rlhf_jax.apps.cli", *command], stderr=subprocess.PIPE,
                              env=child_env(i, num_processes, port, devices_per_process))
             for i in range(num_processes)]
    # Every stderr line goes through one queue and out LATENCY_S after it arrived: by then a
    # process that failed has exited or printed its one-line error, even when another process
    # lost the coordinator (and started its abort trace) in the same instant. From then on the
    # other processes' dying words (an abort's stack trace, a collective's DEADLINE_EXCEEDED)
    # would bury that error: only their own one-line errors ('rlhf-jax: ...') pass.
    lines, failed_early, hidden = queue.Queue(), set(), [0]

    def read(i: int) -> None:
        for line in iter(procs[i].stderr.readline, b""):
            if line.startswith(b"rlhf-jax:"):
                failed_early.add(i)
            lines.put((time.time(), i, line))
        lines.put((time.time(), i, None))

    def relay() -> None:
        open_pipes = num_processes
        while open_pipes:
            arrived, i, line = lines.get()
            if line is None:
                open_pipes -= 1
                continue
            time.sleep(max(0.0, arrived + LATENCY_S - time.time()))
            others_failed = any(j != i and (j in failed_early or p.poll() not in (None, 0))
                                for j, p in enumerate(procs))
            if others_failed and not line.startswith(b"rlhf-jax:"):
                hidden[0] += 1
                continue
            sys.stderr.write(line.decode("utf-8", "replace"))
            sys.stderr.flush()

    relays = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(num_processes)]
    relays.append(threading.Thread(target=relay, daemon=True))
    for t in relays:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = None  # (process id, status) of the first process seen failing
        while True:
            codes = [p.poll() for p in procs]  # (every one: `any` would stop at the first running)
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                _stop(procs, grace_s)
                break
            if all(c is not None for c in codes):
                break
            time.sleep(0.1)
        codes = [p.wait() for p in procs]
        for t in relays:
            t.join(timeout=5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed is None:
        return 0
    i, code = failed
    not_shown = f"; {hidden[0]} lines they wrote as they stopped are not shown" if hidden[0] else ""
    if code == 2:  # a one-line error of its own (bad input): resuming would meet it again
        print(f"rlhf-jax launch: process {i} of {num_processes} stopped on the error above; the others were "
              f"stopped (exit statuses {codes}{not_shown})", file=sys.stderr, flush=True)
        return code
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    print(f"rlhf-jax launch: process {i} of {num_processes} {how}; the others were stopped "
          f"(exit statuses {codes}{not_shown}). Run the same command again to resume from the last checkpoint.",
          file=sys.stderr, flush=True)
    return code if code > 0 else 1


def _stop(procs, grace_s: float) -> None:
    deadline = time.time() + grace_s
    while time.time() < deadline and [p.poll() for p in procs].count(None):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    while time.time() < deadline and [p.poll() for p in procs].count(None):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
