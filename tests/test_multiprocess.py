"""Many processes under jax.distributed (CPU, gloo): `rlhf-jax launch` with 2 processes x 4
devices gives what 1 process x 8 devices gives, a process killed mid-run stops the launch and the
same command resumes to the end state of the uninterrupted run, and a coordinator nobody runs is a clear
error. The runs are subprocesses (a process joins the runtime once, before it touches a device)."""

import json
import os
import subprocess
import time
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.runtime import checkpoints, config as config_lib, distributed, metrics as metrics_lib
from rlhf_jax.stages import registry


ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPERIMENT = os.path.join(ROOT, "tests", "multiprocess_experiment.py")


# The launched processes run XLA's CPU kernels on one thread each. Two of them beside the other
# pytest-xdist worker on 2 cores otherwise spin their thread pools against each other: the 2-process
# PPO test took 126 s with a busy neighbour and 102 s with these flags (2026-12-07, 2-core sandbox).
# Kernel threading does not change what a run computes beyond float rounding (compared to 1e-5).
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def launch(workdir, data_dir, num_processes, devices_per_process, *overrides, env=None, stage="pretrain",
           timeout=240):
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jax.apps.cli", "launch", f"--num_processes={num_processes}",
         f"--devices_per_process={devices_per_process}", "--", "train", f"--config={EXPERIMENT}:{stage}",
         f"--workdir={workdir}", f"--config.data_dir={data_dir}", *overrides],
        env={**os.environ, "PYTHONPATH": ROOT, **env}, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def train_in_this_process(workdir, data_dir, *overrides, stage="pretrain"):
    """The 1 process x 8 devices reference: what `rlhf-jax train` does, in the test process
    (8 fake devices, tests/conftest.py) without another process start."""
    overrides = [o[len("--config."):].split("=", 1) for o in (f"--config.data_dir={data_dir}", *overrides)]
    config = config_lib.load_config(f"{EXPERIMENT}:{stage}", overrides)
    registry.run_stage(config, workdir)


def assert_same_params(a_workdir, b_workdir, params=lambda state: state["params"]):
    _, a = registry.load_run(a_workdir)
    _, b = registry.load_run(b_workdir)
    a, b = params(a), params(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        if "['key']['bias']" in name or "['scalar_head']['bias']" in name:
            # Their gradients are exactly 0 (softmax ignores a shift of every key's logit; the
            # Bradley-Terry loss sees only reward differences), so what they get is rounding noise,
            # which Adam scales up to ~lr-sized random steps: compared by size only.
            assert np.abs(x).max() < 1e-3 and np.abs(y).max() < 1e-3, name
        else:
            # 8 devices sum their gradients in another order on 2 processes (gloo) than on 1.
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)


def assert_same_metrics(a_workdir, b_workdir):
    a, b = metrics_lib.read_metrics(a_workdir), metrics_lib.read_metrics(b_workdir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """The same pre-training run on 1 process x 8 devices and on 2 processes x 4 devices, the
    latter killed mid-run and resumed by the same command (one launch fewer than an uninterrupted
    2-process run beside a killed one; the resumed run must still equal the 1-process run)."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {"root": root, "data": str(root / "data")}
    out["one"], out["two"] = str(root / "one"), str(root / "two")
    train_in_this_process(out["one"], out["data"])
    # Process 1 dies (SIGKILL) after step 4; the checkpoint of step 3 is on disk.
    out["killed"] = launch(out["two"], out["data"], 2, 4,
                           env={"RLHF_JAX_FAULT_AFTER_STEP": "4", "RLHF_JAX_FAULT_PROCESS": "1"})
    out["killed_finished"] = checkpoints.is_finished(out["two"])
    out["resumed"] = launch(out["two"], out["data"], 2, 4)  # the same command again
    return out


@pytest.mark.slow
def test_killed_process_stops_the_launch_and_the_rerun_resumes(pretrain_runs):
    killed, resumed = pretrain_runs["killed"], pretrain_runs["resumed"]
    assert killed.returncode != 0
    assert "process 1 of 2 was killed by SIGKILL" in killed.stderr and "resume" in killed.stderr
    assert not pretrain_runs["killed_finished"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from step 3" in resumed.stderr
    assert checkpoints.is_finished(pretrain_runs["two"])
    # One progress line per step shown, not one per process.
    assert resumed.stderr.count("step 6/6") == 1


@pytest.mark.slow
def test_two_processes_equal_one_process(pretrain_runs):
    """The killed-and-resumed 2-process run ends where the uninterrupted 1-process run does: every
    logged row (the resumed steps' rows included, none twice) and the parameters."""
    assert pretrain_runs["resumed"].returncode == 0, pretrain_runs["resumed"].stderr[-3000:]
    assert_same_metrics(pretrain_runs["one"], pretrain_runs["two"])
    assert_same_params(pretrain_runs["one"], pretrain_runs["two"])


@pytest.mark.slow
def test_reward_stage_two_processes_equal_one_process(tmp_path):
    from rlhf_jax.stages import pretrain
    from tests.multiprocess_experiment import micro_model

    sft = str(tmp_path / "sft")
    pretrain.save_random_run(sft, micro_model())
    rng = np.random.default_rng(0)
    words = ["great", "awful", "fine", "loved it", "broke", "cheap", "slow", "friendly"]
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(64):
            a, b = rng.choice(words, 2, replace=False)
            f.write(json.dumps({"prompt": f"Review {i}:", "chosen": f" It was {a}.", "rejected": f" It was {b}."}) + "\n")
    one, two, data = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "data")
    overrides = (f"--config.init_from={sft}", f"--config.data.path={pairs}")
    train_in_this_process(one, data, *overrides, stage="reward")
    proc = launch(two, data, 2, 4, *overrides, stage="reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(one, two)
    assert_same_params(one, two)
    # The rewards' normalisation on SFT samples (every process samples; process 0 writes it).
    a, b = (json.load(open(os.path.join(w, "reward_normalization.json"))) for w in (one, two))
    assert a["num_samples"] == b["num_samples"] > 0
    # The mean carries the scalar head's bias, rounding noise of either run (above): compared
    # without it (2e-5: the 1e-5 of every parameter, summed over the trunk and head).
    assert a["mean"] - scalar_head_bias(one) == pytest.approx(b["mean"] - scalar_head_bias(two), rel=2e-5)
    assert a["std"] == pytest.approx(b["std"], rel=1e-5)


def scalar_head_bias(workdir) -> float:
    _, state = registry.load_run(workdir)
    return next(float(np.asarray(x).ravel()[0]) for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
                if "['scalar_head']['bias']" in jax.tree_util.keystr(path))


@pytest.mark.slow
def test_ppo_with_a_host_reward_function_two_processes_equal_one_process(tmp_path):
    from rlhf_jax.stages import pretrain
    from tests.multiprocess_experiment import micro_model

    sft = str(tmp_path / "sft")
    pretrain.save_random_run(sft, micro_model())
    one, two, data = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "data")
    train_in_this_process(one, data, f"--config.init_from={sft}", stage="ppo")
    proc = launch(two, data, 2, 4, f"--config.init_from={sft}", stage="ppo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(one, two)  # objective/scores: the reward function's, from both processes' rows
    assert_same_params(one, two, params=lambda state: state.params)
    # Process 0 alone writes the sample table (its own rows: the first of the batch).
    table, full_table = (open(os.path.join(w, "samples.txt")).read().splitlines() for w in (two, one))
    assert sum(line.startswith("--- step") for line in table) == 2
    assert all(line in full_table for line in table)


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
    port = distributed.free_port()  # nobody listens there
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.apps.cli", "train", f"--config={EXPERIMENT}", f"--workdir={tmp_path / 'w'}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
         "--distributed_timeout_s=2"],
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf-jax: distributed error: process 1 could not join coordinator 127.0.0.1:")
    assert "within 2 s" in last
    assert not os.path.exists(tmp_path / "w")  # nothing written


def test_incomplete_distributed_settings_are_named(tmp_path):
    with pytest.raises(distributed.DistributedError, match="num_processes=2, process_id=-1"):
        distributed.initialize("127.0.0.1:1234", 2, -1)


def test_launch_without_a_command_is_a_clear_error(capsys):
    from rlhf_jax.apps import cli

    assert cli.main(["launch", "--num_processes=2", "train"]) == 2
    assert "put the command after `--`" in capsys.readouterr().err


def test_a_data_error_in_one_process_is_its_own_line_and_stops_the_others_at_once(tmp_path):
    """Process 0 alone prepares the dataset and fails on it; process 1, waiting for it at a
    barrier, loses the coordinator and aborts with a stack trace: not shown."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(5):
        (texts / f"{i}.txt").write_text(f"A short document number {i}.\n" * 40)
    (texts / "5.txt").write_bytes(b"fine\n\xc3\x28 broken\n")
    start = time.time()
    proc = launch(tmp_path / "run", tmp_path / "data", 2, 4, "--config.data.name=text_folder",
                  f"--config.data.path={texts}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.time() - start < 90  # (a collective's timeout would be minutes)
    lines = proc.stderr.strip().splitlines()
    assert f"rlhf-jax: data error: {texts / '5.txt'} line 2: not valid UTF-8" in lines[-2]
    assert lines[-1].startswith("rlhf-jax launch: process 0 of 2 stopped on the error above")
    assert not any(word in proc.stderr for word in ("Traceback", "Check failure", "DEADLINE_EXCEEDED"))
