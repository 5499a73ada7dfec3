"""A run that never trains on garbage, and what each fault leaves behind.

Non-finite guard (run.train_loop, optim.make_optimizer): a NaN metric stops the run naming the
stage, step and metric, after logging that step's row (marked) and without a newer checkpoint;
or, with optimizer.on_nonfinite='skip', the update is skipped (params kept) and counted.
Faults: a full disk while saving (the previous checkpoint stays the one a rerun resumes from),
SIGTERM (a checkpoint of the current step, then the process ends by SIGTERM).
Elsewhere: a damaged or truncated checkpoint (tests/test_bad_input.py), a changed config
(tests/test_run_contract.py), a killed preference-sampling or labelling step
(tests/test_preferences.py, tests/test_labelers.py), a killed process of several
(tests/test_multiprocess.py).
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import optimizers
from rlhf_jax.runtime import checkpoints, config as config_lib, mesh as mesh_lib, metrics as metrics_lib, run as run_lib
from rlhf_jax.runtime.optim import make_optimizer, make_train_step
from rlhf_jax.stages import registry

ROOT = os.path.join(os.path.dirname(__file__), "..")


# ----------------------------------------------------------------------------- a least-squares learner


def least_squares(params, batch):
    loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    return loss, {"loss": loss}


def least_squares_run(workdir, nan_steps=(), on_nonfinite="stop", num_steps=8, max_consecutive_skips=10):
    """Train w on y = x @ [1, 2] with adam; the batches of `nan_steps` hold a NaN input (a
    corrupt example), so their loss and gradient are NaN. Returns the final state."""
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    config = optimizers.adam(0.1, grad_clip_norm=0.0)
    config.update(on_nonfinite=on_nonfinite, max_consecutive_skips=max_consecutive_skips)
    optimizer = make_optimizer(config)
    params = {"w": jnp.zeros(2)}
    state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
    step_fn = make_train_step(least_squares, optimizer, mesh, shardings)

    def batch_fn(step):
        x = np.random.default_rng(step).normal(size=(8, 2)).astype(np.float32)
        batch = {"x": x, "y": x @ np.float32([1.0, 2.0])}
        if step in nan_steps:
            batch["x"][3, 0] = np.nan
        return mesh_lib.shard_batch(batch, mesh)

    return run_lib.train_loop(workdir=workdir, state=state, step_fn=step_fn, batch_fn=batch_fn,
                              num_steps=num_steps, rng=jax.random.key(0), log_every=1, checkpoint_every=3)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(checkpoints.Diverged, match=r"step 5: metric grad_norm is nan .*'loss'.*step 3 stays the latest"):
        least_squares_run(str(tmp_path), nan_steps=(4,))  # (batch 4 is step 5's: steps count from 1)
    rows = metrics_lib.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["nonfinite"] == ["grad_norm", "loss"] and np.isnan(rows[-1]["loss"])
    assert all("nonfinite" not in r for r in rows[:-1])
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    assert manager.all_steps() == [3]  # nothing saved after the NaN
    manager.close()


def test_skip_keeps_the_params_and_counts_the_skipped_updates(tmp_path):
    clean = least_squares_run(str(tmp_path / "clean"), num_steps=4)
    skipped = least_squares_run(str(tmp_path / "skipped"), nan_steps=(4, 5), on_nonfinite="skip", num_steps=6)
    rows = {r["step"]: r for r in metrics_lib.read_metrics(str(tmp_path / "skipped"))}
    assert [rows[s]["nonfinite/skipped_updates"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 2]
    assert set(rows[5]) == {"step", "nonfinite/skipped_updates"}  # no NaN logged as a curve value
    # Steps 5 and 6 changed nothing: the params are those after step 4 of a clean run.
    np.testing.assert_array_equal(np.asarray(skipped["params"]["w"]), np.asarray(clean["params"]["w"]))
    assert int(skipped["opt_state"].skipped_updates) == 2  # checkpointed with the state


def test_skip_gives_up_after_max_consecutive_skips(tmp_path):
    with pytest.raises(checkpoints.Diverged, match=r"step 4: metric"):
        least_squares_run(str(tmp_path), nan_steps=(1, 2, 3), on_nonfinite="skip", max_consecutive_skips=2)


def test_diverged_stage_names_stage_step_and_metric(tmp_path):
    from tests.test_pretrain import micro_config

    config = micro_config("pretrain", tmp_path / "data", num_steps=6, checkpoint_every=3, eval_every=3, log_every=1)
    config.optimizer.learning_rate = 1e30  # adam moves every weight by ~1e30: inf logits, NaN loss
    with pytest.raises(checkpoints.Diverged) as e:
        registry.run_stage(config, str(tmp_path / "run"), allow_config_change=True)
    assert str(e.value).startswith("stage pretrain (")
    assert re.search(r"\): step [23]: metric (loss|grad_norm|accuracy) is nan", str(e.value))  # (warm-up: step 1 moves little)
    assert not checkpoints.is_finished(str(tmp_path / "run"))


# ----------------------------------------------------------------------------- full disk


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    real_save = ocp.CheckpointManager.save

    def save_into_a_full_disk(self, step, *args, **kwargs):
        if step == 6:  # Orbax writes into a temporary folder first: leave one cut short
            tmp = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp-0")
            os.makedirs(os.path.join(tmp, "state"), exist_ok=True)
            open(os.path.join(tmp, "state", "d"), "wb").write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", save_into_a_full_disk)
        with pytest.raises(config_lib.CheckpointError, match=r"checkpoints/6: saving the checkpoint failed "
                                                             r"\(OSError: .*No space left.*step 3 stays the latest"):
            least_squares_run(workdir)
    # The rerun (room again) resumes from step 3 and ends where an uninterrupted run ends.
    resumed = least_squares_run(workdir)
    straight = least_squares_run(str(tmp_path / "straight"))
    np.testing.assert_array_equal(np.asarray(resumed["params"]["w"]), np.asarray(straight["params"]["w"]))
    assert metrics_lib.read_metrics(workdir) == metrics_lib.read_metrics(str(tmp_path / "straight"))


PRETRAIN = os.path.join(ROOT, "experiments", "reviews", "pretrain.py")


def cli_with_file_size_limit(limit: int, *argv):
    """(exit status, stderr) of `rlhf-jax argv` in a process whose writes fail past `limit` bytes
    a file (EFBIG: what a full disk does to a writer, without filling this machine's disk)."""
    # (set in the child itself: preexec_fn would fork this multithreaded JAX process)
    child = ("import resource, runpy, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (its default action kills the process)\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
             "sys.argv[0] = 'rlhf-jax'\n"
             "runpy.run_module('rlhf_jax.apps.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr


def test_failed_writes_and_a_cut_checkpoint_end_in_one_line_without_tracebacks(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"A short document number {i}.\n" * 40)
    train = ("train", f"--config={PRETRAIN}", f"--workdir={tmp_path / 'run'}", "--config.data.name=text_folder",
             f"--config.data.path={folder}", f"--config.data_dir={tmp_path / 'd'}", "--config.model.d_model=32",
             "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.batch_size=8",
             "--config.seq_len=64", "--config.num_steps=4", "--config.log_every=2", "--config.checkpoint_every=2",
             "--config.eval_every=0", "--config.data.validation_fraction=0.3")
    # The dataset's file (about 60 KB) cannot be written.
    code, err = cli_with_file_size_limit(20_000, *train)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("rlhf-jax: data error: preparing dataset rlhf_text_folder")
    # The dataset fits, the first checkpoint (files of about 260 KB) does not: Orbax's background
    # writers fail first, each with its traceback, before the save reports the cause.
    code, err = cli_with_file_size_limit(200_000, *train)
    assert code == 2 and "Traceback" not in err, err
    assert re.match(r"rlhf-jax: checkpoint error: .*checkpoints/2: saving the checkpoint failed .*File too large",
                    err.strip().splitlines()[-1])
    assert checkpoints.latest_step(str(tmp_path / "run")) is None

    # A hand-off whose array files are cut short: one line from `sample`, not TensorStore's
    # callbacks failing on a closed event loop.
    from configs import models
    from rlhf_jax.stages import runs

    model = models.tiny()
    model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    runs.save_random_run(str(tmp_path / "sft"), model)
    for root, _, files in os.walk(tmp_path / "sft" / runs.HANDOFF_DIR):
        for name in files:
            if os.path.basename(root) == "d":
                path = os.path.join(root, name)
                data = open(path, "rb").read()
                open(path, "wb").write(data[:len(data) // 2])
    code, err = cli_with_file_size_limit(2**40, "sample", f"--workdir={tmp_path / 'sft'}", "--prompt=a")
    assert code == 2 and "Traceback" not in err, err
    assert "cannot be read, a file is missing or cut short" in err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- SIGTERM


SNACK = os.path.join(ROOT, "experiments", "snack_bandit.py")


def endless_snack_run(workdir: str):
    """(command, process) of a snack run that never checkpoints by itself, once it has logged 5 rows."""
    command = [sys.executable, "-m", "rlhf_jax.apps.cli", "train", f"--config={SNACK}", f"--workdir={workdir}",
               "--config.num_steps=100000000", "--config.checkpoint_every=100000000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and len(metrics_lib.read_metrics(workdir)) < 5:
        time.sleep(0.2)
    return command, proc


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(tmp_path):
    workdir = str(tmp_path / "termed")
    command, proc = endless_snack_run(workdir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    last_logged = metrics_lib.read_metrics(workdir)[-1]["step"]
    manager = checkpoints.checkpoint_manager(workdir)
    assert manager.all_steps() == [last_logged]  # (no checkpoint step was reached otherwise)
    manager.close()
    assert not checkpoints.is_finished(workdir)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not any(r["step"] > last_logged for r in metrics_lib.read_metrics(workdir)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert f"resuming {workdir} from step {last_logged}" in err


def test_ctrl_c_saves_the_current_step_and_exits_130_with_one_line(tmp_path):
    workdir = str(tmp_path / "interrupted")
    _, proc = endless_snack_run(workdir)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("rlhf-jax: stopped by Ctrl-C")
    manager = checkpoints.checkpoint_manager(workdir)
    assert manager.all_steps() == [metrics_lib.read_metrics(workdir)[-1]["step"]]
    manager.close()


def test_a_damaged_config_json_or_a_file_for_a_workdir_is_one_line(tmp_path, capsys):
    from rlhf_jax.apps import cli

    run = tmp_path / "run"
    run.mkdir()
    for content, expected in ((b"\x89PNG garbage", "is not a readable run config"),
                              (b'{"stage": "sf', "is not a readable run config"),
                              (b'["a", "list"]', "holds a JSON list, not a run config")):
        (run / "config.json").write_bytes(content)
        assert cli.main(["sample", f"--workdir={run}", "--prompt=a"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, err
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", f"--config={SNACK}", f"--workdir={tmp_path / 'file'}", "--config.num_steps=20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a file; expected a folder" in err, err


def test_an_experiment_argument_the_file_does_not_know_is_one_line(capsys):
    from rlhf_jax.apps import cli

    ppo = os.path.join(ROOT, "experiments", "reviews", "ppo.py")
    assert cli.main(["train", f"--config={ppo}:bogus", "--workdir=/tmp/never_written"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ppo.py:bogus" in err and "expected no argument" in err, err
    assert not os.path.exists("/tmp/never_written")


def test_launch_of_an_unknown_command_is_one_line_before_any_process_starts(capsys):
    from rlhf_jax.apps import cli

    assert cli.main(["launch", "--num_processes=2", "--", "frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("rlhf-jax: config error: launch: 'frobnicate' is not a command launch runs; expected one of "
                   "train, sweep, pipeline, compare, rounds after `--`")


def test_a_model_that_cannot_fit_in_memory_is_refused_up_front(tmp_path, capsys):
    from rlhf_jax.apps import cli

    pretrain = os.path.join(ROOT, "experiments", "reviews", "pretrain.py")
    assert cli.main(["train", f"--config={pretrain}", f"--workdir={tmp_path / 'run'}",
                     "--config.model.max_len=100000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.model:" in err and "GiB for the train state alone" in err, err
    assert not (tmp_path / "run").exists()
