"""Every test process sees 8 fake CPU devices, so data-parallel and FSDP steps can be compared
with a 1-device mesh (`mesh.data=1, mesh.fsdp=1`) on the same global batch.

XLA's CPU code generation is unoptimised in the tests (`--xla_backend_optimization_level=0`): most
of a test's time is compiling many small programs, and LLVM's optimisation is most of a compile.
Same tests, same run (2026-12-08, 2-core sandbox, fresh caches): test_model's attention and remat
tests 64.5 s -> 46.5 s, two GRPO presets learning a toy reward 79 s -> 64 s. The minutes-long
end-to-end pipelines run in a process of their own with the default flags and one device
(`run_pipeline_in_a_process` in test_pipeline_e2e.py): unoptimised, their steps ran 2x slower.

Compiled programs are kept in a persistent XLA cache shared by the test processes (pytest-xdist
workers, the multi-process launches, CLI subprocesses): the stages build their jitted steps
afresh for every run, so a resumed run, a second round or a 2-process rerun of a 1-process run
compiles the same programs again. The cache is keyed by the program's HLO, the compile options
and the JAX / XLA versions, so a hit is the very executable a recompile would give.
`RLHF_JAX_TEST_JIT_CACHE=` (empty) turns it off."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.setdefault("RLHF_JAX_TEST_JIT_CACHE", os.path.join(tempfile.gettempdir(), "rlhf_jax_test_jit_cache"))
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    """The longest chains first, so a pytest-xdist worker starts on them at once instead of ending
    the run with them (`--dist loadfile` keeps each file on one worker)."""
    first = ("test_pipeline_e2e.py", "test_multiprocess.py", "test_compare.py", "test_rounds.py")
    rank = lambda item: next((i for i, name in enumerate(first) if item.nodeid.split("::")[0].endswith(name)), len(first))
    items.sort(key=rank)  # (stable: the order within a file is kept)


if os.environ.get("RLHF_JAX_TEST_CPU_LOG"):
    import json
    import time

    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        """RLHF_JAX_TEST_CPU_LOG=<file>: one JSON line per test with its wall and CPU seconds (this
        process and the subprocesses it waited for), setup and teardown included. A test whose CPU
        is far below its wall waits (sleeps, timeouts, I/O) rather than computes: the suite's
        time is the sum of both, and only the second shrinks by computing less."""
        wall, cpu = time.time(), os.times()
        yield
        end = os.times()
        used = sum(getattr(end, f) - getattr(cpu, f) for f in ("user", "system", "children_user", "children_system"))
        with open(os.environ["RLHF_JAX_TEST_CPU_LOG"], "a") as f:
            f.write(json.dumps({"test": item.nodeid, "wall_s": round(time.time() - wall, 2), "cpu_s": round(used, 2),
                                "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}) + "\n")
