"""RLHF with PPO (and REINFORCE / RLOO / GRPO ablations) on a language model.

One iteration (`config.num_steps` of them) is:

    rollout          jitted: sample responses with the policy at `temperature`, recompute
                     log-probs under the policy and the frozen reference (logits / temperature),
                     values, and the reward model's score at the last real token
    score (host)     only with `reward_function` / `gold_function`: decode and call a Python
                     function of (prompt, response)
    ppo_update       jitted: compute_advantages (per-token reward -beta * KL_t plus the score at
                     the last token, GAE or sequence-level baselines, whitening) then
                     `ppo_epochs` epochs of shuffled minibatch steps, then the adaptive KL step

Shapes: B rollout batch (prompts x samples_per_prompt), P prompt length (left padded), N new
tokens, V vocabulary, M minibatches. Masks are applied with `jnp.where` (NaN * 0 is NaN).

Models: the policy and the frozen reference start from the SFT run (`init_from`); the value
function is a scalar head on the policy (`value_model='policy'`, one forward gives logits and
values), or a separate scalar model initialised from the reward model ('reward_model') or from
the SFT params ('sft'). The reward is a reward-model run (`reward_model`) or an importable
Python function (`reward_function`, e.g. 'rlhf_jax.labelers:vader_gold_score').

Train state (checkpointed by run.train_loop, so a resumed run repeats an uninterrupted one):
    params           policy params, head 'lm'            opt_state        optax state of params
    value_params     scalar head, or a scalar model      value_opt_state  optax state (loss 'ppo')
    kl_coef          beta (adaptive or fixed)            baseline         [value, count] (EMA)
The frozen reference / reward params are reloaded from their runs, never checkpointed here.
Load a finished policy with `rlhf_jax.runs.load_policy(workdir[, seed_index])`.

Seeds in one program (`num_seeds` S > 1, for small models): every train-state leaf gets a
leading seed axis [S], and rollout and update are `jax.vmap`ped over it inside one jit (the
frozen reference and reward model are shared). Seed i is the run `seed + i` would be on its own:
its value-head init, prompt order and per-step rng are that run's. Metrics are the mean over
seeds plus `<name>_std` (the plots draw the band); the sample table shows seed 0.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax import config as config_lib
from rlhf_jax import losses, runs, sampling
from rlhf_jax import mesh as mesh_lib
from rlhf_jax import model as model_lib
from rlhf_jax import run as run_lib
from rlhf_jax.data import builders, loaders
from rlhf_jax.optim import make_optimizer
from rlhf_jax.tokenizer import make_tokenizer

LOSSES = ("ppo", "reinforce", "reinforce_baseline", "rloo", "grpo")
VALUE_MODELS = ("policy", "reward_model", "sft")
MISSING_EOS = ("keep", "penalty")


# ----------------------------------------------------------------------------- models


class Models:
    """The static half of the models (graphdefs, ids, settings): hashable, closed over by jit.

    graphdef         policy / reference, head 'lm'
    value_graphdef   'lm_and_scalar' (value_model='policy') or 'scalar' (separate value model)
    reward_graphdef  reward model ('scalar'), or None with a reward function
    """

    def __init__(self, config, graphdef, value_graphdef, reward_graphdef, tokenizer):
        self.config = config
        self.graphdef, self.value_graphdef, self.reward_graphdef = graphdef, value_graphdef, reward_graphdef
        self.eos_id, self.pad_id = int(tokenizer.eos_id), int(tokenizer.pad_id)
        self.truncate_id = _truncate_id(tokenizer, config.truncate_token)
        self.uses_value = config.loss == "ppo"


def _truncate_id(tokenizer, token: str) -> int:
    if not token:
        return -1
    ids = tokenizer.encode(token)
    if len(ids) != 1:
        raise config_lib.ConfigError(f"truncate_token={token!r} is {len(ids)} tokens; it must be exactly one")
    return int(ids[0])


def with_value_head(params, head):
    """Policy params (head 'lm') + a scalar head -> 'lm_and_scalar' params. A pytree op."""
    return nnx.State({**params, "scalar_head": head})


def forward(models, params, value_params, tokens, attention_mask, prompt_len: int, with_values: bool = True):
    """Log-probs, entropies and values of the response tokens of full sequences.

    tokens, attention_mask [B, P + N] (prompt left padded, response right padded).
    Logits are divided by the sampling temperature, as when the tokens were drawn.
    Returns logprobs [B, N], entropy [B, N], values [B, N] (zeros without a value model, or
    with with_values=False: the reference).
    """
    positions = model_lib.positions_from_mask(attention_mask)
    with_values = with_values and models.uses_value
    values = None
    if with_values and models.config.value_model == "policy":
        outputs, _ = model_lib.apply(models.value_graphdef, with_value_head(params, value_params), tokens,
                                     positions, attention_mask)
        values = outputs["scalar"]
    else:
        outputs, _ = model_lib.apply(models.graphdef, params, tokens, positions, attention_mask)
        if with_values:
            values = model_lib.apply(models.value_graphdef, value_params, tokens, positions, attention_mask)[0]["scalar"]
    # Position t predicts token t + 1: the response tokens are predicted from P - 1 ... P + N - 2.
    logits = outputs["logits"][:, prompt_len - 1:-1] / models.config.temperature
    response = tokens[:, prompt_len:]
    logprobs = losses.token_logprobs(logits, response)
    entropy = losses.entropy_from_logits(logits)
    values = jnp.zeros(response.shape, jnp.float32) if values is None else values[:, prompt_len - 1:-1]
    return logprobs, entropy, values


def left_align(tokens, mask):
    """Shift each row left past its leading padding, so real tokens start at column 0.

    The reward model then sees the layout it was trained on (prompt + response, right padded;
    last real token at mask.sum() - 1). tokens, mask [B, T] -> same shapes.
    """
    t = tokens.shape[1]
    first = jnp.argmax(mask.astype(bool), axis=1)  # [B] leading pads
    idx = (jnp.arange(t)[None, :] + first[:, None]) % t
    tokens = jnp.take_along_axis(tokens, idx, axis=1)
    mask = jnp.take_along_axis(mask, idx, axis=1) * (jnp.arange(t)[None, :] < jnp.sum(mask, 1, keepdims=True))
    return tokens, mask.astype(jnp.int32)


# ----------------------------------------------------------------------------- rollout


def rollout(models, state, frozen, prompts, rng, batch_sharding=None, vmap_axis=None):
    """Sample and evaluate one batch of responses. Pure; jitted by `make_rollout`.

    prompts: dict(prompt_tokens, prompt_mask) [Bp, P]; each prompt is repeated
    `samples_per_prompt` (K) times, consecutively, so B = Bp * K and rows b*K ... b*K+K-1 share
    a prompt. frozen: dict(ref=reference params, reward=reward-model params or None).
    Returns a dict of [B, ...] arrays:
        tokens, attention_mask [B, P+N]; response, response_mask [B, N] (1 up to and including
        EOS, or the truncate token); sampler_logprobs, logprobs, ref_logprobs, values [B, N];
        scores [B] (reward model, normalised; 0 with a reward function); has_eos [B] bool.
    """
    c = models.config
    k = c.samples_per_prompt
    prompt_tokens = jnp.repeat(prompts["prompt_tokens"], k, axis=0)
    prompt_mask = jnp.repeat(prompts["prompt_mask"], k, axis=0)
    if batch_sharding is not None:  # the repeated batch is split over the devices
        prompt_tokens, prompt_mask = jax.lax.with_sharding_constraint((prompt_tokens, prompt_mask), batch_sharding)
    p = prompt_tokens.shape[1]
    out = sampling.generate(models.graphdef, state["params"], prompt_tokens, prompt_mask, rng,
                            max_new_tokens=c.max_new_tokens, eos_id=models.eos_id, pad_id=models.pad_id,
                            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, vmap_axis=vmap_axis)
    response, mask = out["response"], out["response_mask"].astype(bool)
    ends = (response == models.eos_id) & mask
    if models.truncate_id >= 0:  # Cut after the first truncate token; it counts as an end.
        ends = ends | ((response == models.truncate_id) & mask)
        after_end = jnp.cumsum(ends, axis=1) - ends > 0
        mask = mask & ~after_end
        response = jnp.where(mask, response, models.pad_id)
    has_eos = jnp.any(ends & mask, axis=1)
    tokens = jnp.concatenate([prompt_tokens, response], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, mask.astype(jnp.int32)], axis=1)

    logprobs, _, values = forward(models, state["params"], state.get("value_params"), tokens, attention_mask, p)
    ref_logprobs, _, _ = forward(models, frozen["ref"], None, tokens, attention_mask, p, with_values=False)
    if models.reward_graphdef is not None:
        aligned_tokens, aligned_mask = left_align(tokens, attention_mask)
        scores = model_lib.reward_scores(models.reward_graphdef, frozen["reward"], aligned_tokens, aligned_mask)
        scores = (scores - frozen["reward_mean"]) / frozen["reward_std"]
    else:
        scores = jnp.zeros(tokens.shape[:1], jnp.float32)
    return dict(tokens=tokens, attention_mask=attention_mask, response=response, response_mask=mask.astype(jnp.int32),
                sampler_logprobs=jnp.where(mask, out["logprobs"], 0.0), logprobs=jnp.where(mask, logprobs, 0.0),
                ref_logprobs=jnp.where(mask, ref_logprobs, 0.0), values=jnp.where(mask, values, 0.0),
                scores=scores.astype(jnp.float32), has_eos=has_eos)


# ----------------------------------------------------------------------------- advantages


def compute_advantages(config, samples, kl_coef, baseline):
    """Rewards and advantages of a rollout. Pure; runs inside the jitted update.

    samples: the rollout dict (scores [B] already final except for the missing-EOS rule).
    kl_coef: scalar beta. baseline: [2] (EMA of the sequence reward, number of updates).
    Returns (samples + scores, kl, rewards, advantages, returns [B, N]; seq_advantages [B]),
    and the new baseline.
    """
    mask = samples["response_mask"].astype(bool)
    scores = samples["scores"]
    if config.missing_eos == "penalty":
        scores = jnp.where(samples["has_eos"], scores, config.missing_eos_penalty)
    kl = jnp.where(mask, losses.kl_penalty(samples["logprobs"], samples["ref_logprobs"], config.kl_estimator), 0.0)
    rewards = losses.per_token_rewards(scores, kl, mask, kl_coef)
    seq_reward = losses.masked_sum(rewards, mask, axis=1)  # score - beta * sum_t KL_t
    if config.whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)

    new_baseline = baseline
    seq_adv = jnp.zeros_like(seq_reward)
    if config.loss == "ppo":
        advantages, returns = losses.generalized_advantage_estimate(rewards, samples["values"], mask,
                                                                    config.gamma, config.lam)
    else:
        returns = jnp.zeros_like(rewards)
        if config.loss == "reinforce":
            seq_adv = seq_reward
        elif config.loss == "reinforce_baseline":
            value, count = baseline[0], baseline[1]
            mean = jnp.mean(seq_reward)
            seq_adv = seq_reward - jnp.where(count > 0, value, mean)
            new_value = jnp.where(count > 0, config.baseline_decay * value + (1 - config.baseline_decay) * mean, mean)
            new_baseline = jnp.stack([new_value, count + 1.0])
        else:
            grouped = seq_reward.reshape(-1, config.samples_per_prompt)
            fn = losses.rloo_advantages if config.loss == "rloo" else losses.grpo_advantages
            seq_adv = fn(grouped).reshape(-1)
        advantages = jnp.where(mask, seq_adv[:, None], 0.0)  # every token shares its sequence's
    if config.whiten_advantages and config.loss == "ppo":
        advantages = losses.whiten(advantages, mask)
    samples = dict(samples, scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns,
                   seq_advantages=seq_adv)
    return samples, new_baseline


# ----------------------------------------------------------------------------- update


def minibatch_loss(models, params, value_params, mb, prompt_len: int):
    """Loss of one minibatch: policy objective + vf_coef * value loss - entropy_coef * entropy."""
    c = models.config
    mask = mb["response_mask"].astype(bool)
    logprobs, entropy, values = forward(models, params, value_params, mb["tokens"], mb["attention_mask"], prompt_len)
    clipped_loss, pm = losses.ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, c.clip_eps)
    if c.loss in ("ppo", "grpo"):
        policy_loss = clipped_loss
    else:  # REINFORCE: -adv * log p(sequence); the clipped-surrogate numbers are still logged.
        policy_loss = losses.reinforce_loss(losses.masked_sum(logprobs, mask, axis=1), mb["seq_advantages"])
    value_loss, vm = (losses.ppo_value_loss(values, mb["values"], mb["returns"], mask, c.value_clip)
                      if models.uses_value else (jnp.zeros(()), {"value_clipfrac": jnp.zeros(())}))
    mean_entropy = losses.masked_mean(entropy, mask)
    loss = policy_loss + c.vf_coef * value_loss - c.entropy_coef * mean_entropy
    metrics = {"policy/approxkl_avg": pm["approxkl"], "policy/clipfrac_avg": pm["clipfrac"],
               "loss/policy_avg": policy_loss, "loss/value_avg": value_loss, "val/ratio": pm["ratio_mean"],
               "val/clipfrac_avg": vm["value_clipfrac"], "policy/entropy_avg": mean_entropy}
    return loss, metrics


def ppo_update(models, optimizer, mesh, state, samples, rng):
    """compute_advantages, then `ppo_epochs` epochs x `num_minibatches` shuffled minibatch steps,
    then the KL-coefficient update. Pure; jitted by `make_update` with the state donated.

    Gradients of the policy and the value params are clipped together by their joint global
    norm (config.optimizer.grad_clip_norm), as one optimizer over both would.
    Returns (state, metrics).
    """
    c = models.config
    p = samples["tokens"].shape[1] - samples["response"].shape[1]
    batch = samples["tokens"].shape[0]
    samples, baseline = compute_advantages(c, samples, state["kl_coef"], state["baseline"])
    train_keys = ("tokens", "attention_mask", "response_mask", "logprobs", "values", "advantages", "returns",
                  "seq_advantages")
    data = {key: samples[key] for key in train_keys}
    m = c.num_minibatches
    if batch % m:
        raise config_lib.ConfigError(f"rollout batch {batch} is not divisible by num_minibatches={m}")
    batch_sharding = mesh_lib.batch_sharding(mesh)
    uses_value = models.uses_value

    def minibatch_step(carry, idx):
        params, opt_state, value_params, value_opt_state = carry
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[idx], batch_sharding), data)
        grad_fn = jax.value_and_grad(minibatch_loss, argnums=(1, 2), has_aux=True)
        (_, metrics), (grads, value_grads) = grad_fn(models, params, value_params, mb, p)
        norm = optax.tree.norm((grads, value_grads) if uses_value else grads)
        clip = c.optimizer.grad_clip_norm
        if clip:
            scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12))
            grads, value_grads = jax.tree.map(lambda g: g * scale, (grads, value_grads))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if uses_value:
            updates, value_opt_state = optimizer.update(value_grads, value_opt_state, value_params)
            value_params = optax.apply_updates(value_params, updates)
        metrics["grad_norm"] = norm
        return (params, opt_state, value_params, value_opt_state), metrics

    def epoch(carry, key):
        order = jax.random.permutation(key, batch).reshape(m, batch // m)
        return jax.lax.scan(minibatch_step, carry, order)

    carry = (state["params"], state["opt_state"], state.get("value_params"), state.get("value_opt_state"))
    carry, metrics = jax.lax.scan(epoch, carry, jax.random.split(rng, c.ppo_epochs))
    metrics = jax.tree.map(jnp.mean, metrics)

    mask = samples["response_mask"].astype(bool)
    kl_sum = losses.masked_sum(samples["kl"], mask, axis=1)  # [B]
    non_score = losses.masked_sum(jnp.where(mask, -state["kl_coef"] * samples["kl"], 0.0), mask, axis=1)
    mean_kl = jnp.mean(kl_sum)
    kl_coef = state["kl_coef"]
    if c.adaptive_kl:
        kl_coef = losses.adaptive_kl_coef(kl_coef, mean_kl, c.kl_target, c.kl_horizon, batch)
    metrics.update({
        "objective/scores": jnp.mean(samples["scores"]),
        "objective/kl": mean_kl,
        "objective/entropy": jnp.mean(losses.masked_sum(-samples["logprobs"], mask, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(samples["scores"] + non_score),
        "objective/kl_coef": state["kl_coef"],
        "val/num_eos_tokens": jnp.sum(samples["has_eos"]),
        "val/mean_response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "val/advantage_mean": losses.masked_mean(samples["advantages"], mask),
    })
    params, opt_state, value_params, value_opt_state = carry
    new_state = dict(state, params=params, opt_state=opt_state, kl_coef=kl_coef, baseline=baseline)
    if uses_value:
        new_state.update(value_params=value_params, value_opt_state=value_opt_state)
    return new_state, metrics


def make_rollout(models, mesh, state_shardings, frozen_shardings):
    """jit(rollout)(state, frozen, prompts, rng) -> samples sharded on the batch axes.

    The prompts come as placed by `place_prompts` (split, or replicated when there are fewer
    prompts than devices, e.g. 4 prompts x K=4 samples on 8 devices). With num_seeds > 1,
    state, prompts, rng and the samples carry a leading seed axis; frozen is shared."""
    batch = mesh_lib.batch_sharding(mesh)
    fn = functools.partial(rollout, models, batch_sharding=batch)
    if models.config.num_seeds > 1:
        fn = jax.vmap(functools.partial(fn, vmap_axis="seed"), in_axes=(0, None, 0, 0), axis_name="seed")
        batch = mesh_lib.stacked(batch)
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, None, None), out_shardings=batch)


def place_prompts(prompts, mesh, num_seeds: int = 1):
    """Split a host prompt batch ([Bp, P], or [S, Bp, P] with seeds) over the devices when it
    divides evenly, else replicate it."""
    batch_axis = 1 if num_seeds > 1 else 0
    if prompts["prompt_tokens"].shape[batch_axis] % mesh_lib.batch_size_per_mesh(mesh):
        return jax.device_put(prompts, mesh_lib.replicated(mesh))
    if num_seeds > 1:
        sharding = mesh_lib.stacked(mesh_lib.batch_sharding(mesh))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), prompts)
    return mesh_lib.shard_batch(prompts, mesh)


def seed_summary(metrics):
    """Per-seed metrics {name: [S]} -> {name: mean over seeds, name_std: spread over seeds}."""
    out = {}
    for name, values in metrics.items():
        out[name], out[name + "_std"] = values.mean(), values.std()
    return out


def make_update(models, optimizer, mesh, state_shardings):
    """jit(ppo_update)(state, samples, rng) -> (state, metrics); the state buffers are donated.
    With num_seeds > 1 it is vmapped over the seed axis and the metrics are `seed_summary`s."""
    fn = functools.partial(ppo_update, models, optimizer, mesh)
    batch = mesh_lib.batch_sharding(mesh)
    if models.config.num_seeds > 1:
        per_seed, batch = jax.vmap(fn), mesh_lib.stacked(batch)

        def fn(state, samples, rng):
            state, metrics = per_seed(state, samples, rng)
            return state, seed_summary(metrics)

    return jax.jit(fn, in_shardings=(state_shardings, batch, None), out_shardings=(state_shardings, None),
                   donate_argnums=0)


# ----------------------------------------------------------------------------- setup


def state_shardings_of(mesh, state, num_seeds: int):
    """Param shardings of one seed's state; with seeds, the seed axis is unsplit in front."""
    if num_seeds == 1:
        return mesh_lib.param_shardings(mesh, state)
    one_seed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    return mesh_lib.stacked(mesh_lib.param_shardings(mesh, one_seed))


def _check_config(config):
    if config.num_seeds < 1:
        raise config_lib.ConfigError(f"num_seeds={config.num_seeds}: expected >= 1")
    if config.loss not in LOSSES:
        raise config_lib.ConfigError(f"loss={config.loss!r}: expected one of {LOSSES}")
    if config.value_model not in VALUE_MODELS:
        raise config_lib.ConfigError(f"value_model={config.value_model!r}: expected one of {VALUE_MODELS}")
    if config.missing_eos not in MISSING_EOS:
        raise config_lib.ConfigError(f"missing_eos={config.missing_eos!r}: expected one of {MISSING_EOS}")
    if config.kl_estimator not in losses.KL_KINDS:
        raise config_lib.ConfigError(f"kl_estimator={config.kl_estimator!r}: expected one of {losses.KL_KINDS}")
    if bool(config.reward_model) == bool(config.reward_function):
        raise config_lib.ConfigError("set exactly one of reward_model (a reward run) and reward_function")
    if config.loss in ("rloo", "grpo") and config.samples_per_prompt < 2:
        raise config_lib.ConfigError(f"loss={config.loss!r} needs samples_per_prompt >= 2")
    if config.value_model == "reward_model" and not config.reward_model and config.loss == "ppo":
        raise config_lib.ConfigError("value_model='reward_model' needs a reward_model run")
    if not config.init_from:
        raise config_lib.ConfigError("init_from: the SFT run the policy and reference start from")


def seeds_of(config) -> list[int]:
    return [config.seed + i for i in range(config.num_seeds)]


def init_state(config, optimizer):
    """Load the SFT policy, reference, value and reward models.

    Returns (models_parts, state, frozen): models_parts = (graphdef, value_graphdef,
    reward_graphdef); state = the train state (see the module docstring), stacked on a leading
    seed axis when num_seeds > 1; frozen = dict(ref, reward, reward_mean, reward_std).
    """
    model_config, graphdef, params = runs.load_matching_policy(config.init_from, config.model, "ppo")
    reward_graphdef, frozen = None, {"ref": params, "reward": None, "reward_mean": 0.0, "reward_std": 1.0}
    if config.reward_model:
        _, reward_graphdef, reward_params, norm = runs.load_reward_model(config.reward_model)
        frozen["reward"] = reward_params
        if config.use_reward_normalization and norm:
            frozen["reward_mean"], frozen["reward_std"] = float(norm["mean"]), float(norm["std"])
    frozen["reward_mean"] = jnp.float32(frozen["reward_mean"])
    frozen["reward_std"] = jnp.float32(frozen["reward_std"])

    value_graphdef = None

    def seed_state(seed):
        nonlocal value_graphdef
        state = {"params": jax.tree.map(jnp.array, params),  # own copy: the reference keeps the originals
                 "opt_state": optimizer.init(params)}
        if config.loss == "ppo":
            if config.value_model == "policy":
                value_graphdef, full = model_lib.add_scalar_head(graphdef, params, model_config, seed)
                value_params = full["scalar_head"]
            elif config.value_model == "sft":
                value_graphdef, value_params = model_lib.replace_head_with_scalar(graphdef, params, model_config, seed)
            else:
                value_graphdef, value_params = reward_graphdef, frozen["reward"]
            value_params = jax.tree.map(jnp.array, value_params)  # own copy: the update donates it
            state.update(value_params=value_params, value_opt_state=optimizer.init(value_params))
        state["kl_coef"] = jnp.float32(config.kl_coef)
        state["baseline"] = jnp.zeros([2], jnp.float32)
        return state

    states = [seed_state(seed) for seed in seeds_of(config)]
    state = states[0] if config.num_seeds == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return (graphdef, value_graphdef, reward_graphdef), state, frozen


def _host_scores(fn, prompts: list[str], responses: list[str]) -> np.ndarray:
    return np.asarray([float(fn(p, r)) for p, r in zip(prompts, responses)], np.float32)


def make_step(config, models, mesh, optimizer, state_shardings, frozen, frozen_shardings, tokenizer):
    """The Python step train_loop calls: jitted rollout -> host scoring -> jitted update.

    batch = dict(step, prompts (sharded), texts (prompt strings; one list per seed with
    num_seeds > 1)). `last` keeps the decoded samples of the latest step (seed 0) for the sample
    table.
    """
    rollout_fn = make_rollout(models, mesh, state_shardings, frozen_shardings)
    update_fn = make_update(models, optimizer, mesh, state_shardings)
    reward_fn = labelers_load(config.reward_function)
    gold_fn = labelers_load(config.gold_function)
    k, num_seeds = config.samples_per_prompt, config.num_seeds
    seeded = num_seeds > 1
    samples_sharding = mesh_lib.batch_sharding(mesh)
    if seeded:
        samples_sharding = mesh_lib.stacked(samples_sharding)
    last = {}

    def step_fn(state, batch, rng):
        """rng: this step's key, or with seeds one key per seed (run.step_rng)."""
        keys = (jax.vmap(jax.random.split) if seeded else jax.random.split)(rng)
        rollout_rng, update_rng = keys[..., 0], keys[..., 1]
        samples = rollout_fn(state, frozen, batch["prompts"], rollout_rng)
        extra = {}
        want_samples = config.sample_every and batch["step"] % config.sample_every == 0
        if reward_fn is not None or gold_fn is not None or want_samples:
            response, mask = jax.device_get((samples["response"], samples["response_mask"]))
            n = response.shape[-1]
            texts = sampling.decode_responses(tokenizer, response.reshape(-1, n), mask.reshape(-1, n))
            prompts = [t for seed_texts in (batch["texts"] if seeded else [batch["texts"]]) for t in seed_texts
                       for _ in range(k)]
            if reward_fn is not None:
                scores = _host_scores(reward_fn, prompts, texts).reshape(response.shape[:-1])
                samples["scores"] = jax.device_put(scores, samples_sharding)
            if gold_fn is not None:
                gold = _host_scores(gold_fn, prompts, texts)
                per_seed = gold.reshape(num_seeds, -1).mean(axis=1)
                extra = (seed_summary({"objective/gold_scores": per_seed}) if seeded
                         else {"objective/gold_scores": float(per_seed[0])})
            if want_samples:  # the sample table: texts, scores and gold of this one step, seed 0
                b = len(texts) // num_seeds
                last.update(step=batch["step"], prompts=prompts[:b], texts=texts[:b],
                            gold=gold[:b] if gold_fn is not None else None,
                            scores=np.asarray(jax.device_get(samples["scores"])).reshape(-1)[:b])
        state, metrics = update_fn(state, samples, update_rng)
        return state, {**metrics, **extra}

    return step_fn, last


def labelers_load(path):
    if not path:
        return None
    from rlhf_jax import labelers

    return labelers.load_function(path)


def prompt_source(config):
    """The prompts: `config.prompts` if given, else the 'prompt' field of config.data's split."""
    if config.prompts:
        return [{"prompt": p} for p in config.prompts]
    data = builders.load_dataset(config.data, config.data_dir)
    return data[config.prompt_split]


# ----------------------------------------------------------------------------- the stage


def train(config, workdir: str):
    _check_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = make_tokenizer(config.tokenizer)
    optimizer = make_optimizer(config.optimizer)
    (graphdef, value_graphdef, reward_graphdef), state, frozen = init_state(config, optimizer)
    models = Models(config, graphdef, value_graphdef, reward_graphdef, tokenizer)
    state_shardings = state_shardings_of(mesh, state, config.num_seeds)
    state = jax.device_put(state, state_shardings)
    frozen_shardings = mesh_lib.param_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)

    source = prompt_source(config)
    prompt_batches = [loaders.prompt_batches(source, tokenizer, config.max_prompt_len, config.batch_size, seed)
                      for seed in seeds_of(config)]  # each seed draws prompts in its own order
    step_fn, last = make_step(config, models, mesh, optimizer, state_shardings, frozen, frozen_shardings, tokenizer)

    def batch_fn(step):
        per_seed = [batches[step] for batches in prompt_batches]
        prompts = {key: np.stack([b[key] for b in per_seed]) for key in ("prompt_tokens", "prompt_mask")}
        texts = [loaders.prompt_texts(source, b["index"]) for b in per_seed]
        if config.num_seeds == 1:
            prompts, texts = {key: v[0] for key, v in prompts.items()}, texts[0]
        return {"step": step, "prompts": place_prompts(prompts, mesh, config.num_seeds), "texts": texts}

    def log_samples(state, step, writer):
        if not last or "scores" not in last:
            return
        rows = []
        for i in range(min(config.num_sample_rows, len(last["texts"]))):
            gold = "" if last["gold"] is None else f"  gold={last['gold'][i]:+.3f}"
            rows.append(f"score={last['scores'][i]:+.3f}{gold}  {last['prompts'][i]!r} -> {last['texts'][i]!r}")
        table = "\n".join(rows)
        writer.write_text(last["step"], "samples", table)
        with open(os.path.join(workdir, "samples.txt"), "a") as f:
            f.write(f"--- step {last['step']}\n{table}\n")
        last.pop("scores")

    # With seeds, one key per seed: seed i gets the step keys the run `seed + i` gets alone.
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds_of(config)))
    rng = seed_keys if config.num_seeds > 1 else seed_keys[0]
    return run_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, batch_fn=batch_fn, num_steps=config.num_steps,
        rng=rng, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        log_fn=log_samples, progress_every_s=config.get("progress_every_s", 10.0),
        headline=("objective/scores", "objective/gold_scores", "objective/kl", "objective/kl_coef",
                  "val/num_eos_tokens"))


# ----------------------------------------------------------------------------- hand-off (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of a PPO run's train state, from its config alone (for Orbax)."""
    _, params = model_lib.abstract_params(config.model, "lm")
    optimizer = make_optimizer(config.optimizer)
    state = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params)}
    if config.loss == "ppo":
        if config.value_model == "policy":
            value = model_lib.abstract_params(config.model, "lm_and_scalar")[1]["scalar_head"]
        elif config.value_model == "sft":
            value = model_lib.abstract_params(config.model, "scalar")[1]
        else:
            reward_config = config_lib.read_resolved_config(config.reward_model)
            value = model_lib.abstract_params(reward_config.model, "scalar")[1]
        state.update(value_params=value, value_opt_state=jax.eval_shape(optimizer.init, value))
    state["kl_coef"] = jax.ShapeDtypeStruct((), jnp.float32)
    state["baseline"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    seeds = config.get("num_seeds", 1)
    lead = (seeds,) if seeds > 1 else ()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype), state)


def policy_params(config, state):
    """(graphdef, policy params) of a restored state (with a leading seed axis if num_seeds > 1)."""
    return model_lib.abstract_params(config.model, "lm")[0], state["params"]
