"""RLHF with PPO (and REINFORCE / RLOO / GRPO ablations) on a language model.

One iteration (`config.num_steps` of them) is `ppo_step(setup, state, batch, rng)`:

    rollout          jitted: sample responses with the policy at `temperature`, recompute
                     log-probs under the policy and the frozen reference (logits / temperature),
                     values, and the reward model's raw score at the last real token -> `Rollout`
    raw scores       the reward model's (from the rollout), or with `reward_function` a Python
                     function of (prompt, response) called on the host with the decoded text
    final_scores     jitted: the one place a score changes: the reward run's normalisation, then
                     the missing-EOS rule
    ppo_update       jitted: [mask_truncated; dynamic sampling: keep_informative_groups] ->
                     compute_advantages (per-token reward -beta * KL_t plus the score at the last
                     token, GAE, sequence-level or group baselines, REINFORCE++) -> `Advantages`,
                     then `ppo_epochs` epochs of shuffled minibatch steps of `minibatch_loss`,
                     then the adaptive KL step

The GRPO family is switches, not stages (configs/ppo.py: grpo, dr_grpo, dapo, gspo, cispo,
reinforce_pp): `loss` picks the advantage estimator, `objective` / `clip_low` / `clip_high` /
`aggregation` the clipped objective (rlhf_jax.losses.policy_loss), `kl_placement` where beta * KL
goes (reward, loss or nowhere), `dynamic_sampling`, `overlong_buffer` and `mask_truncated` DAPO's
sampling and length rules.

The host work (decoding, Python reward and gold functions) is why the step is a Python function
and not one jitted program. It has no effect but its outputs: (state, metrics, sample table or
None); `train` writes the table (samples.txt, TensorBoard) and hands run.train_loop the shared
(state, metrics) step. `build(config)` makes everything a run needs (models, state, jitted
functions, prompt batches); `train` runs it, and the tests and benchmarks take it apart.

Shapes: B rollout batch (prompts x samples_per_prompt), P prompt length (left padded), N new
tokens, V vocabulary, M minibatches. Masks are applied with `jnp.where` (NaN * 0 is NaN).

Models: the policy and the frozen reference start from the SFT run (`init_from`); the value
function is a scalar head on the policy (`value_model='policy'`, one forward gives logits and
values), or a separate scalar model initialised from the reward model ('reward_model') or from
the SFT params ('sft'). The reward is a reward-model run (`reward_model`) or an importable
Python function (`reward_function`, e.g. 'rlhf_jax.people.labelers:vader_gold_score').

Train state (`TrainState`, checkpointed by run.train_loop, so a resumed run repeats an
uninterrupted one): params {'policy', 'value'} and one optax state over both, kl_coef (beta,
adaptive or fixed), baseline (EMA of the sequence reward). The frozen reference / reward params
are reloaded from their runs, never checkpointed here. Load a finished policy with
`rlhf_jax.stages.runs.load_policy(workdir[, seed_index])`.

Seeds in one program (`num_seeds` S > 1, for small models): every train-state leaf gets a
leading seed axis [S], and rollout and update are `jax.vmap`ped over it inside one jit (the
frozen reference and reward model are shared). Seed i is the run `seed + i` would be on its own:
its value-head init, prompt order and per-step rng are that run's. Metrics are the mean over
seeds plus `<name>_std` (the plots draw the band); the sample table shows seed 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from tensorboardX import SummaryWriter

from rlhf_jax import losses
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import lm_head, lora, model as model_lib, sampling
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib, distributed, mesh as mesh_lib, metrics as metrics_lib, run as run_lib
from rlhf_jax.runtime.checks import MISSING
from rlhf_jax.runtime.optim import check_optimizer_config, make_optimizer
from rlhf_jax.stages import runs

LOSSES = ("ppo", "reinforce", "reinforce_baseline", "rloo", "grpo", "reinforce_pp")
CLIPPED_LOSSES = ("ppo", "grpo", "reinforce_pp")  # trained on losses.policy_loss (objective, clip_*, aggregation)
GROUP_LOSSES = ("rloo", "grpo")  # baselines from the K samples of a prompt
VALUE_MODELS = ("policy", "reward_model", "sft")
MISSING_EOS = ("keep", "penalty")
KL_PLACEMENTS = ("reward", "loss", "none")
ROLLOUT_CORRECTIONS = ("none", "tis")
ADVANTAGE_SCALINGS = ("group", "batch", "none")


# ----------------------------------------------------------------------------- state and samples


@struct.dataclass
class TrainState:
    """What run.train_loop checkpoints; with num_seeds S > 1 every leaf has a leading [S].

    params      {'policy': policy params (head 'lm'; with LoRA its adapters {'lora': ...}),
                 'value': the value head (value_model 'policy') or a scalar model ('reward_model',
                          'sft'); None without a value function (loss != 'ppo')}
    opt_state   optax state of params: one optimizer over both, so the gradient clip
                (config.optimizer.grad_clip_norm) is by their joint global norm
    kl_coef     [] float32    beta (adaptive or fixed)
    baseline    [2] float32   EMA of the sequence reward and the number of updates
                              (loss 'reinforce_baseline')
    """

    params: dict
    opt_state: optax.OptState
    kl_coef: jax.Array
    baseline: jax.Array


@struct.dataclass
class Rollout:
    """One batch of sampled responses and what the policy, the reference, the value function and
    the reward model make of them. 0 at masked positions; a leading [S] with num_seeds > 1.

    tokens, attention_mask      [B, P + N] int32   prompt (left padded), response (right padded)
    response, response_mask     [B, N] int32       mask 1 up to and including EOS (or the truncate token)
    sampler_logprobs            [B, N] float32     log-probs of the sampled tokens, as sampled
    logprobs                    [B, N] float32     the update's old log-probs: the policy forward's
                                                   where the rollout runs one (a value head on the
                                                   policy, rollout_correction='tis'), else the sampler's
    tis_weights                 [B, N] float32     each token's importance weight (1 without a correction)
    ref_logprobs                [B, N] float32     by a forward pass of the reference
    values                      [B, N] float32     value estimates (0 without a value function)
    has_eos                     [B] bool           the response ended (EOS or the truncate token)
    reward_model_scores         [B] float32        the reward model's raw (unnormalised) score at the
                                                   last real token; None with a reward function
    Row b * K + j is sample j of prompt b (K = samples_per_prompt).
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response: jax.Array
    response_mask: jax.Array
    sampler_logprobs: jax.Array
    logprobs: jax.Array
    tis_weights: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    has_eos: jax.Array
    reward_model_scores: jax.Array | None

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[-1] - self.response.shape[-1]


@struct.dataclass
class Advantages:
    """What the update trains on, from a rollout and its final scores. 0 at masked positions.

    kl              [B, N]  per-token KL estimate against the reference (config.kl_estimator)
    rewards         [B, N]  -beta * kl_t, plus the score at the last real token (whitened with
                            whiten_rewards)
    advantages      [B, N]  GAE (loss 'ppo'; whitened with whiten_advantages), or each token
                            carries its sequence's advantage
    returns         [B, N]  value targets (loss 'ppo'; else 0)
    seq_advantages  [B]     the sequence-level advantage (REINFORCE family; 0 for 'ppo')
    """

    kl: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array
    seq_advantages: jax.Array


# ----------------------------------------------------------------------------- models


class Models:
    """The static half of the models (graphdefs, ids, settings): hashable, closed over by jit.

    graphdef         policy / reference, head 'lm'
    sampler_graphdef the policy as the sampler runs it (config.rollout_dtype; same params)
    value_graphdef   'lm_and_scalar' (value_model='policy') or 'scalar' (separate value model)
    reward_graphdef  reward model ('scalar'), or None with a reward function
    reward_lora      the reward run's LoRA config when its adapters ride on the reference's
                     weights (a LoRA reward run from the same SFT run: no second trunk), else None
    reward_mean, reward_std   the reward run's normalisation of its scores (0, 1: none), for final_scores
    """

    def __init__(self, config, graphdef, value_graphdef, reward_graphdef, tokenizer, reward_normalization,
                 reward_lora=None):
        self.config, self.reward_lora = config, reward_lora
        self.graphdef, self.value_graphdef, self.reward_graphdef = graphdef, value_graphdef, reward_graphdef
        self.sampler_graphdef = graphdef
        if config.get("rollout_dtype") and config.rollout_dtype != config.model.dtype:
            sampler_model = ml_collections.ConfigDict(config.model.to_dict())
            sampler_model.dtype = config.rollout_dtype
            self.sampler_graphdef = model_lib.abstract_params(sampler_model, "lm")[0]
        self.eos_id, self.pad_id = int(tokenizer.eos_id), int(tokenizer.pad_id)
        self.truncate_id = _truncate_id(tokenizer, config.truncate_token)
        self.uses_value = config.loss == "ppo"
        self.reward_mean = float(reward_normalization["mean"])
        self.reward_std = float(reward_normalization["std"])


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


def value_forward(models, value_params, tokens, attention_mask, prompt_len: int):
    """[B, N] values of the response tokens from a separate value model (zeros without one)."""
    if not models.uses_value:
        return jnp.zeros(tokens[:, prompt_len:].shape, jnp.float32)
    positions = model_lib.positions_from_mask(attention_mask)
    values = model_lib.apply(models.value_graphdef, value_params, tokens, positions, attention_mask)[0]["scalar"]
    return values[:, prompt_len - 1:-1]


def forward(models, params, value_params, tokens, attention_mask, prompt_len: int, with_values: bool = True):
    """Log-probs, entropies and values of the response tokens of full sequences.

    params: policy (or reference) params; value_params: params['value'] of the train state.
    tokens, attention_mask [B, P + N] (prompt left padded, response right padded).
    Logits are divided by the sampling temperature, as when the tokens were drawn; they are
    computed in chunks of the model's logits_chunk tokens (lm_head), never all at once.
    Returns logprobs [B, N], entropy [B, N], values [B, N] (zeros without a value model, or
    with with_values=False: the reference).
    """
    positions = model_lib.positions_from_mask(attention_mask)
    response = tokens[:, prompt_len:]
    # Position t predicts token t + 1: the response tokens are predicted from P - 1 ... P + N - 2.
    if with_values and models.uses_value and models.config.value_model == "policy":
        outputs, _ = model_lib.apply(models.value_graphdef, with_value_head(params, value_params), tokens,
                                     positions, attention_mask, logits=False)
        values = outputs["scalar"][:, prompt_len - 1:-1]
    else:
        outputs, _ = model_lib.apply(models.graphdef, params, tokens, positions, attention_mask, logits=False)
        values = (value_forward(models, value_params, tokens, attention_mask, prompt_len) if with_values
                  else jnp.zeros(response.shape, jnp.float32))
    logprobs, entropy, _ = lm_head.token_logprobs_and_entropy(
        outputs["hidden"][:, prompt_len - 1:-1], outputs["unembedding"], response, models.config.temperature,
        model_lib.logits_chunk(models.graphdef, params))
    return logprobs, entropy, values


def recompute_logprobs(models, state, frozen, samples: "Rollout"):
    """[B, N] the policy's log-probs of a rollout's response tokens by a full forward pass: what
    the sampler's log-probs are checked against every logprob_check_every-th iteration."""
    policy = lora.combine(state.params["policy"], frozen["ref"], models.config.get("lora"))
    logprobs, _, _ = forward(models, policy, None, samples.tokens, samples.attention_mask, samples.prompt_len,
                             with_values=False)
    return jnp.where(samples.response_mask.astype(bool), logprobs, 0.0)


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


def rollout(models, state, frozen, prompts, rng, batch_sharding=None, vmap_axis=None) -> Rollout:
    """Sample and evaluate one batch of responses. Pure; jitted by `make_rollout`.

    prompts: dict(prompt_tokens, prompt_mask) [Bp, P]; each prompt is repeated
    `samples_per_prompt` (K) times, consecutively, so B = Bp * K and rows b*K ... b*K+K-1 share
    a prompt. frozen: dict(ref=reference params, reward=reward-model params or None).
    """
    c = models.config
    k = c.samples_per_prompt
    policy = lora.combine(state.params["policy"], frozen["ref"], c.get("lora"))  # LoRA: adapters on the reference
    value = state.params["value"]
    prompt_tokens = jnp.repeat(prompts["prompt_tokens"], k, axis=0)
    prompt_mask = jnp.repeat(prompts["prompt_mask"], k, axis=0)
    if batch_sharding is not None:  # the repeated batch is split over the devices
        prompt_tokens, prompt_mask = jax.lax.with_sharding_constraint((prompt_tokens, prompt_mask), batch_sharding)
    p = prompt_tokens.shape[1]
    out = sampling.generate(models.sampler_graphdef, policy, prompt_tokens, prompt_mask, rng,
                            max_new_tokens=c.max_new_tokens, eos_id=models.eos_id, pad_id=models.pad_id,
                            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, vmap_axis=vmap_axis)
    response, mask = out["response"], out["response_mask"].astype(bool)
    ends = (response == models.eos_id) & mask
    if models.truncate_id >= 0:  # Cut after the first truncate token; it counts as an end.
        ends = ends | ((response == models.truncate_id) & mask)
        after_end = jnp.cumsum(ends, axis=1) - ends > 0
        mask = mask & ~after_end
        response = jnp.where(mask, response, models.pad_id)
    tokens = jnp.concatenate([prompt_tokens, response], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, mask.astype(jnp.int32)], axis=1)

    sampler_logprobs = jnp.where(mask, out["logprobs"], 0.0)
    # The policy forward runs only where something needs it: a value head on the policy, or the
    # TIS correction (train-precision log-probs). Then its log-probs are the old ones (the KL to
    # the reference at the first iteration is exactly 0); otherwise the sampler's are.
    old_logprobs, tis = sampler_logprobs, jnp.ones_like(sampler_logprobs)
    if c.rollout_correction == "tis" or (models.uses_value and c.value_model == "policy"):
        recomputed, _, values = forward(models, policy, value, tokens, attention_mask, p)
        old_logprobs = jnp.where(mask, recomputed, 0.0)
        if c.rollout_correction == "tis":
            tis = losses.tis_weights(old_logprobs, sampler_logprobs, mask, c.rollout_correction_cap)
    else:
        values = value_forward(models, value, tokens, attention_mask, p)
    ref_logprobs, _, _ = forward(models, frozen["ref"], None, tokens, attention_mask, p, with_values=False)
    reward_model_scores = None
    if models.reward_graphdef is not None:
        reward = frozen["reward"]
        if models.reward_lora is not None:  # the reward run's adapters and head on the reference's trunk
            trunk = type(frozen["ref"])({k: v for k, v in frozen["ref"].items() if k != "unembed"})
            reward = lora.combine(reward, trunk, models.reward_lora)
        reward_model_scores = model_lib.reward_scores(models.reward_graphdef, reward,
                                                      *left_align(tokens, attention_mask)).astype(jnp.float32)
    return Rollout(tokens=tokens, attention_mask=attention_mask, response=response,
                   response_mask=mask.astype(jnp.int32), sampler_logprobs=sampler_logprobs, logprobs=old_logprobs,
                   tis_weights=tis, ref_logprobs=jnp.where(mask, ref_logprobs, 0.0),
                   values=jnp.where(mask, values, 0.0), has_eos=jnp.any(ends & mask, axis=1),
                   reward_model_scores=reward_model_scores)


# ----------------------------------------------------------------------------- scores and advantages


def final_scores(models, raw_scores, has_eos, lengths):
    """The score the advantages use, from the reward's raw score: the one place a score changes.

    raw_scores: [B] the reward model's output at the last real token, or the reward function's
    value. has_eos: [B] bool. lengths: [B] response lengths in tokens. Returns [B] float32: the
    reward run's normalisation (score - mean) / std (the identity with a reward function, or
    use_reward_normalization off), then with missing_eos='penalty' a response that never ended
    scores missing_eos_penalty, then with overlong_buffer > 0 DAPO's soft overlong punishment
    (overlong_penalty_factor * losses.overlong_penalty, L_max = max_new_tokens) is added.
    """
    c = models.config
    scores = (raw_scores.astype(jnp.float32) - models.reward_mean) / models.reward_std
    if c.missing_eos == "penalty":
        scores = jnp.where(has_eos, scores, c.missing_eos_penalty)
    if c.overlong_buffer:
        scores = scores + c.overlong_penalty_factor * losses.overlong_penalty(
            lengths, max_len=c.max_new_tokens, cache_len=c.overlong_buffer)
    return scores


def compute_advantages(config, samples: Rollout, scores, kl_coef, baseline):
    """Rewards and advantages of a rollout. Pure; runs inside the jitted update.

    scores: [B] final scores (`final_scores`). kl_coef: scalar beta, in the reward only with
    kl_placement='reward'. baseline: [2] (EMA of the sequence reward, number of updates).
    Returns (Advantages, the new baseline).

    Advantage per loss: 'ppo' GAE; 'reinforce' the sequence reward; 'reinforce_baseline' minus
    an EMA; 'rloo' leave-one-out; 'grpo' minus the group mean, divided by the group's std
    (advantage_scaling 'group'), by the batch's std ('batch'; Liu et al. 2025 "Tricks or Traps"),
    or not at all ('none'; Dr. GRPO); 'reinforce_pp' each token's reward-to-go whitened over the
    batch (REINFORCE++). Rows with no real token (masked out by dynamic sampling or
    mask_truncated) do not enter the batch statistics.
    """
    mask = samples.response_mask.astype(bool)
    kl = jnp.where(mask, losses.kl_penalty(samples.logprobs, samples.ref_logprobs, config.kl_estimator), 0.0)
    reward_kl_coef = kl_coef if config.kl_placement == "reward" else jnp.zeros_like(kl_coef)
    rewards = losses.per_token_rewards(scores, kl, mask, reward_kl_coef)
    seq_reward = losses.masked_sum(rewards, mask, axis=1)  # score - beta * sum_t KL_t
    if config.whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)

    new_baseline = baseline
    seq_adv = jnp.zeros_like(seq_reward)
    if config.loss == "ppo":
        advantages, returns = losses.generalized_advantage_estimate(rewards, samples.values, mask,
                                                                    config.gamma, config.lam)
    elif config.loss == "reinforce_pp":
        advantages, returns = losses.reinforce_pp_advantages(rewards, mask), jnp.zeros_like(rewards)
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
        elif config.loss == "rloo":
            seq_adv = losses.rloo_advantages(seq_reward.reshape(-1, config.samples_per_prompt)).reshape(-1)
        else:  # grpo
            grouped = seq_reward.reshape(-1, config.samples_per_prompt)
            seq_adv = losses.grpo_advantages(grouped, scale=config.advantage_scaling == "group")
            if config.advantage_scaling == "batch":  # centred in the group, scaled by the batch
                rows = jnp.any(mask, axis=1).reshape(grouped.shape)
                seq_adv = seq_adv / (jnp.sqrt(losses.masked_var(grouped, rows)) + 1e-4)
            seq_adv = seq_adv.reshape(-1)
        advantages = jnp.where(mask, seq_adv[:, None], 0.0)  # every token shares its sequence's
    if config.whiten_advantages and config.loss == "ppo":
        advantages = losses.whiten(advantages, mask)
    return Advantages(kl=kl, rewards=rewards, advantages=advantages, returns=returns,
                      seq_advantages=seq_adv), new_baseline


# ----------------------------------------------------------------------------- update


def minibatch_loss(models, params, samples: Rollout, adv: Advantages, prompt_len: int, kl_coef, ref=None):
    """Loss of one minibatch (the rows of `samples` and `adv` it holds): policy objective
    [+ kl_coef * KL to the reference, with kl_placement='loss'] + vf_coef * value loss
    - entropy_coef * entropy. params: {'policy', 'value'}; ref: the reference params, which LoRA
    adapters are added to.

    The objective of CLIPPED_LOSSES is losses.policy_loss (config.objective, clip_low/high,
    aggregation); 'reinforce', 'reinforce_baseline' and 'rloo' are REINFORCE, -A * log p(sequence)
    (their clip numbers are still logged). A KL term in the loss is aggregated like the objective.
    """
    c = models.config
    mask = samples.response_mask.astype(bool)
    policy = lora.combine(params["policy"], ref, c.get("lora"))
    logprobs, entropy, values = forward(models, policy, params["value"], samples.tokens,
                                        samples.attention_mask, prompt_len)
    max_len = c.max_len or None
    tis = samples.tis_weights if c.rollout_correction == "tis" else None
    clipped_loss, pm = losses.policy_loss(logprobs, samples.logprobs, adv.advantages, mask, kind=c.objective,
                                          clip_low=c.clip_low, clip_high=c.clip_high, aggregation=c.aggregation,
                                          max_len=max_len, token_weights=tis)
    if c.loss in CLIPPED_LOSSES:
        policy_loss = clipped_loss
    else:
        weighted = logprobs if tis is None else logprobs * samples.tis_weights
        policy_loss = losses.reinforce_loss(losses.masked_sum(weighted, mask, axis=1), adv.seq_advantages)
    kl_loss = jnp.zeros(())
    if c.kl_placement == "loss":  # GRPO: beta * KL(policy || reference) per token, in the loss
        kl = losses.kl_penalty(jnp.where(mask, logprobs, 0.0), jnp.where(mask, samples.ref_logprobs, 0.0),
                               c.kl_estimator)
        kl_loss = losses.aggregate_token_terms(kl, mask, c.aggregation, max_len)
    value_loss, vm = (losses.ppo_value_loss(values, samples.values, adv.returns, mask, c.value_clip)
                      if models.uses_value else (jnp.zeros(()), {"value_clipfrac": jnp.zeros(())}))
    mean_entropy = losses.masked_mean(entropy, mask)
    loss = policy_loss + kl_coef * kl_loss + c.vf_coef * value_loss - c.entropy_coef * mean_entropy
    metrics = {"policy/approxkl_avg": pm["approx_kl"], "policy/clipfrac_avg": pm["clip_ratio/region_mean"],
               "policy/clip_ratio/low_mean": pm["clip_ratio/low_mean"],
               "policy/clip_ratio/high_mean": pm["clip_ratio/high_mean"],
               "loss/policy_avg": policy_loss, "loss/kl_avg": kl_loss, "loss/value_avg": value_loss,
               "val/ratio": pm["ratio_mean"], "val/clipfrac_avg": vm["value_clipfrac"],
               "policy/entropy_avg": mean_entropy}
    return loss, metrics


def zero_spread_groups(scores, samples_per_prompt: int):
    """[G] bool: the groups (K consecutive rows of [G * K] scores) whose K scores are all equal,
    which a group baseline gives no gradient."""
    grouped = scores.reshape(-1, samples_per_prompt)
    return jnp.all(grouped == grouped[:, :1], axis=1)


def keep_informative_groups(samples: Rollout, scores, samples_per_prompt: int, num_groups: int):
    """DAPO's dynamic sampling with static shapes: of the G sampled groups (K rows each), keep
    `num_groups`, those whose K scores are not all equal first (in sampling order); when fewer
    than `num_groups` are, the remaining slots hold zero-spread groups with their response masks
    zeroed, so they add nothing to the loss or the batch statistics.

    samples: a Rollout of G * K rows; scores: [G * K]. Returns (samples of num_groups * K rows,
    their scores, kept [num_groups] bool: the slot holds an informative group).
    """
    informative = ~zero_spread_groups(scores, samples_per_prompt)  # [G]
    order = jnp.argsort(~informative, stable=True)[:num_groups]
    kept = informative[order]
    rows = (order[:, None] * samples_per_prompt + jnp.arange(samples_per_prompt)).reshape(-1)
    samples = jax.tree.map(lambda x: x[rows], samples)
    keep_rows = jnp.repeat(kept, samples_per_prompt)[:, None]
    return samples.replace(response_mask=samples.response_mask * keep_rows), scores[rows], kept


def ppo_update(models, optimizer, mesh, state: TrainState, samples: Rollout, scores, rng, ref=None):
    """compute_advantages, then `ppo_epochs` epochs x `num_minibatches` shuffled minibatch steps,
    then the KL-coefficient update. Pure; jitted by `make_update` with the state donated.

    scores: [B] final scores. ref: the reference params (read with LoRA only). One optimizer steps the policy and the value params together, so
    its gradient clip (config.optimizer.grad_clip_norm) is by their joint global norm; Adam is
    elementwise, so this is the update two Adams over the two would make.
    Returns (state, metrics).
    """
    c = models.config
    # What was sampled, before anything is dropped: the logged scores, KL and lengths.
    sampled, sampled_scores = samples, scores
    mask = samples.response_mask.astype(bool)
    sampled_kl = jnp.where(mask, losses.kl_penalty(samples.logprobs, samples.ref_logprobs, c.kl_estimator), 0.0)
    extra = {}
    if c.samples_per_prompt > 1:  # TRL's name: groups carrying no gradient under a group baseline
        extra["frac_reward_zero_std"] = jnp.mean(zero_spread_groups(scores, c.samples_per_prompt).astype(jnp.float32))
    if c.mask_truncated:  # a response cut off by max_new_tokens is not trained on (DAPO's overlong filtering)
        samples = samples.replace(response_mask=samples.response_mask * samples.has_eos[:, None])
    if c.dynamic_sampling:
        samples, scores, kept = keep_informative_groups(samples, scores, c.samples_per_prompt, c.batch_size)
        extra["dynamic_sampling/kept_fraction"] = jnp.mean(kept.astype(jnp.float32))
    batch = samples.response.shape[0]
    adv, baseline = compute_advantages(c, samples, scores, state.kl_coef, state.baseline)
    m = c.num_minibatches
    if batch % m:
        raise config_lib.ConfigError(f"rollout batch {batch} is not divisible by num_minibatches={m}")
    batch_sharding = mesh_lib.batch_sharding(mesh)

    def minibatch_step(carry, idx):
        params, opt_state = carry
        mb_samples, mb_adv = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[idx], batch_sharding),
                                          (samples, adv))
        grad_fn = jax.value_and_grad(minibatch_loss, argnums=1, has_aux=True)
        (_, metrics), grads = grad_fn(models, params, mb_samples, mb_adv, samples.prompt_len, state.kl_coef, ref)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)  # before the clip
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch(carry, key):
        order = jax.random.permutation(key, batch).reshape(m, batch // m)
        return jax.lax.scan(minibatch_step, carry, order)

    (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state),
                                                jax.random.split(rng, c.ppo_epochs))
    metrics = jax.tree.map(jnp.mean, metrics)

    kl_sum = losses.masked_sum(sampled_kl, mask, axis=1)  # [B] over every sampled response
    beta = state.kl_coef if c.kl_placement != "none" else jnp.zeros_like(state.kl_coef)
    non_score = -beta * kl_sum
    mean_kl = jnp.mean(kl_sum)
    kl_coef = state.kl_coef
    if c.adaptive_kl:
        kl_coef = losses.adaptive_kl_coef(kl_coef, mean_kl, c.kl_target, c.kl_horizon, sampled.has_eos.shape[0])
    lengths = jnp.sum(mask, axis=1)
    metrics.update({
        "objective/scores": jnp.mean(sampled_scores),
        "objective/kl": mean_kl,
        "objective/entropy": jnp.mean(losses.masked_sum(-sampled.logprobs, mask, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(sampled_scores + non_score),
        "objective/kl_coef": beta,
        "val/num_eos_tokens": jnp.sum(sampled.has_eos),
        "val/mean_response_length": jnp.mean(lengths),
        "val/advantage_mean": losses.masked_mean(adv.advantages, samples.response_mask.astype(bool)),
        **extra,
        **({"rollout/tis_weight_mean": losses.masked_mean(sampled.tis_weights, mask)}
           if c.rollout_correction == "tis" else {}),
    })
    return state.replace(params=params, opt_state=opt_state, kl_coef=kl_coef, baseline=baseline), metrics


def make_rollout(models, mesh, state_shardings, frozen_shardings):
    """jit(rollout)(state, frozen, prompts, rng) -> Rollout sharded on the batch axes.

    The prompts come as placed by `place_prompts` (split, or replicated when there are fewer
    prompts than devices, e.g. 4 prompts x K=4 samples on 8 devices). With num_seeds > 1,
    state, prompts, rng and the rollout carry a leading seed axis; frozen is shared."""
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
        return jax.tree.map(lambda x: mesh_lib.put_global(x, sharding), prompts)
    return mesh_lib.shard_batch(prompts, mesh)


def make_update(models, optimizer, mesh, state_shardings, frozen_shardings):
    """jit(ppo_update)(state, samples, scores, rng, ref) -> (state, metrics); the state buffers
    are donated, the reference (`frozen['ref']`, read with LoRA) is not. With num_seeds > 1 it
    is vmapped over the seed axis and the metrics are run.seed_summary's mean and `_std`."""
    fn = functools.partial(ppo_update, models, optimizer, mesh)
    batch = mesh_lib.batch_sharding(mesh)
    if models.config.num_seeds > 1:
        per_seed, batch = jax.vmap(fn, in_axes=(0, 0, 0, 0, None)), mesh_lib.stacked(batch)

        def fn(state, samples, scores, rng, ref):
            state, metrics = per_seed(state, samples, scores, rng, ref)
            return state, metrics_lib.seed_summary(metrics)

    return jax.jit(fn, in_shardings=(state_shardings, batch, batch, None, frozen_shardings["ref"]),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_recompute_logprobs(models, mesh, state_shardings, frozen_shardings):
    """jit(recompute_logprobs)(state, frozen, samples) -> [B, N] (a leading seed axis with seeds)."""
    fn = functools.partial(recompute_logprobs, models)
    batch = mesh_lib.batch_sharding(mesh)
    if models.config.num_seeds > 1:
        fn, batch = jax.vmap(fn, in_axes=(0, None, 0)), mesh_lib.stacked(batch)
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batch), out_shardings=batch)


def logprob_check_metrics(samples: Rollout, recomputed) -> dict:
    """How far the sampler's log-probs (the update's old ones) are from a forward pass's, over
    every real response token: rollout/logprob_diff_max and rollout/logprob_diff_mean."""
    sampler, recomputed, mask = mesh_lib.host_copy((samples.sampler_logprobs, recomputed, samples.response_mask))
    diff = np.abs(np.asarray(sampler, np.float64) - np.asarray(recomputed, np.float64))[np.asarray(mask).astype(bool)]
    return {"rollout/logprob_diff_max": float(diff.max()) if diff.size else 0.0,
            "rollout/logprob_diff_mean": float(diff.mean()) if diff.size else 0.0}


# ----------------------------------------------------------------------------- setup


def state_shardings_of(mesh, state, num_seeds: int):
    """Param shardings of one seed's state; with seeds, the seed axis is unsplit in front."""
    if num_seeds == 1:
        return mesh_lib.param_shardings(mesh, state)
    one_seed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    return mesh_lib.stacked(mesh_lib.param_shardings(mesh, one_seed))


def init_models(config, tokenizer, optimizer):
    """Load the SFT policy (the reference is the same params, kept frozen) and the reward model,
    and make each seed's value function.

    Returns (models, state, frozen): the train state is stacked on a leading seed axis when
    num_seeds > 1; frozen = dict(ref=reference params, reward=reward-model params or None).
    """
    model_config, graphdef, policy = runs.load_matching_policy(config.init_from, config.model, "ppo",
                                                               config.get("init_from_unfinished", False))
    reference = runs.load_reference(config, policy, "ppo")
    reward_graphdef, reward_params, normalization = None, None, {"mean": 0.0, "std": 1.0}
    reward_lora = None
    if config.reward_model:
        reward_config = config_lib.read_resolved_config(config.reward_model)
        if (lora.enabled(reward_config.get("lora")) and not (config.loss == "ppo" and config.value_model == "reward_model")
                and not config.get("reference_from")  # the reference must be init_from's weights
                and os.path.realpath(reward_config.init_from) == os.path.realpath(config.init_from)):
            reward_lora = reward_config.lora  # hold its adapters only: the trunk is the reference's
        _, reward_graphdef, reward_params, reward_normalization = runs.load_reward_model(
            config.reward_model, merge_lora=reward_lora is None)
        if config.use_reward_normalization:
            normalization = reward_normalization

    def value_function(seed):
        """(graphdef, params) of one seed's value function; (None, None) without one."""
        if config.loss != "ppo":
            return None, None
        if config.value_model == "policy":
            value_graphdef, with_head = model_lib.add_scalar_head(graphdef, policy, model_config, seed)
            return value_graphdef, with_head["scalar_head"]
        if config.value_model == "sft":
            return model_lib.replace_head_with_scalar(graphdef, policy, model_config, seed)
        return reward_graphdef, reward_params

    states = []
    for seed in run_lib.seeds_of(config):
        value_graphdef, value_params = value_function(seed)
        # Own copies: the reference and the reward model keep the loaded arrays; the update donates these.
        # With LoRA the policy is adapters on the reference (which then is the base, held once).
        trainable_policy = lora.split(policy, config.get("lora"), seed)[0]
        params = jax.tree.map(jnp.array, {"policy": trainable_policy, "value": value_params})
        states.append(TrainState(params=params, opt_state=optimizer.init(params), kl_coef=jnp.float32(config.kl_coef),
                                 baseline=jnp.zeros([2], jnp.float32)))
    state = states[0] if config.num_seeds == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    models = Models(config, graphdef, value_graphdef, reward_graphdef, tokenizer, normalization, reward_lora)
    return models, state, {"ref": reference, "reward": reward_params}


def prompt_source(config):
    """The prompts: `config.prompts` if given, else the 'prompt' field of config.data's split."""
    if config.prompts:
        return [{"prompt": p} for p in config.prompts]
    data = builders.load_dataset(config.data, config.data_dir)
    return data[config.prompt_split]


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a PPO run is made of, as `build(config)` makes it (placed on the mesh)."""

    config: object
    mesh: jax.sharding.Mesh
    tokenizer: object
    models: Models
    state: TrainState                # the initial train state
    frozen: dict                     # dict(ref=reference params, reward=reward-model params or None)
    rollout: Callable                # (state, frozen, prompts, rng) -> Rollout
    final_scores: Callable           # (raw_scores, has_eos, lengths) -> scores
    update: Callable                 # (state, samples, scores, rng, ref) -> (state, metrics)
    recompute_logprobs: Callable     # (state, frozen, samples) -> [B, N] the policy forward's log-probs
    reward_function: Callable | None  # host (prompt, response) -> raw score, or None (reward model)
    gold_function: Callable | None   # host (prompt, response) -> gold score, logged only
    batch_fn: Callable               # step -> dict(step, prompts (placed), texts)
    rng: jax.Array                   # the run's key, or one key per seed
    eval_batch: dict | None          # held-out prompts as batch_fn gives them (eval_every > 0), else None


def build(config) -> Setup:
    """The models, the initial state, the jitted functions and the prompt batches of a PPO run."""
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = make_tokenizer(config.tokenizer)
    optimizer = make_optimizer(config.optimizer)
    models, state, frozen = init_models(config, tokenizer, optimizer)
    state_shardings = state_shardings_of(mesh, state, config.num_seeds)
    frozen_shardings = mesh_lib.param_shardings(mesh, frozen)
    state, frozen = jax.device_put(state, state_shardings), jax.device_put(frozen, frozen_shardings)

    source = prompt_source(config)
    prompts_per_step = config.batch_size * (config.oversample if config.dynamic_sampling else 1)
    prompt_batches = [loaders.prompt_batches(source, tokenizer, config.max_prompt_len, prompts_per_step, seed)
                      for seed in run_lib.seeds_of(config)]  # each seed draws prompts in its own order

    def batch_fn(step):
        per_seed = [batches[step] for batches in prompt_batches]
        prompts = {key: np.stack([b[key] for b in per_seed]) for key in ("prompt_tokens", "prompt_mask")}
        texts = [loaders.prompt_texts(source, b["index"]) for b in per_seed]
        if config.num_seeds == 1:
            prompts, texts = {key: v[0] for key, v in prompts.items()}, texts[0]
        return {"step": step, "prompts": place_prompts(prompts, mesh, config.num_seeds), "texts": texts}

    eval_batch = None
    if config.eval_every:  # the same held-out prompts for every seed and every evaluation
        held_out = builders.load_dataset(config.data, config.data_dir)[config.eval_split]
        b = loaders.prompt_batches(held_out, tokenizer, config.max_prompt_len,
                                   min(config.num_eval_prompts, len(held_out)), seed=0, shuffle=False)[0]
        prompts = {key: b[key] for key in ("prompt_tokens", "prompt_mask")}
        texts = loaders.prompt_texts(held_out, b["index"])
        if config.num_seeds > 1:
            prompts, texts = {key: np.stack([v] * config.num_seeds) for key, v in prompts.items()}, [texts] * config.num_seeds
        eval_batch = {"prompts": place_prompts(prompts, mesh, config.num_seeds), "texts": texts}

    # With seeds, one key per seed: seed i gets the step keys the run `seed + i` gets alone.
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(run_lib.seeds_of(config)))
    return Setup(config=config, mesh=mesh, tokenizer=tokenizer, models=models, state=state, frozen=frozen,
                 rollout=make_rollout(models, mesh, state_shardings, frozen_shardings),
                 final_scores=jax.jit(functools.partial(final_scores, models)),
                 update=make_update(models, optimizer, mesh, state_shardings, frozen_shardings),
                 recompute_logprobs=make_recompute_logprobs(models, mesh, state_shardings, frozen_shardings),
                 reward_function=labelers.load_function(config.reward_function) if config.reward_function else None,
                 gold_function=labelers.load_function(config.gold_function) if config.gold_function else None,
                 batch_fn=batch_fn, eval_batch=eval_batch,
                 rng=seed_keys if config.num_seeds > 1 else seed_keys[0])


# ----------------------------------------------------------------------------- the step


def _host_scores(fn, prompts: list[str], responses: list[str]) -> np.ndarray:
    return np.asarray([float(fn(p, r)) for p, r in zip(prompts, responses)], np.float32)


def sample_table(prompts, responses, scores, gold, num_rows: int) -> str:
    """One line per response: its final score, its gold score (if any), prompt -> response."""
    rows = []
    for i in range(min(num_rows, len(responses))):
        gold_text = "" if gold is None else f"  gold={gold[i]:+.3f}"
        rows.append(f"score={scores[i]:+.3f}{gold_text}  {prompts[i]!r} -> {responses[i]!r}")
    return "\n".join(rows)


@dataclasses.dataclass
class Decoded:
    """The text of this process's rows of a rollout (mesh.local_block; all rows on one process).

    prompts, responses   one string per row (seed 0's rows first with num_seeds > 1)
    block                the rows' block of the global [B] (or [S, B]) arrays
    """

    prompts: list[str]
    responses: list[str]
    block: tuple

    def scores(self, fn, like):
        """fn(prompt, response) of each row, assembled into a global array shaped like `like`."""
        local = _host_scores(fn, self.prompts, self.responses)
        shape = tuple(b.stop - b.start for b in self.block)
        return mesh_lib.from_local_block(local.reshape(shape), like=like)


def decode(setup: Setup, samples: Rollout, texts) -> Decoded:
    """Decode a rollout's responses and pair them with their prompts (K consecutive rows per
    prompt, the seeds one after another). texts: prompt strings, one list per seed with seeds."""
    c = setup.config
    block, response = mesh_lib.local_block(samples.response)
    _, mask = mesh_lib.local_block(samples.response_mask)
    n = response.shape[-1]
    responses = sampling.decode_responses(setup.tokenizer, response.reshape(-1, n), mask.reshape(-1, n))
    prompts = [t for seed_texts in (texts if c.num_seeds > 1 else [texts]) for t in seed_texts
               for _ in range(c.samples_per_prompt)]
    prompts = np.asarray(prompts, object).reshape(samples.has_eos.shape)[block[:-1]].reshape(-1).tolist()
    return Decoded(prompts=prompts, responses=responses, block=block[:-1])


def score_metrics(config, raw_scores, lengths, prefix: str) -> dict:
    """Mean raw score and, with a reward function, the mean length of the correct (raw score >=
    config.correct_score) and of the other responses: what the Dr. GRPO paper tracks. A length
    metric is left out of a step with no such response (of any seed). raw_scores, lengths: [B]
    (or [S, B]) global arrays; mean and `_std` over the seeds with seeds."""
    raw, lengths = (np.asarray(x, np.float64).reshape(config.num_seeds, -1)
                    for x in mesh_lib.host_copy((raw_scores, lengths)))
    per_seed = {f"{prefix}scores": raw.mean(axis=1)}
    if config.reward_function:
        correct = raw >= config.correct_score
        for name, where in (("length_correct", correct), ("length_incorrect", ~correct)):
            has = where.any(axis=1)
            if has.any():  # the seeds that have such responses
                per_seed[prefix + name] = ((lengths * where).sum(axis=1) / np.maximum(where.sum(axis=1), 1))[has]
    return seed_metrics(per_seed, config.num_seeds)


def seed_metrics(per_seed: dict, num_seeds: int) -> dict:
    """Host metrics {name: [S] values}: mean and `_std` over the seeds, or the one seed's value."""
    if num_seeds > 1:
        return metrics_lib.seed_summary(per_seed)
    return {k: float(v[0]) for k, v in per_seed.items()}


def raw_scores_of(setup: Setup, samples: Rollout, decoded: Decoded | None):
    """The reward's raw scores [B] of a rollout: the reward model's (computed in the rollout) or
    the host reward function's on the decoded text."""
    if setup.reward_function is None:
        return samples.reward_model_scores
    return decoded.scores(setup.reward_function, like=samples.has_eos)


def evaluate_held_out(setup: Setup, state: TrainState, rng) -> dict:
    """eval/scores (the mean raw reward: accuracy with a verifier), eval/length_correct and
    eval/length_incorrect of `samples_per_prompt` samples at the training temperature on each of
    the held-out prompts (config.eval_split), by the policy in `state`."""
    samples = setup.rollout(state, setup.frozen, setup.eval_batch["prompts"], rng)
    decoded = decode(setup, samples, setup.eval_batch["texts"]) if setup.reward_function else None
    lengths = jnp.sum(samples.response_mask, axis=-1)
    return score_metrics(setup.config, raw_scores_of(setup, samples, decoded), lengths, "eval/")


def ppo_step(setup: Setup, state: TrainState, batch, rng):
    """One iteration: [held-out evaluation] -> jitted rollout -> raw scores (host, with a reward
    function) -> jitted final_scores -> jitted update. No effect beyond its outputs (and
    donating `state`'s buffers).

    batch: setup.batch_fn(step): dict(step, prompts (placed), texts (prompt strings; one list
    per seed with num_seeds > 1)). rng: this step's key, or with seeds one key per seed
    (run.step_rng). Returns (state, metrics, sample table): the table (text, seed 0) at every
    `sample_every`-th step, else None. At every `eval_every`-th step the policy is evaluated on
    the held-out prompts before it is updated (eval/* metrics: the policy after `step` updates).
    """
    c = setup.config
    seeded = c.num_seeds > 1
    keys = (jax.vmap(jax.random.split) if seeded else jax.random.split)(rng)
    held_out = {}
    if c.eval_every and batch["step"] % c.eval_every == 0:  # (before the update donates the state)
        eval_key = (jax.vmap(jax.random.fold_in, (0, None)) if seeded else jax.random.fold_in)(keys[..., 0], 1)
        held_out = evaluate_held_out(setup, state, eval_key)
    samples = setup.rollout(state, setup.frozen, batch["prompts"], keys[..., 0])

    want_table = c.sample_every and batch["step"] % c.sample_every == 0
    decoded = gold = None
    if setup.reward_function is not None or setup.gold_function is not None or want_table:
        decoded = decode(setup, samples, batch["texts"])
    raw_scores = raw_scores_of(setup, samples, decoded)
    lengths = jnp.sum(samples.response_mask, axis=-1)
    scores = setup.final_scores(raw_scores, samples.has_eos, lengths)
    check = {}
    # At iterations N, 2N, ... (logged rows N, 2N): a run shorter than N never compiles the check.
    if c.logprob_check_every and (batch["step"] + 1) % c.logprob_check_every == 0:  # (before the update donates the state)
        check = logprob_check_metrics(samples, setup.recompute_logprobs(state, setup.frozen, samples))
    state, metrics = setup.update(state, samples, scores, keys[..., 1], setup.frozen["ref"])
    metrics.update(held_out, **check)
    if setup.reward_function is not None:
        metrics.update(score_metrics(c, raw_scores, lengths, "val/"))

    if setup.gold_function is not None:
        gold = mesh_lib.host_copy(decoded.scores(setup.gold_function, like=samples.has_eos))
        per_seed = np.asarray(gold, np.float32).reshape(c.num_seeds, -1).mean(axis=1)
        metrics.update(seed_metrics({"objective/gold_scores": per_seed}, c.num_seeds))
    table = None
    if want_table:
        b = len(decoded.responses) // c.num_seeds  # seed 0's rows (of this process)
        table = sample_table(decoded.prompts[:b], decoded.responses[:b], mesh_lib.local_block(scores)[1].reshape(-1)[:b],
                             None if gold is None else gold.reshape(-1)[:b], c.num_sample_rows)
    return state, metrics, table


# ----------------------------------------------------------------------------- the stage


def train(config, workdir: str):
    setup = build(config)
    # The sample tables go to samples.txt and to TensorBoard through a writer of their own
    # (train_loop's is not handed to a step; TensorBoard reads every event file in tb/).
    tensorboard = None
    if config.sample_every and distributed.is_main_process():
        tensorboard = SummaryWriter(os.path.join(workdir, "tb"), filename_suffix=".samples")

    def step_fn(state, batch, rng):
        """`ppo_step` in train_loop's (state, metrics) form: the sample table is written as it is made."""
        state, metrics, table = ppo_step(setup, state, batch, rng)
        if table is not None and tensorboard is not None:  # (process 0 writes)
            tensorboard.add_text("samples", table, batch["step"])
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(f"--- step {batch['step']}\n{table}\n")
        return state, metrics

    try:
        state = run_lib.train_loop(
            workdir=workdir, state=setup.state, step_fn=step_fn, batch_fn=setup.batch_fn,
            num_steps=config.num_steps, rng=setup.rng, log_every=config.log_every,
            checkpoint_every=config.checkpoint_every, progress_every_s=config.get("progress_every_s", 10.0),
            headline=("objective/scores", "objective/gold_scores", "objective/kl", "objective/kl_coef",
                      "val/num_eos_tokens"))
    finally:
        if tensorboard is not None:
            tensorboard.close()
    # The hand-off is merged: with LoRA the adapters folded into the reference (their base).
    merge = jax.jit(lambda trainable, ref: lora.combine(trainable, ref, config.get("lora")))
    policy = state.params["policy"]
    if lora.enabled(config.get("lora")):
        ref = setup.frozen["ref"]
        policy = jax.vmap(merge, (0, None))(policy, ref) if config.num_seeds > 1 else merge(policy, ref)
    runs.write_policy(workdir, config, policy, members=config.num_seeds)
    return state


# ----------------------------------------------------------------------------- the checkpointed state (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of a PPO run's TrainState, from its config alone (for Orbax)."""
    _, policy = model_lib.abstract_params(config.model, "lm")
    policy = jax.eval_shape(lambda p: lora.split(p, config.get("lora"), 0)[0], policy)
    value = None
    if config.loss == "ppo":
        if config.value_model == "policy":
            value = model_lib.abstract_params(config.model, "lm_and_scalar")[1]["scalar_head"]
        elif config.value_model == "sft":
            value = model_lib.abstract_params(config.model, "scalar")[1]
        else:
            reward_config = config_lib.read_resolved_config(config.reward_model)
            value = model_lib.abstract_params(reward_config.model, "scalar")[1]
    params = {"policy": policy, "value": value}
    state = TrainState(params=params, opt_state=jax.eval_shape(make_optimizer(config.optimizer).init, params),
                       kl_coef=jax.ShapeDtypeStruct((), jnp.float32), baseline=jax.ShapeDtypeStruct((2,), jnp.float32))
    seeds = config.get("num_seeds", 1)
    lead = (seeds,) if seeds > 1 else ()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype), state)


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_config(c):
    """PPO's fields, and the checks that combine them."""
    run_lib.check_loop_config(c), check_optimizer_config(c), model_lib.check_model_config(c)
    mesh_lib.mesh_devices(c)
    sampling.check_sampling_config(c, "")
    c.choice("loss", LOSSES)
    c.choice("value_model", VALUE_MODELS)
    c.choice("missing_eos", MISSING_EOS)
    c.choice("kl_estimator", losses.KL_KINDS)
    c.choice("objective", losses.POLICY_LOSS_KINDS)
    c.choice("aggregation", losses.POLICY_LOSS_AGGREGATIONS)
    c.choice("kl_placement", KL_PLACEMENTS)
    c.choice("advantage_scaling", ADVANTAGE_SCALINGS)
    c.integer("samples_per_prompt", 1)
    if c.get("loss") in GROUP_LOSSES or c.get("dynamic_sampling"):
        c.integer("samples_per_prompt", 2)
    if c.get("clip_eps") is not MISSING:
        c.fail("clip_eps", c.get("clip_eps"), "split into clip_low and clip_high (DAPO's clip-higher): set those")
    c.number("clip_low", 0.0, 1.0, high_open=True)
    c.number("clip_high", 0.0)
    c.integer("max_len", 0)
    if c.get("aggregation") == "seq_mean_token_sum_norm" and not c.get("max_len"):
        c.fail("max_len", c.get("max_len"), "aggregation='seq_mean_token_sum_norm' (Dr. GRPO) divides each "
               "response's token sum by max_len: set it > 0 (e.g. to max_new_tokens)")
    if c.get("advantage_scaling") not in (MISSING, "group") and c.get("loss") != "grpo":
        c.fail("advantage_scaling", c.get("advantage_scaling"), f"applies to loss='grpo' only (loss={c.get('loss')!r})")
    for key in ("dynamic_sampling", "mask_truncated"):
        c.boolean(key)
    c.integer("logprob_check_every", 0)
    c.choice("rollout_dtype", ("", "float32", "bfloat16"))
    c.choice("rollout_correction", ROLLOUT_CORRECTIONS)
    c.number("rollout_correction_cap", 1.0)
    c.integer("oversample", 1)
    c.integer("overlong_buffer", 0)
    if c.get("overlong_buffer") and c.get("overlong_buffer") > c.get("max_new_tokens"):
        c.fail("overlong_buffer", c.get("overlong_buffer"), f"expected at most max_new_tokens={c.get('max_new_tokens')}")
    c.number("overlong_penalty_factor", 0.0)
    for key in ("ppo_epochs", "num_minibatches"):
        c.integer(key, 1)
    for key in ("kl_coef", "vf_coef", "entropy_coef", "value_clip"):
        c.number(key, 0.0)
    c.positive("kl_target")
    c.positive("kl_horizon")
    c.number("gamma", 0.0, 1.0)
    c.number("lam", 0.0, 1.0)
    c.number("baseline_decay", 0.0, 1.0)
    c.integer("sample_every", 0)
    c.integer("eval_every", 0)
    if c.get("eval_every"):
        c.integer("num_eval_prompts", 1)
        if c.get("prompts"):
            c.fail("eval_every", c.get("eval_every"), "the held-out evaluation reads config.data's eval_split: "
                   "it needs config.prompts empty")
    c.number("correct_score", -math.inf)
    c.integer("num_sample_rows", 0)
    if bool(c.get("reward_model")) == bool(c.get("reward_function")):
        c.fail("reward_function", c.get("reward_function"),
               "set exactly one of reward_model (a reward run) and reward_function")
    if c.get("loss") == "ppo" and c.get("value_model") == "reward_model" and not c.get("reward_model"):
        c.fail("value_model", "reward_model", "needs a reward_model run")
    c.function_path("reward_function")
    c.function_path("gold_function")
    runs.check_init_from(c, required=True)
    lora.check_lora_config(c)
    if c.get("lora.rank") and c.get("loss") == "ppo" and c.get("value_model") != "policy":
        c.fail("value_model", c.get("value_model"), "with LoRA expected 'policy' (a value head on the LoRA policy; "
               "a separate value model would be a second full copy of the weights)")
    if not c.get("prompts"):
        builders.check_dataset_config(c)
