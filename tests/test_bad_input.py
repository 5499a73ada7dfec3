"""Bad input never leaves a run worse than it found it (issue 14): validated configs, verified
checkpoints, safe hand-offs, DONE last, data errors and the labeller as one line, logs flushed."""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from rlhf_jax.apps import cli
from rlhf_jax.people import labelers
from rlhf_jax.runtime import checkpoints, config as config_lib, metrics as metrics_lib, run as run_lib
from rlhf_jax.stages import pretrain, registry, runs, snack

ROOT = os.path.join(os.path.dirname(__file__), "..")
SNACK = os.path.join(ROOT, "experiments", "snack_bandit.py")
PRETRAIN = os.path.join(ROOT, "experiments", "reviews", "pretrain.py")
PIPELINE = os.path.join(ROOT, "experiments", "reviews", "pipeline.py")


def cli_error(capsys, *argv):
    """Run `rlhf-jax argv`; return its stderr, asserting exit status 2 and a one-line message."""
    capsys.readouterr()
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("rlhf-jax: "), err
    return err


def snack_config(**overrides):
    return config_lib.load_config(SNACK, [(k, str(v)) for k, v in overrides.items()])


def micro_model():
    m = models.tiny()
    m.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    return m


# ----------------------------------------------------------------------------- 4. config values


@pytest.mark.parametrize("config,key,value,allowed", [
    (SNACK, "num_steps", "0", ">= 1"),
    (SNACK, "log_every", "0", ">= 1"),
    (SNACK, "checkpoint_every", "155", "multiple of log_every=10"),
    (SNACK, "optimizer.learning_rate", "-1", "(0, inf)"),
    (SNACK, "optimizer.learning_rate", "nan", "(0, inf)"),
    (SNACK, "optimizer.name", "adamx", "'sgd', 'adam', 'adamw'"),
    (SNACK, "num_seeds", "0", ">= 1"),
    (SNACK, "mesh.fsdp", "3", "divisor of the 8 devices"),
    (PRETRAIN, "batch_size", "-4", ">= 1"),
    (PRETRAIN, "batch_size", "12", "multiple of the 8 devices"),
    (PRETRAIN, "eval_every", "-1", ">= 0"),
    (PRETRAIN, "optimizer.schedule", "cosin", "'constant', 'linear', 'cosine'"),
    (PRETRAIN, "optimizer.b2", "1.5", "[0, 1)"),
    (PRETRAIN, "seq_len", "999", "model.max_len"),
    (PRETRAIN, "model.num_heads", "3", "divisor of model.d_model"),
    (PRETRAIN, "data.name", "nope", "'reviews'"),
])
def test_bad_value_is_one_line_and_writes_nothing(tmp_path, capsys, config, key, value, allowed):
    workdir = tmp_path / "run"
    err = cli_error(capsys, "train", f"--config={config}", f"--workdir={workdir}", f"--config.{key}={value}")
    assert f"config.{key}=" in err and value.strip("'") in err and allowed in err
    assert not workdir.exists()  # so the corrected command starts cleanly


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["train", f"--config={SNACK}", f"--workdir={tmp_path}", "--config.num_steps=0", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "checks.py" in err and "config.num_steps=0" in err


def test_sweep_checks_every_run_before_the_first_trains(tmp_path, capsys):
    err = cli_error(capsys, "sweep", f"--config={SNACK}", f"--workdir={tmp_path}", "--config.log_every=0")
    assert "sweep run" in err and "config.log_every=0" in err
    assert not os.listdir(tmp_path)


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path, capsys):
    err = cli_error(capsys, "pipeline", f"--config={PIPELINE}", f"--workdir={tmp_path / 'p'}",
                    "--config.ppo.kl_estimator=k9")
    assert "config.ppo.kl_estimator='k9'" in err and "'k1'" in err
    assert not (tmp_path / "p").exists()


def test_every_stage_kind_has_rules():
    dpo = config_lib.ml_collections.ConfigDict(dict(
        stage="dpo", num_steps=10, batch_size=8, log_every=1, checkpoint_every=5, eval_every=0, beta=0.1,
        loss="sigmoid", label_smoothing=0.0, num_seeds=1, init_from="sft", model=micro_model(),
        seq_len=64, optimizer=config_lib.load_config(SNACK).optimizer.to_dict(),
        preferences=dict(enabled=True)))
    registry.validate(dpo)
    for key, value, allowed in (("beta", 0.0, "(0, inf)"), ("loss", "dpo2", "'sigmoid'"),
                                ("label_smoothing", 0.5, "[0, 0.5)"), ("num_seeds", 0, ">= 1")):
        bad = config_lib.ml_collections.ConfigDict(dpo.to_dict())
        bad[key] = value
        with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}=.*{__import__('re').escape(allowed)}"):
            registry.validate(bad)
    with pytest.raises(config_lib.ConfigError, match=r"config.stage='nope'"):
        registry.validate(config_lib.ml_collections.ConfigDict(dict(stage="nope")))


def test_validation_accepts_exactly_the_choices_the_code_has():
    """The rules read the tables the code dispatches on (one definition each): every choice the
    code has passes validation, and a value it does not have is refused, naming the key."""
    from rlhf_jax import losses
    from rlhf_jax.data import builders
    from rlhf_jax.stages import ppo

    base = config_lib.load_config(os.path.join(ROOT, "experiments", "reviews", "ppo.py"))
    for key, choices in (("loss", ppo.LOSSES), ("value_model", ppo.VALUE_MODELS), ("missing_eos", ppo.MISSING_EOS),
                         ("kl_estimator", losses.KL_KINDS), ("data.name", builders.DATASET_NAMES),
                         ("objective", losses.POLICY_LOSS_KINDS), ("aggregation", losses.POLICY_LOSS_AGGREGATIONS),
                         ("kl_placement", ppo.KL_PLACEMENTS), ("advantage_scaling", ppo.ADVANTAGE_SCALINGS)):
        for value in choices + ("bogus",):
            config = config_lib.ml_collections.ConfigDict(base.to_dict())
            node, leaf = (config.data, "name") if key == "data.name" else (config, key)
            node[leaf] = value
            if key == "data.name" and value in ("text_folder", "jsonl_sft", "preferences_jsonl"):
                config.data.path = "some/file"
            if key == "data.name" and value == "preferences":
                config.data.records_name = "preferences"
            if key == "loss" and value in ("rloo", "grpo"):  # (group baselines need a group)
                config.samples_per_prompt = 2
            if key == "aggregation":  # (Dr. GRPO's normaliser)
                config.max_len = 48
            if key == "advantage_scaling":  # (a scaling of the group baseline)
                config.loss, config.samples_per_prompt = "grpo", 2
            if value == "bogus":
                with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}='bogus'"):
                    registry.validate(config)
            else:
                registry.validate(config)


def test_stages_do_not_check_again():
    """A stage's rules are its check_config, run by registry.validate before config.json is
    written; no stage keeps a second copy (a `_check_config`) that could disagree."""
    for module in set(registry.STAGES.values()):
        source = open(os.path.join(ROOT, *module.split(".")) + ".py").read()
        assert "_check_config" not in source, module


def test_config_json_of_a_run_without_checkpoint_is_replaced(tmp_path):
    """A run that failed before its first checkpoint holds no experiment: the corrected command
    starts it; a run with a checkpoint still refuses a changed config."""
    workdir = str(tmp_path)
    config_lib.write_resolved_config(snack_config(num_steps=100), workdir)
    config_lib.write_resolved_config(snack_config(num_steps=200), workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", "100"))
    with pytest.raises(config_lib.ConfigError, match="different config"):
        config_lib.write_resolved_config(snack_config(num_steps=300), workdir)


def test_a_run_saved_before_the_family_fields_resumes(tmp_path):
    """A run whose config.json predates model.head_dim/qkv_bias/qk_norm/rope_* and
    tokenizer.chat_template (or pad_to_multiple) resumes under the same command; setting one of them is a change."""
    import json

    from configs import stages

    workdir = str(tmp_path)
    config = stages.language_model_stage("sft", num_steps=10)
    old = config_lib.config_to_dict(config)
    for key in registry.ADDED_FIELDS:  # (those of other stages, e.g. PPO's rollout options, are absent)
        *parents, name = key.split(".")
        section = old
        for part in parents:
            section = section[part]
        section.pop(name, None)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(old, f)
    os.makedirs(os.path.join(workdir, "checkpoints", "5"))
    config_lib.write_resolved_config(config, workdir, added_fields=registry.ADDED_FIELDS)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(old, f)
    config.tokenizer.chat_template = True
    with pytest.raises(config_lib.ConfigError, match=r"tokenizer.chat_template"):
        config_lib.write_resolved_config(config, workdir, added_fields=registry.ADDED_FIELDS)


# ----------------------------------------------------------------------------- 1. damaged checkpoints


def damage(path, mode):
    data = bytearray(open(path, "rb").read())
    if mode == "random":
        data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
    elif mode == "truncate":
        data = data[:len(data) // 2]
    if mode == "delete":
        os.remove(path)
    else:
        open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("mode", ["random", "truncate", "delete"])
def test_damaged_checkpoint_stops_a_hand_off_in_one_line(tmp_path, capsys, mode):
    run = str(tmp_path / "sft")
    pretrain.save_random_run(run, micro_model())
    largest = max(glob.glob(os.path.join(run, "handoff", "params", "0", "state", "ocdbt.process_0", "d", "*")),
                  key=os.path.getsize)
    damage(largest, mode)
    with pytest.raises(checkpoints.DamagedCheckpoint, match=os.path.join(run, "handoff", "params", "0")):
        runs.load_policy(run)
    err = cli_error(capsys, "sample", f"--workdir={run}", "--prompt=hi", "--num=1", "--max_new_tokens=2")
    assert "checkpoint error" in err and os.path.join("handoff", "params", "0") in err


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, capsys):
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    registry.run_stage(snack_config(num_steps=300, checkpoint_every=100), straight)
    registry.run_stage(snack_config(num_steps=200, checkpoint_every=100), damaged)
    for f in glob.glob(os.path.join(damaged, "checkpoints", "200", "state", "d", "*")):
        damage(f, "truncate")
    capsys.readouterr()
    registry.run_stage(snack_config(num_steps=300, checkpoint_every=100), damaged, allow_config_change=True)
    err = capsys.readouterr().err
    assert "checkpoints/200: cannot be read" in err and "from step 100" in err
    assert os.listdir(os.path.join(damaged, "damaged_checkpoints"))
    target = jax.device_get(snack.init_learners(snack_config()))
    np.testing.assert_array_equal(checkpoints.load_state(damaged, target)["params"]["bias"],
                                  checkpoints.load_state(straight, target)["params"]["bias"])


def test_checksum_mismatch_is_caught(tmp_path):
    """What Orbax cannot see (bytes changed inside a valid file) shows as a checksum mismatch."""
    run = str(tmp_path / "sft")
    pretrain.save_random_run(run, micro_model())
    manifest_path = os.path.join(run, "handoff", "params", "0", checkpoints.MANIFEST)
    manifest = json.load(open(manifest_path))
    name = sorted(manifest["arrays"])[0]
    manifest["arrays"][name]["crc32"] ^= 1
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(checkpoints.DamagedCheckpoint, match="does not match its checksum"):
        runs.load_policy(run)


# ----------------------------------------------------------------------------- 2. divergence


def test_non_finite_state_never_replaces_a_finite_checkpoint(tmp_path):
    def step_fn(state, batch, rng):
        w = state["w"] + 1.0
        return {"w": jnp.where(w >= 4, jnp.nan, w)}, {"w": w.mean()}

    with pytest.raises(checkpoints.Diverged, match=r"step 4: .*NaN or inf.*\['w'\].*step 3 stays the latest"):
        run_lib.train_loop(workdir=str(tmp_path), state={"w": jnp.zeros(3)}, step_fn=step_fn, batch_fn=None,
                           num_steps=10, rng=jax.random.key(0), log_every=1, checkpoint_every=1)
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    assert manager.all_steps() == [2, 3]
    step, state = checkpoints.restore_checkpoint(manager, {"w": jnp.zeros(3)})
    manager.close()
    assert step == 3 and np.isfinite(state["w"]).all()


# ----------------------------------------------------------------------------- 3. changed config


def test_changed_config_that_does_not_fit_the_checkpoint_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", f"--config={SNACK}", f"--workdir={workdir}", "--config.num_steps=100"]
    assert cli.main(args) == 0
    saved = (workdir / "config.json").read_text()
    err = cli_error(capsys, *args, "--config.num_seeds=32", "--allow_config_change")
    assert "checkpoints/100" in err and "another config" in err
    assert (workdir / "config.json").read_text() == saved
    assert cli.main(args + ["--config.num_steps=200", "--allow_config_change"]) == 0  # still resumable


# ----------------------------------------------------------------------------- 5. DONE last


def test_done_is_written_after_the_stage_returns(tmp_path, monkeypatch):
    """A stage killed after its loop but before its last hand-off file is not finished."""
    real = snack.train

    def dies_after_the_loop(config, workdir):
        real(config, workdir)
        raise KeyboardInterrupt  # e.g. reward: killed while writing reward_normalization.json

    monkeypatch.setattr(snack, "train", dies_after_the_loop)
    with pytest.raises(KeyboardInterrupt):
        registry.run_stage(snack_config(num_steps=100), str(tmp_path))
    assert not checkpoints.is_finished(str(tmp_path))
    monkeypatch.setattr(snack, "train", real)
    registry.run_stage(snack_config(num_steps=100), str(tmp_path))
    assert checkpoints.is_finished(str(tmp_path)) and not os.path.exists(tmp_path / "DONE.tmp")


# ----------------------------------------------------------------------------- 6. data errors


def pretrain_with_data(tmp_path, capsys, name, path, **more):
    return cli_error(capsys, "train", f"--config={PRETRAIN}", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.name={name}", f"--config.data.path={path}", f"--config.data_dir={tmp_path / 'd'}",
                     "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
                     "--config.batch_size=8", "--config.seq_len=64", *[f"--config.{k}={v}" for k, v in more.items()])


def test_data_errors_are_one_line_with_file_and_line(tmp_path, capsys):
    bad_json = tmp_path / "sft.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n' * 3 + '{"prompt": "a", "resp\n')
    err = pretrain_with_data(tmp_path, capsys, "jsonl_sft", bad_json)
    assert "data error" in err and f"{bad_json} line 4: not valid JSON" in err

    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    err = pretrain_with_data(tmp_path, capsys, "jsonl_sft", bad_bytes)
    assert f"{bad_bytes} line 2: not valid UTF-8" in err

    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"A short document number {i}.\n" * 40)
    (folder / "5.txt").write_bytes(b"fine\n\xc3\x28 broken\n")
    err = pretrain_with_data(tmp_path, capsys, "text_folder", folder)
    assert f"{folder / '5.txt'} line 2: not valid UTF-8" in err
    os.remove(folder / "5.txt")
    err = pretrain_with_data(tmp_path, capsys, "text_folder", folder, **{"data.validation_fraction": "0.01"})
    assert "has no 'validation' split" in err and "validation_path" in err
    assert not (tmp_path / "run").exists()  # a new workdir the failed command made is gone again


def test_a_command_failing_on_its_inputs_gives_a_finished_run_its_config_back(tmp_path, capsys):
    folder, empty = tmp_path / "texts", tmp_path / "empty"
    folder.mkdir(), empty.mkdir()
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"A short document number {i}.\n" * 40)
    args = ("train", f"--config={PRETRAIN}", f"--workdir={tmp_path / 'run'}", "--config.data.name=text_folder",
            f"--config.data_dir={tmp_path / 'd'}", "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.num_kv_heads=2", "--config.batch_size=8", "--config.seq_len=64", "--config.num_steps=4",
            "--config.log_every=2", "--config.checkpoint_every=4", "--config.eval_every=0",
            "--config.data.validation_fraction=0.3")
    assert cli.main([*args, f"--config.data.path={folder}"]) == 0
    saved = (tmp_path / "run" / "config.json").read_bytes()
    err = cli_error(capsys, *args, f"--config.data.path={empty}", f"--config.data_dir={tmp_path / 'd2'}",
                    "--allow_config_change")
    assert str(empty) in err
    assert (tmp_path / "run" / "config.json").read_bytes() == saved
    assert checkpoints.is_finished(str(tmp_path / "run"))


def test_an_unfinished_run_is_init_from_only_when_the_config_says_so(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"A short document number {i}.\n" * 40)
    common = ("train", f"--config={PRETRAIN}", "--config.data.name=text_folder", f"--config.data.path={folder}",
              f"--config.data_dir={tmp_path / 'd'}", "--config.model.d_model=32", "--config.model.num_heads=2",
              "--config.model.num_kv_heads=2", "--config.batch_size=8", "--config.seq_len=64", "--config.log_every=2",
              "--config.checkpoint_every=2", "--config.eval_every=0", "--config.data.validation_fraction=0.3")
    source = tmp_path / "pretrain"
    assert cli.main([*common, f"--workdir={source}", "--config.num_steps=4"]) == 0
    model, _, handed_off = runs.load_policy(str(source))
    # What a run killed after its checkpoint of step 4 of 400 leaves: no hand-off, no DONE.
    shutil.rmtree(source / runs.HANDOFF_DIR), os.remove(source / "DONE")
    saved = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**saved, "num_steps": 400}))

    consumer = ("--config.num_steps=2", f"--config.init_from={source}")
    err = cli_error(capsys, *common, f"--workdir={tmp_path / 'next'}", *consumer)
    assert "has not finished (its last checkpoint is step 4 of num_steps=400" in err
    assert "init_from_unfinished=True" in err and not (tmp_path / "next").exists()
    err = cli_error(capsys, *common, f"--workdir={tmp_path / 'next'}", *consumer,
                    "--config.init_from_unfinished=True", "--config.lora.rank=4")
    assert "init_from_unfinished" in err and "LoRA" in err

    # With the flag: the last checkpoint's params, said on stderr (the hand-off held the same step).
    _, _, params = runs.load_matching_policy(str(source), model, "pretrain", unfinished_ok=True)
    assert "starting from its checkpoint of step 4 of 400" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(handed_off), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main([*common, f"--workdir={tmp_path / 'next'}", *consumer, "--config.init_from_unfinished=True"]) == 0
    assert checkpoints.is_finished(str(tmp_path / "next")) and not checkpoints.is_finished(str(source))


# ----------------------------------------------------------------------------- 7. the terminal labeller


def test_labeller_escapes_control_characters(tmp_path):
    labelers.write_pairs(str(tmp_path), [{"prompt": "p\x1b]0;owned\x07", "response_a": "a\x1b[2J",
                                          "response_b": "b\r\x9b"}])
    printed = []
    labelers.label_in_terminal(str(tmp_path), input_fn=lambda _: "1", print_fn=lambda *a: printed.append(" ".join(map(str, a))))
    text = "\n".join(printed)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text and "\x9b" not in text
    assert "a\\x1b[2J" in text and "p\\x1b]0;owned\\x07" in text


def test_labeller_refuses_a_torn_pairs_file_and_a_missing_folder(tmp_path, capsys):
    labelers.write_pairs(str(tmp_path), [{"prompt": "p", "response_a": "a", "response_b": "b"}] * 2)
    with open(tmp_path / labelers.PAIRS_FILE, "a") as f:
        f.write('{"id": "9", "prompt": "cut sh')
    err = cli_error(capsys, "label", f"--data={tmp_path}")
    assert "pairs.jsonl line 3 is cut short" in err
    err = cli_error(capsys, "label", f"--data={tmp_path / 'missing'}")
    assert "pairs.jsonl does not exist" in err


def test_a_torn_last_row_is_skipped_in_a_log_and_refused_in_a_file_written_whole(tmp_path, capsys):
    from rlhf_jax.runtime.jsonl import read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b')
    assert read_jsonl(str(path), appended=True) == [{"a": 1}, {"a": 2}]
    assert "log.jsonl line 3 is cut short" in capsys.readouterr().err
    with pytest.raises(config_lib.DataError, match="log.jsonl line 3 is cut short"):
        read_jsonl(str(path))
    path.write_text('{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')  # torn in the middle: never a kill's doing
    with pytest.raises(config_lib.DataError, match="log.jsonl line 2: not valid JSON"):
        read_jsonl(str(path), appended=True)


# ----------------------------------------------------------------------------- 8. wrong-stage hand-offs


def test_wrong_stage_hand_offs_are_one_line(tmp_path, capsys):
    sft = str(tmp_path / "sft")
    pretrain.save_random_run(sft, micro_model())
    err = cli_error(capsys, "score", f"--workdir={sft}", "--prompt=a", "--response=b")
    assert "'sft' run" in err and "'reward' run" in err
    reward_run = tmp_path / "reward"
    reward_run.mkdir()
    (reward_run / "config.json").write_text(json.dumps({"stage": "reward"}))
    err = cli_error(capsys, "sample", f"--workdir={reward_run}", "--prompt=a")
    assert "'reward' run" in err and "pretrain / sft / ppo / dpo" in err
    for flag in ("--num=0", "--temperature=-1", "--max_new_tokens=0"):
        err = cli_error(capsys, "sample", f"--workdir={sft}", "--prompt=a", flag)
        assert flag in err and "expected" in err
    err = cli_error(capsys, "sample", f"--workdir={tmp_path / 'nothing'}", "--prompt=a")
    assert "no config.json" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "sft" / "config.json").read_text())
    err = cli_error(capsys, "sample", f"--workdir={empty}", "--prompt=a")
    assert "has not finished (it has no checkpoint" in err


# ----------------------------------------------------------------------------- 9. logs on disk


def tensorboard_steps(workdir):
    """Steps of the scalar 'bias' in a run's TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == "bias"]
    return steps


def snack_process(workdir, *overrides, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.apps.cli", "train", f"--config={SNACK}", f"--workdir={workdir}", *overrides],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_tensorboard_is_flushed_at_checkpoints_and_on_sigterm(tmp_path):
    killed = str(tmp_path / "killed")
    proc = snack_process(killed, "--config.num_steps=400", "--config.checkpoint_every=100",
                         env={"RLHF_JAX_FAULT_AFTER_STEP": "250"})
    assert proc.wait() == -9
    assert max(tensorboard_steps(killed)) >= 200  # kill -9: everything up to the last checkpoint

    termed = str(tmp_path / "termed")
    proc = snack_process(termed, "--config.num_steps=100000000", "--config.checkpoint_every=100000000")
    deadline = time.time() + 60
    while time.time() < deadline and len(metrics_lib.read_metrics(termed)) < 20:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == -signal.SIGTERM
    logged = [r["step"] for r in metrics_lib.read_metrics(termed)]
    assert tensorboard_steps(termed)[-1] == logged[-1]


# ----------------------------------------------------------------------------- sampling past the model's window


def test_sampling_past_the_models_window_is_refused_naming_both_numbers(tmp_path):
    """A config whose prompt + new tokens exceed model.max_len, and `sample` asking for more new
    tokens than the window holds, are refused; a prompt cut to the window is said to be cut."""
    from rlhf_jax.models import sampling
    from rlhf_jax.models.tokenizer import make_tokenizer

    config = config_lib.load_config(os.path.join(ROOT, "experiments", "reviews", "ppo.py"))
    config.init_from = str(tmp_path)
    config.max_prompt_len, config.max_new_tokens = config.model.max_len - 10, 11
    with pytest.raises(config_lib.ConfigError, match=rf"config\.max_new_tokens=11: max_prompt_len "
                                                       rf"{config.model.max_len - 10} \+ max_new_tokens 11 = "
                                                       rf"{config.model.max_len + 1} tokens exceed .*model\.max_len="):
        registry.validate(config)
    config.max_new_tokens = 10
    registry.validate(config)

    model = micro_model()
    pretrain.save_random_run(str(tmp_path / "run"), model)
    with pytest.raises(config_lib.ConfigError, match=rf"max_new_tokens={model.max_len}: the model's window"):
        runs.sample_from_run(str(tmp_path / "run"), "hi", 1, max_new_tokens=model.max_len)
    _, graphdef, params = runs.load_policy(str(tmp_path / "run"))
    tokenizer = make_tokenizer(None)
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than 8 tokens; the model sees their last 8"):
        sampling.generate_texts(graphdef, params, tokenizer, ["short", "a prompt well over eight bytes"],
                                max_new_tokens=2, rng=jax.random.key(0), max_prompt_len=8)


# ----------------------------------------------------------------------------- one run per workdir


def test_a_workdir_in_use_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    workdir = str(tmp_path / "run")
    with checkpoints.workdir_lock(workdir):
        with pytest.raises(checkpoints.WorkdirInUse, match=rf"{workdir} is in use by process {os.getpid()}"):
            registry.run_stage(snack_config(num_steps=20), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # the refused run wrote nothing
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from rlhf_jax.runtime import checkpoints as c\n"
                               "with c.workdir_lock(sys.argv[2]):\n print('held', flush=True); time.sleep(60)",
                               ROOT, workdir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(checkpoints.WorkdirInUse, match=rf"process {holder.pid}"):
            registry.run_stage(snack_config(num_steps=20), workdir)
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    registry.run_stage(snack_config(num_steps=20), workdir)
    assert checkpoints.is_finished(workdir)


def test_export_never_writes_into_a_run_a_file_or_a_full_folder(tmp_path, capsys):
    run = str(tmp_path / "run")
    pretrain.save_random_run(run, micro_model())
    config_before = open(os.path.join(run, "config.json")).read()
    assert "is inside the run" in cli_error(capsys, "export", f"--workdir={run}", f"--out={run}")
    assert "is inside the run" in cli_error(capsys, "export", f"--workdir={run}", f"--out={run}/hf")
    (tmp_path / "file").write_text("x")
    assert "is a file; expected a folder" in cli_error(capsys, "export", f"--workdir={run}", f"--out={tmp_path}/file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "exists and is not empty; pass --overwrite" in cli_error(
        capsys, "export", f"--workdir={run}", f"--out={tmp_path}/full")
    other = str(tmp_path / "other")
    pretrain.save_random_run(other, micro_model())
    assert "holds an rlhf_jax run" in cli_error(capsys, "export", f"--workdir={run}", f"--out={other}", "--overwrite")
    assert open(os.path.join(run, "config.json")).read() == config_before
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert cli.main(["export", f"--workdir={run}", f"--out={tmp_path}/full", "--overwrite"]) == 0
    assert (tmp_path / "full" / "model.safetensors").exists()


def test_a_hand_off_without_its_manifest_is_never_used(tmp_path, capsys):
    run = str(tmp_path / "run")
    pretrain.save_random_run(run, micro_model())
    manifests = glob.glob(os.path.join(run, "handoff", "params", "*", "manifest.json"))
    assert len(manifests) == 1
    os.remove(manifests[0])
    err = cli_error(capsys, "sample", f"--workdir={run}", "--prompt=a", "--max_new_tokens=2")
    assert "manifest.json is missing, so the arrays cannot be verified" in err


def test_preference_data_with_nothing_to_learn_or_a_nan_margin_is_refused_naming_the_record(tmp_path):
    from rlhf_jax.data import builders

    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(config_lib.DataError, match=r"records\[1\]: key 'margin' must be a finite number, got nan"):
        builders.write_preferences([pair, {**pair, "margin": float("nan")}], str(tmp_path), "nan_margin")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    with pytest.raises(config_lib.DataError, match=rf"{path} line 1: key 'margin' must be a finite number"):
        builders.PreferencesBuilder(path=str(path), data_dir=str(tmp_path / "d"),
                                    file_format="array_record").download_and_prepare()
    same = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(20)]
    with pytest.raises(config_lib.DataError, match=r"in every one of the \d+ pairs chosen == rejected"):
        builders.write_preferences(same, str(tmp_path), "identical")
    differ = [{**pair, "prompt": f"q{i}"} for i in range(20)]
    builders.write_preferences(same + differ, str(tmp_path), "some_differ")  # some pairs differ: fine
