"""Shared by the benchmark scripts under experiments/: timing, machine description, results file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments", "results")


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()]}


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall-clock seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_flops(dtype, n=None, repeats=5) -> float:
    """The machine's measured matmul FLOP/s: the best of a few n x n jnp.dot's (the denominator of
    every "fraction of peak")."""
    n = n or (8192 if jax.default_backend() == "gpu" else 2048)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    seconds = best_time(lambda: f(a).block_until_ready(), repeats=repeats)
    return 2 * n**3 / seconds


def record_result(name: str, result: dict) -> str:
    """Append one JSON line {date, machine, ...result} to experiments/results/<name>.jsonl."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), **result}
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return path
