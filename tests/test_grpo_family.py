"""The GRPO family as switches of the RL stage (issue 18 section 2): the paper presets load and
validate; bad values are one-line errors naming the key; dynamic sampling keeps static shapes
and masks exactly the zero-spread groups; the advantage scalings, the KL in the loss and
REINFORCE++ against NumPy; each preset learns a toy reward. Tiny models only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo as ppo_configs
from rlhf_jax import losses
from rlhf_jax.runtime import config as config_lib, metrics as metrics_lib
from rlhf_jax.stages import ppo, registry
from test_ppo import PROMPTS, make_sft_run, tiny_model

PRESETS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(str(tmp_path_factory.mktemp("sft")))


def preset_config(name, sft_run, **overrides):
    """A paper preset at toy scale: 4 prompts x 4 samples, 8 new tokens, the toy reward."""
    c = getattr(ppo_configs, name)(num_steps=30, samples_per_prompt=4)
    c.model = tiny_model()
    c.init_from = sft_run
    c.reward_function = "test_ppo:byte_fraction"
    c.prompts = PROMPTS * 2
    c.batch_size = 4
    c.max_prompt_len = 16
    c.max_new_tokens = 8
    if c.max_len:  # Dr. GRPO's constant normaliser is the generation budget
        c.max_len = 8
    if c.overlong_buffer:
        c.overlong_buffer = 2
    c.optimizer.learning_rate = 3e-3
    c.log_every, c.checkpoint_every, c.sample_every, c.progress_every_s = 1, 100, 0, 1e9
    if overrides:  # not type-safe, so a wrongly typed value reaches the checks (as from a JSON file)
        c = config_lib.ml_collections.ConfigDict(c.to_dict(), type_safe=False)
    for key, value in overrides.items():
        c[key] = value
    return c


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name, sft_run):
    c = preset_config(name, sft_run)
    registry.validate(c)
    assert c.loss in ppo.LOSSES and c.samples_per_prompt >= 2 and c.value_model == "policy"


def test_presets_take_the_papers_choices():
    """The choices that tell the papers apart, one line each."""
    p = {name: getattr(ppo_configs, name)() for name in PRESETS}
    assert (p["grpo"].aggregation, p["grpo"].kl_placement, p["grpo"].kl_estimator, p["grpo"].kl_coef) == \
        ("seq_mean_token_mean", "loss", "k3", 0.04)
    assert (p["dr_grpo"].advantage_scaling, p["dr_grpo"].aggregation, p["dr_grpo"].max_len) == \
        ("none", "seq_mean_token_sum_norm", p["dr_grpo"].max_new_tokens)
    assert (p["dapo"].clip_low, p["dapo"].clip_high, p["dapo"].aggregation, p["dapo"].dynamic_sampling) == \
        (0.2, 0.28, "token_mean", True)
    assert p["dapo"].overlong_buffer > 0 and p["dapo"].kl_placement == "none"
    assert (p["gspo"].objective, p["gspo"].clip_low, p["gspo"].clip_high) == ("gspo", 3e-4, 4e-4)
    assert p["cispo"].objective == "cispo" and p["reinforce_pp"].loss == "reinforce_pp"


@pytest.mark.parametrize("key, value, message", [
    ("clip_low", 1.0, r"config\.clip_low=1\.0: expected a finite number in \[0, 1\)"),
    ("clip_high", -0.1, r"config\.clip_high=-0\.1"),
    ("aggregation", "token_meen", r"config\.aggregation='token_meen': expected one of 'token_mean'"),
    ("objective", "ppo", r"config\.objective='ppo'"),
    ("kl_placement", "both", r"config\.kl_placement='both'"),
    ("advantage_scaling", "std", r"config\.advantage_scaling='std'"),
    ("oversample", 0, r"config\.oversample=0"),
    ("dynamic_sampling", "yes", r"config\.dynamic_sampling='yes': expected True or False"),
    ("overlong_buffer", 9, r"config\.overlong_buffer=9: expected at most max_new_tokens=8"),
])
def test_bad_values_are_one_line_errors_naming_the_key(sft_run, key, value, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        registry.validate(preset_config("dapo", sft_run, **{key: value}))


def test_combinations_that_cannot_work_are_refused(sft_run):
    with pytest.raises(config_lib.ConfigError, match=r"config\.max_len=0: aggregation='seq_mean_token_sum_norm'"):
        registry.validate(preset_config("grpo", sft_run, aggregation="seq_mean_token_sum_norm"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.advantage_scaling='none': applies to loss='grpo'"):
        registry.validate(preset_config("reinforce_pp", sft_run, advantage_scaling="none"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.samples_per_prompt=1: expected an integer >= 2"):
        registry.validate(preset_config("reinforce_pp", sft_run, samples_per_prompt=1, dynamic_sampling=True))
    old = preset_config("grpo", sft_run)
    old.clip_eps = 0.2  # a config written before clip_low / clip_high
    with pytest.raises(config_lib.ConfigError, match=r"config\.clip_eps=0\.2: split into clip_low and clip_high"):
        registry.validate(old)


# ----------------------------------------------------------------------------- dynamic sampling


def fake_rollout(rows, n=3):
    """A Rollout whose row r holds the value r everywhere (so a gather is visible)."""
    r = np.arange(rows, dtype=np.float32)[:, None]
    full = lambda dtype, width: np.broadcast_to(r, (rows, width)).astype(dtype)
    return ppo.Rollout(tokens=full(np.int32, 2 + n), attention_mask=np.ones((rows, 2 + n), np.int32),
                       response=full(np.int32, n), response_mask=np.ones((rows, n), np.int32),
                       sampler_logprobs=full(np.float32, n), logprobs=full(np.float32, n), tis_weights=full(np.float32, n),
                       ref_logprobs=full(np.float32, n), values=full(np.float32, n),
                       has_eos=np.ones(rows, bool), reward_model_scores=None)


@pytest.mark.parametrize("scores, num_groups, expected_groups, expected_kept", [
    # groups (K=2): 0 spread, 1 flat, 2 spread, 3 flat -> the two spread ones, in sampling order
    ([0, 1, 1, 1, 0, 1, 0, 0], 2, [0, 2], [True, True]),
    # only group 2 has spread: it comes first, then the flat groups 0 and 1 fill the slots, masked
    ([1, 1, 0, 0, 0.5, 0.2, 3, 3], 3, [2, 0, 1], [True, False, False]),
    # more informative groups than slots: the first ones sampled are kept
    ([0, 1, 1, 0, 2, 1, 5, 5], 2, [0, 1], [True, True]),
])
def test_dynamic_sampling_keeps_static_shapes_and_masks_exactly_the_zero_spread_groups(
        scores, num_groups, expected_groups, expected_kept):
    k = 2
    samples, scores = fake_rollout(len(scores)), np.asarray(scores, np.float32)
    kept_samples, kept_scores, kept = jax.jit(ppo.keep_informative_groups, static_argnums=(2, 3))(
        samples, scores, k, num_groups)
    rows = np.asarray([g * k + j for g in expected_groups for j in range(k)])
    assert kept_samples.tokens.shape == (num_groups * k, 5)  # static: num_groups * K rows always
    np.testing.assert_array_equal(kept, expected_kept)
    np.testing.assert_array_equal(kept_samples.logprobs[:, 0], rows)
    np.testing.assert_array_equal(kept_scores, scores[rows])
    np.testing.assert_array_equal(kept_samples.response_mask, np.repeat(expected_kept, k)[:, None] * np.ones((1, 3)))


def test_dynamic_sampling_update_logs_and_trains_on_the_kept_groups(sft_run):
    """oversample 2: 8 groups sampled for 4 slots; frac_reward_zero_std is of all 8 groups."""
    c = preset_config("dapo", sft_run, oversample=2, mesh=preset_config("dapo", sft_run).mesh)
    c.mesh.data = 1
    s = ppo.build(c)
    batch = s.batch_fn(0)
    assert batch["prompts"]["prompt_tokens"].shape[0] == 8  # batch_size * oversample prompts
    samples = s.rollout(s.state, s.frozen, batch["prompts"], jax.random.key(0))
    raw = np.repeat([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0], 4).astype(np.float32)
    raw[[0, 20]] = 0.5  # groups 0 and 5 have spread; the other six are flat
    scores = s.final_scores(jnp.asarray(raw), samples.has_eos, jnp.full(raw.shape, 4))  # no overlong penalty
    _, metrics = s.update(s.state, samples, scores, jax.random.key(1), s.frozen["ref"])
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(6 / 8)
    assert float(metrics["dynamic_sampling/kept_fraction"]) == pytest.approx(2 / 4)
    assert float(metrics["objective/scores"]) == pytest.approx(float(np.mean(scores)))


# ----------------------------------------------------------------------------- advantages and the KL term


def test_grpo_advantage_scalings_and_reinforce_pp_against_numpy(sft_run):
    k, rows = 4, 16
    samples = fake_rollout(rows)
    samples = samples.replace(logprobs=np.zeros((rows, 3), np.float32), ref_logprobs=np.zeros((rows, 3), np.float32))
    scores = np.random.default_rng(0).normal(size=rows).astype(np.float32)
    grouped = scores.reshape(-1, k)
    centred = grouped - grouped.mean(1, keepdims=True)
    expected = {"group": centred / (grouped.std(1, ddof=1, keepdims=True) + 1e-4),
                "batch": centred / (scores.std(ddof=1) + 1e-4), "none": centred}
    for scaling, want in expected.items():
        c = preset_config("grpo", sft_run, advantage_scaling=scaling)
        adv, _ = ppo.compute_advantages(c, samples, jnp.asarray(scores), jnp.float32(0.04), jnp.zeros([2]))
        np.testing.assert_allclose(adv.seq_advantages, want.reshape(-1), rtol=1e-5, err_msg=scaling)
        np.testing.assert_allclose(adv.advantages, np.repeat(want.reshape(-1, 1), 3, 1), rtol=1e-5)
        np.testing.assert_array_equal(adv.rewards[:, :2], 0.0)  # KL in the loss: not in the reward

    c = preset_config("reinforce_pp", sft_run)
    kl_t = np.random.default_rng(1).normal(size=(rows, 3)).astype(np.float32) * 0.1
    samples = samples.replace(logprobs=kl_t)  # k1 against ref 0: KL_t = logprobs
    adv, _ = ppo.compute_advantages(c, samples, jnp.asarray(scores), jnp.float32(0.01), jnp.zeros([2]))
    r = -0.01 * kl_t
    r[:, -1] += scores
    to_go = np.cumsum(r[:, ::-1], 1)[:, ::-1]
    np.testing.assert_allclose(adv.advantages, (to_go - to_go.mean()) / np.sqrt(to_go.var(ddof=1) + 1e-8),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregation", losses.POLICY_LOSS_AGGREGATIONS)
def test_kl_in_the_loss_is_beta_times_the_aggregated_estimate(sft_run, aggregation):
    """With zero advantages the loss is beta * aggregate(k3(logp - ref)) (NumPy), the reference's
    log-probs moved off the policy's so the KL is not 0."""
    c = preset_config("grpo", sft_run, aggregation=aggregation, max_len=8)
    c.mesh.data = 1
    s = ppo.build(c)
    samples = jax.device_get(s.rollout(s.state, s.frozen, s.batch_fn(0)["prompts"], jax.random.key(2)))
    mask = samples.response_mask.astype(bool)
    mask[0, 2:] = False
    shift = np.random.default_rng(2).normal(size=mask.shape).astype(np.float32) * 0.3
    samples = samples.replace(response_mask=mask.astype(np.int32), ref_logprobs=samples.logprobs + shift)
    adv = ppo.Advantages(*(np.zeros(mask.shape, np.float32),) * 4, seq_advantages=np.zeros(len(mask), np.float32))
    loss, metrics = ppo.minibatch_loss(s.models, s.state.params, samples, adv, samples.prompt_len, jnp.float32(0.04))
    d = -shift  # logp - ref
    k3 = np.exp(-d) - 1 + d
    n = mask.sum(1)
    if aggregation == "token_mean":
        want = k3[mask].sum() / mask.sum()
    elif aggregation == "seq_mean_token_mean":
        want = np.mean(np.where(mask, k3, 0).sum(1) / n)
    else:
        want = np.mean(np.where(mask, k3, 0).sum(1) / 8)
    np.testing.assert_allclose(metrics["loss/kl_avg"], want, rtol=2e-4)
    np.testing.assert_allclose(loss, 0.04 * want, rtol=2e-4, atol=1e-7)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_learns_a_toy_reward(sft_run, tmp_path, name):
    """The preset's choices as they are, but two passes over each rollout: 30 steps of 16
    responses are few for one pass at a KL-held pace (grpo's KL in the loss rose to 0.7 here)."""
    c = preset_config(name, sft_run, ppo_epochs=2)
    ppo.train(c, str(tmp_path))
    rows = metrics_lib.read_metrics(str(tmp_path))
    scores = np.asarray([r["objective/scores"] for r in rows])
    assert len(scores) == c.num_steps and "frac_reward_zero_std" in rows[0]
    assert scores[-5:].mean() > scores[:5].mean() + 0.15, (name, scores.round(3).tolist())


# ----------------------------------------------------------------------------- what the ablation plots


def test_score_metrics_split_lengths_by_correctness():
    c = config_lib.ml_collections.ConfigDict(dict(num_seeds=1, correct_score=1.0, reward_function="m:f"))
    m = ppo.score_metrics(c, np.asarray([1.0, 0.0, 1.0, 0.0]), np.asarray([3, 5, 7, 9]), "eval/")
    assert m == {"eval/scores": 0.5, "eval/length_correct": 5.0, "eval/length_incorrect": 7.0}
    m = ppo.score_metrics(c, np.asarray([1.0, 1.0]), np.asarray([3, 5]), "val/")
    assert "val/length_incorrect" not in m and m["val/length_correct"] == 4.0  # none incorrect: left out
    c.num_seeds = 2  # seed 0 all correct (2, 4); seed 1: correct 8, incorrect 6
    m = ppo.score_metrics(c, np.asarray([[1.0, 1.0], [0.0, 1.0]]), np.asarray([[2, 4], [6, 8]]), "val/")
    np.testing.assert_allclose([m["val/length_correct"], m["val/length_correct_std"]], [5.5, 2.5])
    np.testing.assert_allclose([m["val/length_incorrect"], m["val/length_incorrect_std"]], [6.0, 0.0])
    np.testing.assert_allclose([m["val/scores"], m["val/scores_std"]], [0.75, 0.25])


def test_held_out_evaluation_runs_every_eval_every_steps(sft_run, tmp_path):
    from configs import datasets

    c = preset_config("grpo", sft_run, num_steps=3, eval_every=2, eval_split="test", num_eval_prompts=6,
                      correct_score=0.2, prompts=(), data=datasets.arithmetic(num_train=32, num_validation=8, num_test=8),
                      data_dir=str(tmp_path / "data"))
    ppo.train(c, str(tmp_path / "run"))
    rows = metrics_lib.read_metrics(str(tmp_path / "run"))
    assert [("eval/scores" in r) for r in rows] == [True, False, True]
    assert all(0.0 <= r["eval/scores"] <= 1.0 for r in rows if "eval/scores" in r)
    assert all("val/scores" in r and ("val/length_correct" in r or "val/length_incorrect" in r) for r in rows)
    with pytest.raises(config_lib.ConfigError, match=r"config\.eval_every=2: the held-out evaluation"):
        registry.validate(preset_config("grpo", sft_run, eval_every=2))


def test_with_algorithm_keeps_the_task_and_takes_the_presets_choices(sft_run):
    task = preset_config("grpo", sft_run)  # a task config: toy prompts, lengths, lr
    task.max_new_tokens = 10
    for name in PRESETS:
        c = ppo_configs.with_algorithm(task, name)
        preset = getattr(ppo_configs, name)()
        assert (c.prompts, c.max_new_tokens, c.optimizer.learning_rate, c.reward_function) == \
            (task.prompts, 10, task.optimizer.learning_rate, task.reward_function)
        for key in ppo_configs.ALGORITHM_FIELDS:
            if key not in ("max_len", "overlong_buffer"):
                assert c[key] == preset[key], (name, key)
        assert c.max_len == (10 if preset.max_len else 0) and c.overlong_buffer == (2 if preset.overlong_buffer else 0)
        registry.validate(c)
