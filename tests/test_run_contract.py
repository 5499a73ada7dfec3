"""The run contract: config files and overrides, workdir outputs, resume after a kill, devices, plots."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.apps import cli
from rlhf_jax.runtime import checkpoints, config as config_lib, metrics as metrics_lib
from rlhf_jax.stages import registry, snack

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPERIMENT = os.path.join(ROOT, "experiments", "snack_bandit.py")


# ----------------------------------------------------------------------------- config errors


def test_override_parses_to_the_field_type():
    config = config_lib.load_config(EXPERIMENT, [("optimizer.learning_rate", "0.5"), ("num_seeds", "4"),
                                                 ("learning_rates", "(0.1, 0.2)"), ("model.trainable", "all")])
    assert config.optimizer.learning_rate == 0.5 and isinstance(config.optimizer.learning_rate, float)
    assert config.num_seeds == 4
    assert tuple(config.learning_rates) == (0.1, 0.2)
    assert config.model.trainable == "all"


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load_config(EXPERIMENT, [("optimizer.learnin_rate", "0.5")])
    msg = str(e.value)
    assert "optimizer.learnin_rate" in msg and "learning_rate" in msg and "weight_decay" in msg


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(config_lib.ConfigError, match=r"num_seeds.*int.*'many'"):
        config_lib.load_config(EXPERIMENT, [("num_seeds", "many")])
    with pytest.raises(config_lib.ConfigError, match=r"optimizer.learning_rate.*float"):
        config_lib.load_config(EXPERIMENT, [("optimizer.learning_rate", "fast")])


def test_loaded_config_is_locked_against_typos():
    config = config_lib.load_config(EXPERIMENT)
    with pytest.raises(AttributeError):
        config.num_seed = 3


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    code = cli.main(["train", f"--config={EXPERIMENT}", f"--workdir={tmp_path}", "--config.nope=1"])
    assert code == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does_not_exist.py"):
        config_lib.load_config("experiments/does_not_exist.py")


# ----------------------------------------------------------------------------- workdir and resume


def run_cli(workdir, *overrides, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jax.apps.cli", "train", f"--config={EXPERIMENT}", f"--workdir={workdir}",
         "--config.num_steps=400", "--config.checkpoint_every=100", *overrides],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=ROOT)


def final_bias(workdir):
    config = config_lib.read_resolved_config(workdir)
    target = jax.device_get(snack.init_learners(config))
    return np.asarray(checkpoints.load_state(workdir, target)["params"]["bias"])


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert run_cli(straight).returncode == 0

    # Killed (SIGKILL, no clean-up) after step 250: the checkpoint at 200 survives, 50 steps are lost.
    proc = run_cli(killed, env={"RLHF_JAX_FAULT_AFTER_STEP": "250"})
    assert proc.returncode == -9, proc.stderr
    assert not os.path.exists(os.path.join(killed, "DONE"))
    assert max(r["step"] for r in metrics_lib.read_metrics(killed)) == 250

    proc = run_cli(killed)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "from step 200" in proc.stderr
    np.testing.assert_array_equal(final_bias(killed), final_bias(straight))
    # metrics.jsonl holds each step once, as if never interrupted.
    steps = [r["step"] for r in metrics_lib.read_metrics(killed)]
    assert steps == list(range(10, 401, 10))
    assert metrics_lib.read_metrics(killed) == metrics_lib.read_metrics(straight)


def test_workdir_outputs_and_changed_config_refused(tmp_path):
    workdir = str(tmp_path / "run")
    assert run_cli(workdir).returncode == 0
    assert json.load(open(os.path.join(workdir, "config.json")))["num_steps"] == 400
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert all("step" in r for r in metrics_lib.read_metrics(workdir))
    proc = run_cli(workdir, "--config.optimizer.learning_rate=0.5")
    assert proc.returncode == 2 and "optimizer.learning_rate" in proc.stderr


# ----------------------------------------------------------------------------- devices


def test_eight_devices_equal_one_device(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py asks for 8 fake CPU devices"
    results = {}
    for name, data in (("one", "1"), ("eight", "-1")):
        config = config_lib.load_config(EXPERIMENT, [("mesh.data", data), ("num_seeds", "16"), ("num_steps", "300")])
        learners = snack.train(config, str(tmp_path / name))
        results[name] = learners
        results[name + "_rows"] = metrics_lib.read_metrics(str(tmp_path / name))
    assert len(results["eight"]["params"]["bias"].sharding.device_set) == 8
    assert len(results["one"]["params"]["bias"].sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(results["eight"]["params"]["bias"]),
                               np.asarray(results["one"]["params"]["bias"]), rtol=1e-6, atol=1e-6)
    for a, b in zip(results["one_rows"], results["eight_rows"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_runs_not_divisible_by_devices_is_a_clear_error(tmp_path):
    config = config_lib.load_config(EXPERIMENT, [("num_seeds", "3")])
    with pytest.raises(config_lib.ConfigError, match="3 runs cannot be split over the 8 devices"):
        registry.run_stage(config, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- plots and sweeps


def test_plot_command_draws_mean_and_spread(tmp_path):
    workdirs = []
    for seed in (0, 1):
        config = config_lib.load_config(EXPERIMENT, [("seed", str(seed)), ("num_steps", "100")])
        snack.train(config, str(tmp_path / f"seed{seed}"))
        workdirs.append(str(tmp_path / f"seed{seed}"))
    out = str(tmp_path / "plots" / "bias.png")
    assert cli.main(["plot", *workdirs, "--metric=bias,reward_mean", f"--out={out}"]) == 0
    assert os.path.getsize(out) > 5000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out2 = str(tmp_path / "mean.png")
    assert cli.main(["plot", *workdirs, "--metric=bias", f"--out={out2}", "--group_mean"]) == 0
    assert os.path.getsize(out2) > 5000
    assert cli.main(["plot", *workdirs, "--metric=no_such_metric", f"--out={out2}"]) == 2  # one line, no traceback


def test_sweep_runs_every_override_group(tmp_path, capsys):
    # A plot metric no run logs is a warning on the plot, not an error after every run trained.
    assert cli.main(["sweep", f"--config={EXPERIMENT}", f"--workdir={tmp_path}", "--config.num_steps=50",
                     "--config.checkpoint_every=50", "--config.plot_metrics=('bias', 'no_such_metric')"]) == 0
    assert "plot metric 'no_such_metric' is logged by none of the runs" in capsys.readouterr().err
    runs = sorted(os.listdir(tmp_path))
    assert "learning_rate=0.1,seed=0" in runs and "learning_rate=1.0,seed=1" in runs
    assert os.path.exists(tmp_path / "sweep.png")
    cfg = json.load(open(tmp_path / "learning_rate=0.1,seed=1" / "config.json"))
    assert cfg["optimizer"]["learning_rate"] == 0.1 and cfg["seed"] == 1


def test_checkpoint_of_the_unstacked_layer_layout_is_named(tmp_path):
    """A checkpoint saved before layers were stacked (blocks/0/..., blocks/1/...) is refused with a
    message naming the layout, before Orbax is asked to restore it."""
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    old = {"params": {"blocks": [{"w": np.zeros((3,), np.float32)}, {"w": np.ones((3,), np.float32)}]}}
    checkpoints.save_checkpoint(manager, 1, old)
    new = {"params": {"blocks": {"w": np.zeros((2, 3), np.float32)}}}
    with pytest.raises(config_lib.CheckpointError, match="unstacked layer layout"):
        checkpoints.restore_checkpoint(manager, new)
    manager.close()
