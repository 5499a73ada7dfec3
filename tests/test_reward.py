"""Reward model: reward at the last real token, head surgery, 8 devices = 1 device, learning a
marker word, normalisation, and the `rlhf-jax score` command."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import datasets, models
from configs.reward import reward_stage
from configs.stages import language_model_stage
from rlhf_jax.apps import cli
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import model as model_lib, sampling
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import checkpoints, config as config_lib, mesh as mesh_lib, metrics as metrics_lib
from rlhf_jax.runtime.optim import make_optimizer
from rlhf_jax.stages import registry, reward, runs


def micro_model():
    config = models.tiny()
    config.update(dict(max_len=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64))
    return config


def fake_sft_run(workdir, data_dir, seed=0):
    """A finished SFT-like run: config.json + the hand-off of random params (no training)."""
    config = language_model_stage("sft", num_steps=1, batch_size=8, seq_len=64)
    config.model = micro_model()
    config.data = datasets.reviews_sft(num_train=64, num_validation=32)
    config.data_dir = str(data_dir)
    config_lib.write_resolved_config(config, str(workdir))
    _, params = model_lib.init_params(config.model, "lm", seed)
    runs.write_policy(str(workdir), config, params)
    checkpoints.mark_finished(str(workdir), "fake SFT run")
    return config


def tiny_reward_config(sft_dir, data_dir, num_steps=20, **fields):
    c = reward_stage(num_steps=num_steps, batch_size=8, seq_len=64, learning_rate=3e-3)
    c.model = micro_model()
    c.init_from = str(sft_dir)
    c.data_dir = str(data_dir)
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.preferences.prompts = datasets.reviews_sft(num_train=64, num_validation=32)
    c.preferences.num_prompts = 8
    c.preferences.num_validation_prompts = 4
    c.preferences.samples_per_prompt = 4
    c.preferences.batch_size = 8
    c.preferences.max_prompt_len = 16
    c.preferences.max_new_tokens = 12
    c.normalize.num_prompts = 8
    c.normalize.batch_size = 8
    c.normalize.max_prompt_len = 16
    c.normalize.max_new_tokens = 12
    c.update(fields)
    return c


# ----------------------------------------------------------------------------- the reward


def test_replace_head_with_scalar_shapes():
    config = micro_model()
    graphdef, params = model_lib.init_params(config, "lm")
    rgraphdef, rparams = model_lib.replace_head_with_scalar(graphdef, params, config)
    tokens = jnp.ones((3, 7), jnp.int32)
    outputs, _ = model_lib.apply(rgraphdef, rparams, tokens, model_lib.positions_from_mask(tokens), tokens)
    assert set(outputs) == {"scalar"} and outputs["scalar"].shape == (3, 7)
    assert model_lib.reward_scores(rgraphdef, rparams, tokens, tokens).shape == (3,)


def test_reward_is_read_at_the_last_real_token():
    config = micro_model()
    graphdef, params = model_lib.replace_head_with_scalar(*model_lib.init_params(config, "lm"), config)
    score = jax.jit(model_lib.reward_scores, static_argnums=0)
    rng = np.random.RandomState(0)
    real = rng.randint(0, 256, size=(2, 9)).astype(np.int32)
    tokens = np.full((2, 16), 256, np.int32)
    mask = np.zeros((2, 16), np.int32)
    tokens[:, :9], mask[:, :9] = real, 1
    base = np.asarray(score(graphdef, params, tokens, mask))

    # Whatever sits in the padding after the last real token does not matter...
    noisy = tokens.copy()
    noisy[:, 9:] = rng.randint(0, 256, size=(2, 7))
    np.testing.assert_allclose(score(graphdef, params, noisy, mask), base, rtol=1e-6, atol=1e-6)
    # ... nor does padding on the left (positions come from the mask) ...
    left_tokens = np.concatenate([np.full((2, 5), 256, np.int32), tokens[:, :11]], axis=1)
    left_mask = np.concatenate([np.zeros((2, 5), np.int32), mask[:, :11]], axis=1)
    np.testing.assert_allclose(score(graphdef, params, left_tokens, left_mask), base, rtol=1e-5, atol=1e-5)
    # ... and the index is mask.sum(-1) - 1 for right padding.
    outputs, _ = model_lib.apply(graphdef, params, tokens, model_lib.positions_from_mask(mask), mask)
    np.testing.assert_allclose(base, np.asarray(outputs["scalar"])[:, 8], rtol=1e-6)
    # Changing the last real token changes the score.
    changed = tokens.copy()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    assert np.all(np.abs(np.asarray(score(graphdef, params, changed, mask)) - base) > 1e-6)


def test_rank_correlation_matches_definition():
    x = np.array([1.0, 2.0, 2.0, 5.0, 3.0])
    y = np.array([10.0, 20.0, 30.0, 40.0, 0.0])
    # Average ranks with ties: x -> [0, 1.5, 1.5, 4, 3]; Pearson of the ranks.
    rx, ry = np.array([0, 1.5, 1.5, 4, 3]), np.array([1, 2, 3, 4, 0.0])
    expected = np.corrcoef(rx, ry)[0, 1]
    assert reward.rank_correlation(x, y) == pytest.approx(expected)
    assert reward.rank_correlation(x, x ** 3) == pytest.approx(1.0)
    assert reward.rank_correlation(x, -x) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- training


def marker_records(n, seed):
    """Pairs whose chosen response contains the word 'great' and whose rejected one does not."""
    rng = np.random.RandomState(seed)
    words = ["the", "room", "food", "was", "and", "it", "staff", "we", "film", "plot", "our", "a"]
    records = []
    for i in range(n):
        body = " ".join(rng.choice(words, size=4))
        other = " ".join(rng.choice(words, size=4))
        records.append({"prompt": f"Review {i}:", "chosen": f" {body} great {other}",
                        "rejected": f" {body} {rng.choice(words)} {other}"})
    return records


def test_eight_devices_equal_one_device():
    assert jax.device_count() == 8
    config = micro_model()
    tokenizer = ByteTokenizer()
    batch = loaders.preference_batches(marker_records(16, 0), tokenizer, 48, 16, 0)[0]
    graphdef, params0 = model_lib.replace_head_with_scalar(*model_lib.init_params(config, "lm"), config)
    optimizer = make_optimizer(reward_stage(num_steps=10).optimizer)
    loss_config = ml_collections.ConfigDict(dict(use_margin=True, center_coef=0.01))
    batch["margin"] = np.linspace(0, 1, 16).astype(np.float32)
    results = {}
    for name, data in (("one", 1), ("eight", -1)):
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=1)))
        params = jax.tree.map(jnp.copy, params0)
        state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
        step = reward.make_bradley_terry_step(graphdef, optimizer, mesh, shardings, loss_config)
        for i in range(3):
            state, metrics = step(state, mesh_lib.shard_batch(batch, mesh), jax.random.key(i))
        results[name] = (jax.device_get(state["params"]), jax.device_get(metrics))
    assert set(results["one"][1]) >= {"loss", "accuracy", "margin_mean", "reward_mean", "reward_std"}
    # atol 1e-5: Adam divides by sqrt(v), so an element whose gradient is ~0 moves by an amount
    # that depends on the summation order of the 8-way reduction (seen: 1.2e-6 on one of 2048).
    for a, b in zip(jax.tree.leaves(results["one"][0]), jax.tree.leaves(results["eight"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for k in results["one"][1]:
        assert results["one"][1][k] == pytest.approx(results["eight"][1][k], rel=1e-4, abs=1e-6), k


def test_learns_a_marker_word_normalises_and_scores(tmp_path, capsys):
    data_dir, sft_dir, workdir = tmp_path / "data", tmp_path / "sft", str(tmp_path / "reward")
    fake_sft_run(sft_dir, data_dir)
    builders.write_preferences({"train": marker_records(256, 1), "validation": marker_records(64, 2)},
                               str(data_dir), "marker")
    config = tiny_reward_config(sft_dir, data_dir, num_steps=40)
    config.preferences.enabled = False
    config.data = datasets.preferences("marker")
    config.eval_gold = "test_reward:marker_gold"
    config.lock()
    registry.run_stage(config, workdir)

    rows = metrics_lib.read_metrics(workdir)
    last = rows[-1]
    assert last["step"] == 40 and last["eval/accuracy"] > 0.9, last
    assert last["eval/spearman"] > 0.5, last
    assert {"loss", "accuracy", "margin_mean", "reward_mean", "reward_std"} <= set(last)

    # Normalisation: the policy samples it was fit on score mean 0 / std 1 through the public API.
    samples = [json.loads(line) for line in open(os.path.join(workdir, reward.NORMALIZATION_SAMPLES_FILE))]
    assert len(samples) == 16
    _, graphdef, params, normalization = runs.load_reward_model(workdir)
    assert set(normalization) == {"mean", "std"} and normalization["std"] > 0
    tokens, mask = sampling.encode_prompt_responses(ByteTokenizer(), [s["prompt"] for s in samples],
                                       [s["response"] for s in samples], config.seq_len)
    raw = np.asarray(jax.jit(model_lib.reward_scores, static_argnums=0)(graphdef, params, tokens, mask))
    scores = reward.normalize(raw.astype(np.float64), normalization)
    assert scores.mean() == pytest.approx(0.0, abs=1e-4) and scores.std() == pytest.approx(1.0, abs=1e-4)
    assert runs.score_from_run(workdir, samples[0]["prompt"], samples[0]["response"]) == pytest.approx(
        scores[0], abs=1e-4)

    # `rlhf-jax score` prints the normalised reward; the marker word raises it.
    capsys.readouterr()
    printed = []
    for response in (" the room was great", " the room was fine"):
        assert cli.main(["score", f"--workdir={workdir}", "--prompt=Review 1:", f"--response={response}"]) == 0
        printed.append(float(capsys.readouterr().out.strip()))
    assert printed[0] > printed[1]


def marker_gold(prompt, response):
    return float("great" in response)


def test_model_config_must_match_the_sft_run(tmp_path):
    data_dir, sft_dir = tmp_path / "data", tmp_path / "sft"
    fake_sft_run(sft_dir, data_dir)
    config = tiny_reward_config(sft_dir, data_dir)
    config.model.d_model = 64
    with pytest.raises(config_lib.ConfigError, match="config.model differs"):
        reward.init_reward_params(config)


def test_lora_reward_model_learns_and_loads_merged(tmp_path):
    """LoRA rank 8 + the scalar head: the run holds adapters and head only, still learns the
    marker, and runs.load_reward_model gives full params whose scores match the eval's."""
    from configs import lora as lora_configs

    data_dir, sft_dir, workdir = tmp_path / "data", tmp_path / "sft", str(tmp_path / "reward")
    fake_sft_run(sft_dir, data_dir)
    builders.write_preferences({"train": marker_records(256, 1), "validation": marker_records(64, 2)},
                               str(data_dir), "marker")
    config = tiny_reward_config(sft_dir, data_dir, num_steps=40, lora=lora_configs.rank(8))
    config.preferences.enabled = False
    config.normalize.enabled = False
    config.data = datasets.preferences("marker")
    config.eval_gold = "test_reward:marker_gold"
    config.optimizer.learning_rate = 1e-2
    config.lock()
    registry.run_stage(config, workdir)
    assert metrics_lib.read_metrics(workdir)[-1]["eval/accuracy"] > 0.9
    _, state = registry.load_run(workdir)
    assert set(state["params"]) == {"lora", "scalar_head"}
    _, graphdef, params, _ = runs.load_reward_model(workdir)
    tokens, mask = sampling.encode_prompt_responses(ByteTokenizer(), ["Review 1:"] * 2,
                                                    [" the room was great", " the room was fine"], config.seq_len)
    raw = np.asarray(jax.jit(model_lib.reward_scores, static_argnums=0)(graphdef, params, tokens, mask))
    assert raw[0] > raw[1]
