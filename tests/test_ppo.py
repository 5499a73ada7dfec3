"""PPO stage: parallel == single device, log-prob recomputation, NaN safety, KL at the start,
learning on a toy reward (ppo, rloo, grpo), and resume == uninterrupted. Tiny models only."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs
from configs import optimizers
from configs import ppo as ppo_configs
from rlhf_jax import config as config_lib
from rlhf_jax import mesh as mesh_lib
from rlhf_jax import ppo, pretrain, runs
from rlhf_jax import run as run_lib
from rlhf_jax.data import loaders
from rlhf_jax.optim import make_optimizer
from rlhf_jax.tokenizer import make_tokenizer

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
    """Everything train() builds, on a mesh with `data_axis` devices."""
    config.mesh.data = data_axis
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = make_tokenizer(config.tokenizer)
    optimizer = make_optimizer(config.optimizer)
    parts, state, frozen = ppo.init_state(config, optimizer)
    models = ppo.Models(config, *parts, tokenizer)
    shardings = mesh_lib.param_shardings(mesh, state)
    state = jax.device_put(state, shardings)
    frozen_shardings = mesh_lib.param_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    rollout = ppo.make_rollout(models, mesh, shardings, frozen_shardings)
    update = ppo.make_update(models, optimizer, mesh, shardings)
    batches = loaders.prompt_batches([{"prompt": p} for p in config.prompts], tokenizer, config.max_prompt_len,
                                     config.batch_size, 0)
    b = batches[0]
    prompts = ppo.place_prompts({"prompt_tokens": b["prompt_tokens"], "prompt_mask": b["prompt_mask"]}, mesh)
    return dict(mesh=mesh, state=state, frozen=frozen, rollout=rollout, update=update, prompts=prompts,
                models=models)


def test_update_on_8_devices_equals_single_device(sft_run):
    config = make_config(sft_run)
    one = setup(make_config(sft_run), 1)
    samples = jax.device_get(one["rollout"](one["state"], one["frozen"], one["prompts"], jax.random.key(1)))
    samples["scores"] = np.linspace(-1, 1, len(samples["scores"])).astype(np.float32)
    many = setup(config, -1)
    assert many["mesh"].devices.size == 8
    results = []
    for s in (one, many):
        batch = mesh_lib.shard_batch(samples, s["mesh"])
        state, metrics = s["update"](s["state"], batch, jax.random.key(2))
        results.append(jax.device_get((state, metrics)))
    (s1, m1), (s8, m8) = results
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(m1["loss/value_avg"]) > 0.0  # a real update, not a vacuous comparison


def test_rollout_recomputes_sampler_logprobs_and_kl_starts_at_zero(sft_run):
    s = setup(make_config(sft_run, temperature=0.7), 1)
    samples = jax.device_get(s["rollout"](s["state"], s["frozen"], s["prompts"], jax.random.key(3)))
    mask = samples["response_mask"].astype(bool)
    assert mask.sum() > 0
    np.testing.assert_allclose(samples["logprobs"][mask], samples["sampler_logprobs"][mask], atol=2e-5)
    # Policy == reference at the first iteration: the KL is exactly 0, not merely small.
    np.testing.assert_array_equal(samples["logprobs"], samples["ref_logprobs"])
    _, metrics = s["update"](s["state"], mesh_lib.shard_batch(samples, s["mesh"]), jax.random.key(4))
    assert float(metrics["objective/kl"]) == 0.0


def test_masked_positions_cannot_leak_nan(sft_run):
    config = make_config(sft_run)
    s = setup(config, 1)
    samples = jax.device_get(s["rollout"](s["state"], s["frozen"], s["prompts"], jax.random.key(5)))
    mask = samples["response_mask"].astype(bool)
    mask[0, 3:] = False  # make sure some positions are masked
    samples["response_mask"] = mask.astype(np.int32)
    for key in ("logprobs", "ref_logprobs", "values"):
        samples[key] = np.where(mask, samples[key], np.nan).astype(np.float32)
    out, _ = ppo.compute_advantages(config, samples, jnp.float32(0.05), jnp.zeros([2]))
    for key in ("kl", "rewards", "advantages", "returns"):
        assert np.all(np.isfinite(np.asarray(out[key]))), key
    state, metrics = s["update"](s["state"], mesh_lib.shard_batch(samples, s["mesh"]), jax.random.key(6))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(jax.device_get(state)))
    assert all(np.isfinite(float(v)) for v in jax.device_get(metrics).values())


def _scores(workdir):
    rows = run_lib.read_metrics(workdir)
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
    sa, sb = run_lib.load_state(whole, target), run_lib.load_state(parts, target)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(sa["kl_coef"]) != 0.05  # the adaptive coefficient moved and was checkpointed
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
    both = run_lib.read_metrics(str(tmp_path / "both"))
    separate = [run_lib.read_metrics(str(tmp_path / f"seed{seed}")) for seed in (0, 1)]
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
    with pytest.raises(config_lib.ConfigError, match="num_seeds=0"):
        ppo.train(make_config(sft_run, num_seeds=0), str(tmp_path))
