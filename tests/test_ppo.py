"""PPO stage: parallel == single device, log-prob recomputation, NaN safety, KL at the start,
final scores, the checkpoint target, learning on a toy reward (ppo, rloo, grpo), resume ==
uninterrupted, and seeds in one program == separate runs. Tiny models only."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs, optimizers, ppo as ppo_configs
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.runtime import checkpoints, config as config_lib, mesh as mesh_lib, metrics as metrics_lib
from rlhf_jax.stages import ppo, pretrain, runs

PROMPTS = ("The hotel", "I loved", "A film", "My phone", "The cafe was", "Our room", "Service", "Food")


def byte_fraction(prompt: str, response: str) -> float:
    """Toy reward: fraction of the response's characters that are lowercase letters (a random
    byte-level model starts near 26 / 264)."""
    del prompt
    return sum("a" <= ch <= "z" for ch in response) / max(len(response), 1)


def tiny_model():
    c = model_configs.tiny()
    c.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    return c


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(str(tmp_path_factory.mktemp("sft")))


def make_sft_run(workdir):
    """A fake finished SFT run: a random tiny model saved the way pretrain.train saves it."""
    pretrain.save_random_run(workdir, tiny_model())
    return workdir


def make_config(sft_run, **overrides):
    c = ppo_configs.trl(num_steps=30)
    c.model = tiny_model()
    c.init_from = sft_run
    c.reward_function = "test_ppo:byte_fraction"
    c.prompts = PROMPTS * 2
    c.batch_size = 16
    c.kl_coef = 0.01
    c.max_prompt_len = 16
    c.max_new_tokens = 8
    c.temperature = 1.0
    c.missing_eos = "keep"
    c.num_minibatches = 2
    c.ppo_epochs = 2
    c.optimizer = optimizers.adam(3e-3, eps=1e-5, grad_clip_norm=1.0)
    c.log_every = 1
    c.checkpoint_every = 100
    c.sample_every = 0
    c.progress_every_s = 1e9
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def setup(config, data_axis):
    """ppo.build on a mesh with `data_axis` devices, and the placed prompts of its first batch."""
    config.mesh.data = data_axis
    built = ppo.build(config)
    return built, built.batch_fn(0)["prompts"]


def zero_scores(samples):
    """Final scores of 0 for every response (the test reward function is never called here)."""
    return jnp.zeros(samples.has_eos.shape, jnp.float32)


def test_update_on_8_devices_equals_single_device(sft_run):
    config = make_config(sft_run)
    one, prompts = setup(make_config(sft_run), 1)
    samples = jax.device_get(one.rollout(one.state, one.frozen, prompts, jax.random.key(1)))
    scores = np.linspace(-1, 1, len(samples.has_eos)).astype(np.float32)
    many, _ = setup(config, -1)
    assert many.mesh.devices.size == 8
    results = []
    for s in (one, many):
        batch, batch_scores = mesh_lib.shard_batch((samples, scores), s.mesh)
        state, metrics = s.update(s.state, batch, batch_scores, jax.random.key(2), s.frozen["ref"])
        results.append(jax.device_get((state, metrics)))
    (s1, m1), (s8, m8) = results
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(m1["loss/value_avg"]) > 0.0  # a real update, not a vacuous comparison


def test_rollout_recomputes_sampler_logprobs_and_kl_starts_at_zero(sft_run):
    # PPO with a value head on the policy: the rollout runs the policy forward anyway (values),
    # and its log-probs are the old ones.
    s, prompts = setup(make_config(sft_run, temperature=0.7), 1)
    samples = jax.device_get(s.rollout(s.state, s.frozen, prompts, jax.random.key(3)))
    mask = samples.response_mask.astype(bool)
    assert mask.sum() > 0
    np.testing.assert_allclose(samples.logprobs[mask], samples.sampler_logprobs[mask], atol=2e-5)
    # Policy == reference at the first iteration: the KL is exactly 0, not merely small.
    np.testing.assert_array_equal(samples.logprobs, samples.ref_logprobs)
    batch, scores = mesh_lib.shard_batch((samples, zero_scores(samples)), s.mesh)
    _, metrics = s.update(s.state, batch, scores, jax.random.key(4), s.frozen["ref"])
    assert float(metrics["objective/kl"]) == 0.0


def test_without_a_value_head_the_sampler_logprobs_are_the_old_ones_and_are_checked(sft_run):
    """GRPO: no policy forward in the rollout; the check program's recompute agrees to 2e-5."""
    s, prompts = setup(make_config(sft_run, loss="grpo", samples_per_prompt=2, temperature=0.7), 1)
    samples = jax.device_get(s.rollout(s.state, s.frozen, prompts, jax.random.key(3)))
    mask = samples.response_mask.astype(bool)
    np.testing.assert_array_equal(samples.logprobs, samples.sampler_logprobs)
    np.testing.assert_array_equal(samples.tis_weights, np.ones_like(samples.tis_weights))
    recomputed = np.asarray(s.recompute_logprobs(s.state, s.frozen, samples))
    np.testing.assert_allclose(recomputed[mask], samples.sampler_logprobs[mask], atol=2e-5)
    assert np.all(recomputed[~mask] == 0)
    m = ppo.logprob_check_metrics(samples, recomputed)
    assert 0 < m["rollout/logprob_diff_max"] < 2e-5 and m["rollout/logprob_diff_mean"] <= m["rollout/logprob_diff_max"]


def test_a_bfloat16_sampler_is_seen_by_the_check_and_tis_reweights_it(sft_run):
    float32 = make_config(sft_run, loss="grpo", samples_per_prompt=2, temperature=0.7)
    bf16 = make_config(sft_run, loss="grpo", samples_per_prompt=2, temperature=0.7, rollout_dtype="bfloat16",
                       rollout_correction="tis", rollout_correction_cap=2.0)
    s, prompts = setup(bf16, 1)
    samples = jax.device_get(s.rollout(s.state, s.frozen, prompts, jax.random.key(3)))
    mask = samples.response_mask.astype(bool)
    recomputed = np.asarray(s.recompute_logprobs(s.state, s.frozen, samples))
    assert ppo.logprob_check_metrics(samples, recomputed)["rollout/logprob_diff_max"] > 1e-3  # bf16 is seen
    # With TIS the old log-probs are the float32 forward's; each weight is min(exp(old - sampler), cap).
    np.testing.assert_allclose(samples.logprobs[mask], recomputed[mask], atol=2e-5)
    expected = np.minimum(np.exp(samples.logprobs.astype(np.float64) - samples.sampler_logprobs), 2.0)
    np.testing.assert_allclose(samples.tis_weights[mask], expected[mask], rtol=1e-5)
    assert np.all(samples.tis_weights[~mask] == 0) and np.abs(samples.tis_weights[mask] - 1).max() > 1e-3

    # Where sampler and trainer agree (a float32 sampler: weights 1) the TIS update is exactly the
    # update without a correction.
    plain, _ = setup(float32, 1)
    a = jax.device_get(plain.rollout(plain.state, plain.frozen, prompts, jax.random.key(5)))
    b = a.replace(tis_weights=np.where(a.response_mask > 0, 1.0, 0.0).astype(np.float32))
    scores = np.linspace(-1, 1, len(a.has_eos)).astype(np.float32)
    out = [jax.device_get(x.update(x.state, *mesh_lib.shard_batch((samples_, scores), x.mesh), jax.random.key(2),
                                   x.frozen["ref"]))
           for x, samples_ in ((plain, a), (s, b))]
    for u, v in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_array_equal(u, v)
    assert float(out[1][1]["rollout/tis_weight_mean"]) == 1.0


def test_logprob_check_is_logged_every_logprob_check_every_iterations(sft_run, tmp_path):
    config = make_config(sft_run, loss="rloo", samples_per_prompt=2, num_steps=4, logprob_check_every=2)
    ppo.train(config, str(tmp_path))
    rows = metrics_lib.read_metrics(str(tmp_path))
    checked = [r["step"] for r in rows if "rollout/logprob_diff_max" in r]
    assert checked == [2, 4]  # the 2nd and 4th iterations (a row is logged after its update)
    assert all(0 < r["rollout/logprob_diff_max"] < 1e-4 for r in rows if r["step"] in checked)


def test_masked_positions_cannot_leak_nan(sft_run):
    config = make_config(sft_run)
    s, prompts = setup(config, 1)
    samples = jax.device_get(s.rollout(s.state, s.frozen, prompts, jax.random.key(5)))
    mask = samples.response_mask.astype(bool)
    mask[0, 3:] = False  # make sure some positions are masked
    samples = samples.replace(response_mask=mask.astype(np.int32), **{
        key: np.where(mask, getattr(samples, key), np.nan).astype(np.float32)
        for key in ("logprobs", "ref_logprobs", "values")})
    out, _ = ppo.compute_advantages(config, samples, zero_scores(samples), jnp.float32(0.05), jnp.zeros([2]))
    for key in ("kl", "rewards", "advantages", "returns"):
        assert np.all(np.isfinite(np.asarray(getattr(out, key)))), key
    batch, scores = mesh_lib.shard_batch((samples, zero_scores(samples)), s.mesh)
    state, metrics = s.update(s.state, batch, scores, jax.random.key(6), s.frozen["ref"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(jax.device_get(state)))
    assert all(np.isfinite(float(v)) for v in jax.device_get(metrics).values())


def test_final_scores_normalise_then_penalise_a_missing_eos(sft_run):
    config = make_config(sft_run, missing_eos="penalty")
    models = ppo.Models(config, None, None, None, make_tokenizer(config.tokenizer), {"mean": 0.5, "std": 2.0})
    scores = ppo.final_scores(models, jnp.asarray([2.5, -1.5, 7.0]), jnp.asarray([True, True, False]),
                              jnp.asarray([3, 8, 8]))
    np.testing.assert_allclose(scores, [1.0, -1.0, config.missing_eos_penalty])


def test_overlong_shaping_adds_dapos_penalty_after_the_other_rules(sft_run):
    """max_new_tokens 8, buffer 4: no penalty up to 4 tokens, then -0.25 per token to -1 at 8."""
    config = make_config(sft_run, overlong_buffer=4, overlong_penalty_factor=0.5)
    models = ppo.Models(config, None, None, None, make_tokenizer(config.tokenizer), {"mean": 0.0, "std": 1.0})
    scores = ppo.final_scores(models, jnp.ones([5]), jnp.ones([5], bool), jnp.asarray([1, 4, 5, 7, 8]))
    np.testing.assert_allclose(scores, 1.0 + 0.5 * np.asarray([0.0, 0.0, -0.25, -0.75, -1.0]), rtol=1e-6)


@pytest.mark.parametrize("overrides", [{}, dict(loss="rloo", samples_per_prompt=4, batch_size=4),
                                       dict(value_model="sft", num_seeds=2)])
def test_abstract_state_describes_the_built_state(sft_run, overrides):
    """The Orbax restore target from the config alone has the train state's exact tree and shapes."""
    config = make_config(sft_run, **overrides)
    state, target = ppo.build(config).state, ppo.abstract_state(config)
    assert jax.tree.structure(state) == jax.tree.structure(target)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)


def _scores(workdir):
    rows = metrics_lib.read_metrics(workdir)
    return np.asarray([r["objective/scores"] for r in rows])


@pytest.mark.parametrize("loss", ["ppo", "rloo", "grpo"])
def test_learns_a_toy_reward(sft_run, tmp_path, loss):
    extra = {} if loss == "ppo" else dict(samples_per_prompt=4, batch_size=4)  # 16 responses either way
    config = make_config(sft_run, loss=loss, **extra)
    ppo.train(config, str(tmp_path))
    scores = _scores(str(tmp_path))
    assert len(scores) == config.num_steps
    start, end = scores[:5].mean(), scores[-5:].mean()
    assert end > start + 0.15, (loss, scores.round(3).tolist())


def test_resume_repeats_an_uninterrupted_run(sft_run, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    ppo.train(make_config(sft_run, num_steps=4, adaptive_kl=True), whole)
    ppo.train(make_config(sft_run, num_steps=2, adaptive_kl=True), parts)  # "interrupted" at step 2
    ppo.train(make_config(sft_run, num_steps=4, adaptive_kl=True), parts)
    target = ppo.abstract_state(make_config(sft_run, num_steps=4))
    sa, sb = checkpoints.load_state(whole, target), checkpoints.load_state(parts, target)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(sa.kl_coef) != 0.05  # the adaptive coefficient moved and was checkpointed
    np.testing.assert_allclose(_scores(whole), _scores(parts))


def test_seeds_in_one_program_equal_separate_runs(sft_run, tmp_path):
    """num_seeds=2 vmaps two runs in one jitted program (8 devices here); seed i must be the run
    with seed + i: same final policy, and the logged mean / std are those of the two runs."""
    extra = dict(num_steps=2, adaptive_kl=True, gold_function="test_ppo:byte_fraction", sample_every=1)

    def train(config, workdir):
        config_lib.write_resolved_config(config, workdir)  # load_policy reads it, as after `rlhf-jax train`
        ppo.train(config, workdir)

    train(make_config(sft_run, num_seeds=2, **extra), str(tmp_path / "both"))
    for seed in (0, 1):
        train(make_config(sft_run, seed=seed, **extra), str(tmp_path / f"seed{seed}"))
        _, _, alone = runs.load_policy(str(tmp_path / f"seed{seed}"))
        _, _, vmapped = runs.load_policy(str(tmp_path / "both"), seed_index=seed)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(vmapped)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    both = metrics_lib.read_metrics(str(tmp_path / "both"))
    separate = [metrics_lib.read_metrics(str(tmp_path / f"seed{seed}")) for seed in (0, 1)]
    assert len(both) == 2
    for row, *singles in zip(both, *separate):
        for name in ("objective/scores", "objective/gold_scores", "objective/kl", "loss/value_avg"):
            values = np.array([r[name] for r in singles])
            np.testing.assert_allclose(row[name], values.mean(), rtol=1e-4, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(row[name + "_std"], values.std(), rtol=1e-3, atol=1e-6, err_msg=name)
    assert max(r["objective/scores_std"] for r in both) > 0  # the seeds differ: not one run twice
    assert "--- step 1" in (tmp_path / "both" / "samples.txt").read_text()
    with pytest.raises(ValueError, match="seed_index=2"):
        runs.load_policy(str(tmp_path / "both"), seed_index=2)


def test_num_seeds_must_be_positive(sft_run, tmp_path):
    from rlhf_jax.stages import registry

    with pytest.raises(config_lib.ConfigError, match="num_seeds=0"):
        registry.run_stage(make_config(sft_run, num_seeds=0), str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.fixture(scope="module")
def lora_sft_run(tmp_path_factory):
    """A random 'SFT run' whose embeddings are large (init_std 0.5): LoRA leaves the (tied)
    embeddings frozen, and with GPT-2's 0.02 init the logits of a random model cannot move
    more than about |e| |LayerNorm(h)| ~ 0.6 however the projections change."""
    model = tiny_model()
    model.init_std = 0.5
    workdir = str(tmp_path_factory.mktemp("lora_sft"))
    pretrain.save_random_run(workdir, model)
    return workdir, model


@pytest.mark.parametrize("loss", ["ppo", "rloo"])
def test_lora_policy_learns_a_toy_reward(lora_sft_run, tmp_path, loss):
    """PPO (value head on the LoRA policy) and RLOO with rank-8 adapters on every projection: the
    state holds adapters (and the value head), the reference is the base, and the reward rises."""
    from configs import lora as lora_configs

    sft_run, model = lora_sft_run
    extra = {} if loss == "ppo" else dict(samples_per_prompt=4, batch_size=4)
    config = make_config(sft_run, loss=loss, lora=lora_configs.rank(8, alpha=16.0), model=model, **extra)
    state = ppo.build(config).state
    assert set(state.params["policy"]) == {"lora"}
    target = ppo.abstract_state(config)
    assert jax.tree.structure(state) == jax.tree.structure(target)
    ppo.train(config, str(tmp_path))
    scores = _scores(str(tmp_path))
    assert scores[-5:].mean() > scores[:5].mean() + 0.15, (loss, scores.round(3).tolist())


def test_lora_with_a_separate_value_model_is_refused(sft_run):
    from configs import lora as lora_configs
    from rlhf_jax.stages import registry

    with pytest.raises(config_lib.ConfigError, match="value_model"):
        registry.validate(make_config(sft_run, lora=lora_configs.rank(8), value_model="sft"))


def test_lora_reward_model_rides_on_the_reference(lora_sft_run, tmp_path):
    """A LoRA reward run started from PPO's own SFT run: PPO holds its adapters and head only
    (the trunk is the reference's weights), and scores exactly as the merged reward model does."""
    from configs import lora as lora_configs, reward as reward_configs
    from rlhf_jax.models import lora, model as model_lib

    sft_run, model = lora_sft_run
    rcfg = reward_configs.reward_stage(num_steps=1)
    rcfg.model, rcfg.init_from, rcfg.lora = model, sft_run, lora_configs.rank(4)
    reward_dir = str(tmp_path / "reward")
    config_lib.write_resolved_config(rcfg, reward_dir)
    _, _, policy = runs.load_policy(sft_run)
    _, scalar = model_lib.replace_head_with_scalar(None, policy, model, seed=0)
    trainable, _ = lora.split(scalar, rcfg.lora, 0, heads=("scalar_head",))
    noise = lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)  # b != 0: a real merge
    trainable["lora"] = jax.tree.map(noise, trainable["lora"])
    base = lora.split(scalar, rcfg.lora, 0, heads=("scalar_head",))[1]
    runs.write_reward_model(reward_dir, rcfg, lora.combine(trainable, base, rcfg.lora), None, adapters=trainable)
    checkpoints.mark_finished(reward_dir, "fake LoRA reward run")

    config = make_config(sft_run, model=model, reward_function="", reward_model=reward_dir, loss="rloo",
                         samples_per_prompt=4, batch_size=4)
    setup = ppo.build(config)
    assert set(setup.frozen["reward"]) == {"lora", "scalar_head"}
    samples = setup.rollout(setup.state, setup.frozen, setup.batch_fn(0)["prompts"], jax.random.key(0))
    _, graphdef, merged, _ = runs.load_reward_model(reward_dir)
    expected = model_lib.reward_scores(graphdef, merged, *ppo.left_align(samples.tokens, samples.attention_mask))
    np.testing.assert_allclose(np.asarray(samples.reward_model_scores), np.asarray(expected), atol=1e-5)
    base_only = model_lib.reward_scores(graphdef, scalar, *ppo.left_align(samples.tokens, samples.attention_mask))
    assert not np.allclose(np.asarray(expected), np.asarray(base_only), atol=1e-3)
