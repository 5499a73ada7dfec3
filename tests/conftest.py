"""Every test process sees 8 fake CPU devices, so data-parallel and FSDP steps can be compared
with a 1-device mesh (`mesh.data=1, mesh.fsdp=1`) on the same global batch.

Compiled programs are kept in a persistent XLA cache shared by the test processes (pytest-xdist
workers, the multi-process launches, CLI subprocesses): the stages build their jitted steps
afresh for every run, so a resumed run, a second round or a 2-process rerun of a 1-process run
compiles the same programs again. The cache is keyed by the program's HLO, the compile options
and the JAX / XLA versions, so a hit is the very executable a recompile would give.
`RLHF_JAX_TEST_JIT_CACHE=` (empty) turns it off."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
