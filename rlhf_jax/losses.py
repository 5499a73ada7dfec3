"""All shared losses and advantage estimators, as pure `jax.numpy` functions.

Conventions used throughout:

* Shapes: ``B`` batch, ``T`` time (tokens), ``V`` vocabulary, ``P`` prompts, ``K`` samples
  per prompt.
* Masks are boolean-like arrays (``1``/``True`` = a real token that counts). They are applied
  with ``jnp.where`` and never by multiplication: a NaN or inf in a masked-out position (for
  example the log-prob of a pad token) must not leak into a loss or a gradient, and
  ``NaN * 0`` is ``NaN``. Inputs are sanitised with ``jnp.where`` *before* any nonlinear op
  (``exp``, ``log``, square), so even the gradients at masked positions are exactly zero.
* Every loss returns ``(loss, metrics)``, where ``metrics`` is a flat dict of scalar arrays,
  computed inside the jitted step. The trainers rename them to the names the field logs
  under (``loss/policy_avg``, ``policy/clipfrac_avg``, ...).
* Log-probs, entropies and losses are computed in float32 whatever the input dtype (bf16
  logits lose too much precision in ``log_softmax``).
* The language-model losses here take [B, T, V] logits: they are the reference. The stages
  compute the same equations from hidden states in chunks of tokens, never holding [B, T, V]
  (``rlhf_jax.models.lm_head``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "whiten",
    "next_token_loss",
    "token_logprobs",
    "entropy_from_logits",
    "bradley_terry_loss",
    "dpo_loss",
    "DPO_KINDS",
    "generalized_advantage_estimate",
    "kl_penalty",
    "per_token_rewards",
    "ppo_value_loss",
    "reinforce_loss",
    "baseline_advantages",
    "rloo_advantages",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "overlong_penalty",
    "policy_loss",
    "tis_weights",
    "aggregate_token_terms",
    "POLICY_LOSS_KINDS",
    "POLICY_LOSS_AGGREGATIONS",
    "adaptive_kl_coef",
    "KL_KINDS",
]


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _bool(mask):
    return jnp.asarray(mask).astype(bool)


def masked_sum(x, mask, axis=None):
    """Sum of ``x`` over positions where ``mask`` is true. ``mask`` broadcasts against ``x``."""
    mask = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    return jnp.sum(jnp.where(mask, x, 0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over positions where ``mask`` is true (0 where nothing is selected).

    Args:
      x: array of any shape.
      mask: boolean-like array broadcastable to ``x``.
      axis: axis or axes to reduce; ``None`` reduces everything.
    Returns:
      the reduced mean, shape of ``x`` without ``axis``.
    """
    mask = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    total = jnp.sum(jnp.where(mask, x, 0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def masked_var(x, mask, unbiased: bool = True):
    """Variance of ``x`` over the masked positions (all axes), as TRL's ``masked_var``.

    With ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` (TRL's default);
    ``unbiased=False`` is the population variance (lm-human-preferences' ``tf.nn.moments``).
    Returns a scalar.
    """
    mask = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    mean = masked_mean(x, mask)
    centered = jnp.where(mask, x - mean, 0)
    var = masked_mean(jnp.square(centered), mask)
    if unbiased:
        n = jnp.sum(mask).astype(var.dtype)
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def whiten(x, mask, shift_mean: bool = True, unbiased: bool = True):
    """Whiten ``x`` with statistics over the masked positions: ``(x - mean) / sqrt(var + 1e-8)``.

    As ``masked_whiten`` in TRL and ``whiten`` in lm-human-preferences: with
    ``shift_mean=False`` the mean is added back (used for rewards, whose level carries meaning).
    Masked-out positions of the result are 0 (never NaN).

    Args:
      x: [B, T] (or any shape) values.
      mask: same shape (or broadcastable), true at real positions.
    Returns:
      array of the shape of ``x``.
    """
    mask = jnp.broadcast_to(_bool(mask), jnp.shape(x))
    x = jnp.where(mask, x, 0)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0)


# --------------------------------------------------------------------------------------------
# Language-model losses
# --------------------------------------------------------------------------------------------


def token_logprobs(logits, tokens, temperature: float = 1.0):
    """Log-probability of each token under ``log_softmax(logits / temperature)``.

    No shifting is done here: ``logits[..., i, :]`` scores ``tokens[..., i]``. Pass the
    sampling temperature when re-computing log-probs of samples (PPO), so that the
    recomputed log-probs match the sampler's.

    Args:
      logits: [..., V].
      tokens: [...] integer ids.
    Returns:
      [...] float32 log-probs.
    """
    logits = jnp.asarray(logits).astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[
        ..., 0
    ]


def entropy_from_logits(logits):
    """Entropy of ``softmax(logits)`` along the last axis: ``logsumexp(l) - sum(p * l)``.

    Args:
      logits: [..., V].
    Returns:
      [...] float32 entropies (nats).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    probs = jnp.exp(logp)
    # where, not multiplication: a -inf logit (top-k / masked vocabulary) has p = 0 and
    # 0 * -inf would be NaN.
    return -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)


def next_token_loss(logits, tokens, loss_mask):
    """Next-token cross-entropy (pre-training and SFT).

    ``logits[:, t]`` predicts ``tokens[:, t + 1]``; a target counts where
    ``loss_mask[:, t + 1]`` is true (so for SFT, mask the prompt and the padding, keep the
    response and its EOS). The loss is the mean over counted target tokens.

    Args:
      logits: [B, T, V].
      tokens: [B, T] integer ids.
      loss_mask: [B, T] true where the token is a target.
    Returns:
      ``(loss, {"loss", "accuracy", "num_tokens"})``.
    """
    targets = jnp.asarray(tokens)[:, 1:]
    mask = _bool(loss_mask)[:, 1:]
    # Zero the logits of uncounted positions so that a NaN there cannot reach the gradient
    # through the log-softmax VJP.
    logits = jnp.where(mask[..., None], jnp.asarray(logits)[:, :-1].astype(jnp.float32), 0.0)
    logp = token_logprobs(logits, targets)
    loss = -masked_mean(logp, mask)
    correct = jnp.argmax(logits, axis=-1) == targets
    accuracy = masked_mean(correct.astype(jnp.float32), mask)
    metrics = {"loss": loss, "accuracy": accuracy, "num_tokens": jnp.sum(mask)}
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """Pairwise (Bradley–Terry) reward-model loss: ``-log sigmoid(r_chosen - r_rejected - m)``.

    Computed with ``jax.nn.log_sigmoid`` (stable for large differences of either sign).
    ``margin`` (scalar or [B]) is the Llama-2 preference-strength margin. ``center_coef``
    adds ``center_coef * mean((r_chosen + r_rejected)^2)``, the reward-centering term of
    Eisenstein et al. 2023, which pins the free additive constant of the rewards near 0.

    Args:
      r_chosen: [B] rewards of the preferred responses.
      r_rejected: [B] rewards of the other responses.
    Returns:
      ``(loss, {"loss", "accuracy", "margin_mean", "reward_mean", "reward_std"})`` where
      ``accuracy`` is the fraction with ``r_chosen > r_rejected`` and ``margin_mean`` the mean
      of ``r_chosen - r_rejected``.
    """
    r_chosen = jnp.asarray(r_chosen).astype(jnp.float32)
    r_rejected = jnp.asarray(r_rejected).astype(jnp.float32)
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    loss = -jnp.mean(jax.nn.log_sigmoid(logits))
    loss = loss + center_coef * jnp.mean(jnp.square(r_chosen + r_rejected))
    rewards = jnp.concatenate([r_chosen, r_rejected])
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "margin_mean": jnp.mean(diff),
        "reward_mean": jnp.mean(rewards),
        "reward_std": jnp.std(rewards),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Preference optimisation without RL (DPO family)
# --------------------------------------------------------------------------------------------


DPO_KINDS = ("sigmoid", "robust", "ipo", "hinge", "simpo")
_LENGTH_NORMALISED_KINDS = ("ipo", "simpo")


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    kind: str,
    beta,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    simpo_gamma=0.5,
):
    """Pairwise preference losses of the DPO family, as TRL's ``DPOTrainer`` / ``CPOTrainer``.

    With ``pi_c, pi_r`` the policy's and ``ref_c, ref_r`` the reference's summed log-probs of
    the chosen and rejected responses, ``len_c, len_r`` their lengths in response tokens,
    ``eps = label_smoothing`` and the log-ratio difference::

        h = (pi_c - ref_c) - (pi_r - ref_r)

    the per-pair losses are (``log sigmoid`` is ``jax.nn.log_sigmoid``)::

        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        robust   [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
        ipo      (h_avg - 1 / (2 beta))^2,
                 h_avg = (pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r
        hinge    relu(1 - beta h)
        simpo    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z),
                 z = beta (pi_c / len_c - pi_r / len_r) - simpo_gamma

    * ``sigmoid``: DPO (Rafailov et al. 2023); ``eps > 0`` is conservative DPO (Mitchell 2023,
      "A note on DPO with noisy preferences"), the cross-entropy against labels smoothed to
      ``1 - eps``. ``eps = 0`` is plain DPO.
    * ``robust``: rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased when each label
      is flipped with probability ``eps``: its expectation over the flip equals the clean
      ``-log sigmoid(beta h)``. Note the ``+`` (conservative DPO has ``-``) and the division by
      ``1 - 2 eps``, exactly TRL's ``loss_type="robust"``; needs ``0 <= eps < 0.5``.
    * ``ipo``: IPO (Azar et al. 2023, Eq. 17, ``beta`` is their ``tau``) on length-averaged
      log-probs, as TRL does for ``loss_type="ipo"`` (it divides both the policy's and the
      reference's log-probs by the response length before forming the difference).
    * ``hinge``: SLiC-HF (Zhao et al. 2023) calibration loss with margin ``1 / beta``.
    * ``simpo``: SimPO (Meng et al. 2024), reference-free and length-normalised with target
      margin ``simpo_gamma``; label smoothing as in TRL's ``CPOTrainer(loss_type="simpo")``.
      ``ref_chosen_logps`` / ``ref_rejected_logps`` are ignored (pass anything of shape [B]).

    ``label_smoothing`` is defined for ``sigmoid``, ``robust`` and ``simpo`` only; a nonzero
    value for ``ipo`` or ``hinge`` raises (TRL ignores it with a warning). ``beta`` and
    ``simpo_gamma`` may be traced scalars (an annealed or vmapped coefficient in the train
    state); nothing branches on their values. The reference log-probs and the lengths are
    held constant (``stop_gradient``). Lengths are clamped to at least 1, so an empty response
    (summed log-prob 0) contributes 0 rather than NaN.

    Metrics (TRL's names; means over the batch of these [B] quantities)::

        rewards/chosen      r_c = beta (pi_c - ref_c)
        rewards/rejected    r_r = beta (pi_r - ref_r)
        rewards/accuracies  r_c > r_r
        rewards/margins     r_c - r_r
        logps/chosen        pi_c          (summed, not length-averaged, for every kind)
        logps/rejected      pi_r
        loss                the returned loss

    The implicit rewards use summed log-ratios for every kind but ``simpo``, whose rewards are
    reference-free and length-normalised, ``r = beta pi / len`` (TRL's CPO/SimPO rewards). For
    ``ipo`` TRL would log length-averaged rewards and log-probs; these are the summed ones.

    Args:
      chosen_logps, rejected_logps: [B] policy log-probs of the response tokens, summed per
        sequence (use ``masked_sum``); differentiated.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
      kind: one of ``DPO_KINDS``.
      beta: scalar inverse temperature / KL strength (may be traced).
      label_smoothing: ``eps``, the assumed label-noise rate (Python number).
      chosen_lengths, rejected_lengths: [B] response lengths in tokens; required by ``ipo``
        and ``simpo``, ignored by the other kinds.
      simpo_gamma: SimPO's target reward margin (TRL's default 0.5).
    Returns:
      ``(loss, metrics)``: the scalar float32 mean loss over the batch and the metrics above.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO loss kind {kind!r}; valid kinds: {', '.join(DPO_KINDS)}")
    if kind in _LENGTH_NORMALISED_KINDS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"DPO loss kind {kind!r} is length-normalised: pass chosen_lengths and "
            "rejected_lengths (response lengths in tokens)"
        )
    if not isinstance(label_smoothing, jax.core.Tracer):
        eps_value = float(label_smoothing)
        if kind in ("ipo", "hinge") and eps_value != 0.0:
            raise ValueError(f"label_smoothing is not defined for DPO loss kind {kind!r}")
        if kind == "robust" and not 0.0 <= eps_value < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps_value}")
        if not 0.0 <= eps_value <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {eps_value}")

    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    pi_c, pi_r = f32(chosen_logps), f32(rejected_logps)
    beta = f32(beta)
    eps = f32(label_smoothing)

    if kind == "simpo":
        len_c = lax.stop_gradient(jnp.maximum(f32(chosen_lengths), 1.0))
        len_r = lax.stop_gradient(jnp.maximum(f32(rejected_lengths), 1.0))
        reward_c = beta * pi_c / len_c
        reward_r = beta * pi_r / len_r
        z = reward_c - reward_r - f32(simpo_gamma)
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    else:
        ratio_c = pi_c - lax.stop_gradient(f32(ref_chosen_logps))
        ratio_r = pi_r - lax.stop_gradient(f32(ref_rejected_logps))
        reward_c = beta * ratio_c
        reward_r = beta * ratio_r
        z = beta * (ratio_c - ratio_r)
        if kind == "sigmoid":
            losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
        elif kind == "robust":
            losses = (
                -(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)
            ) / (1.0 - 2.0 * eps)
        elif kind == "hinge":
            losses = jax.nn.relu(1.0 - z)
        else:  # ipo
            len_c = lax.stop_gradient(jnp.maximum(f32(chosen_lengths), 1.0))
            len_r = lax.stop_gradient(jnp.maximum(f32(rejected_lengths), 1.0))
            h_avg = ratio_c / len_c - ratio_r / len_r
            losses = jnp.square(h_avg - 1.0 / (2.0 * beta))

    loss = jnp.mean(losses)
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(reward_c),
        "rewards/rejected": jnp.mean(reward_r),
        "rewards/accuracies": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
        "rewards/margins": jnp.mean(reward_c - reward_r),
        "logps/chosen": jnp.mean(pi_c),
        "logps/rejected": jnp.mean(pi_r),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def generalized_advantage_estimate(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2015) with a reverse ``lax.scan``.

    Masked-out positions are skipped: they get advantage 0 and the recursion passes through
    them unchanged, so the last real token bootstraps from 0 (the episode ends there) and
    masked prompt tokens or padding on either side do not matter. For each real ``t`` with
    ``t'`` the next real position::

        delta_t = r_t + gamma * V_{t'} - V_t          (V_{t'} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t'}

    Values and rewards at masked positions are never read (NaN there is fine). The result is
    not wrapped in ``stop_gradient``; callers compute it outside the differentiated loss.

    Args:
      rewards: [B, T] per-token rewards.
      values: [B, T] value estimates.
      mask: [B, T] true at real response tokens.
    Returns:
      ``(advantages [B, T], returns [B, T])`` with ``returns = advantages + values``; both 0
      at masked positions.
    """
    mask = _bool(mask)
    rewards = jnp.where(mask, rewards, 0).astype(jnp.float32)
    values = jnp.where(mask, values, 0).astype(jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        adv = jnp.where(m, adv, 0.0)
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_t = lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token estimate of KL(policy || reference) from log-probs of policy samples.

    Kinds (Schulman, "Approximating KL divergence"), with ``d = logp - ref``:
      * ``'k1'``: ``d`` (unbiased, high variance, can be negative; OpenAI 2019 / TRL default).
      * ``'k2'``: ``0.5 * d^2``.
      * ``'k3'``: ``(r - 1) - log r`` with ``r = exp(ref - logp)`` (unbiased, non-negative).
      * ``'abs'``: ``|d|``.

    Args:
      logprobs, ref_logprobs: [B, T] (any matching shape).
    Returns:
      same shape. Mask the result yourself.
    """
    d = jnp.asarray(logprobs).astype(jnp.float32) - jnp.asarray(ref_logprobs).astype(jnp.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        # (exp(-d) - 1) + d, with expm1 for accuracy when d is small.
        return jnp.expm1(-d) + d
    if kind == "abs":
        return jnp.abs(d)
    raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def _last_true_onehot(mask):
    """[B, T] boolean one-hot of the last true position of each row (all false if none)."""
    mask = _bool(mask)
    T = mask.shape[-1]
    positions = jnp.arange(T)
    last = jnp.max(jnp.where(mask, positions, -1), axis=-1, keepdims=True)
    return positions == last


def per_token_rewards(scores, kl, mask, kl_coef):
    """Per-token PPO rewards: ``-kl_coef * kl_t`` on every real token, plus the score at the last.

    As in Ziegler et al. 2019 / TRL: the reward model's (or reward function's) scalar score is
    added at the last real response token.

    Args:
      scores: [B] sequence scores.
      kl: [B, T] per-token KL estimates (see ``kl_penalty``).
      mask: [B, T] true at real response tokens.
      kl_coef: scalar (may be a traced array, for the adaptive controller).
    Returns:
      rewards [B, T] float32, 0 at masked positions.
    """
    mask = _bool(mask)
    kl = jnp.where(mask, kl, 0).astype(jnp.float32)
    rewards = jnp.where(mask, -kl_coef * kl, 0.0)
    last = _last_true_onehot(mask)
    scores = jnp.asarray(scores).astype(jnp.float32)[:, None]
    return rewards + jnp.where(last, scores, 0.0)


def ppo_value_loss(values, old_values, returns, mask, clip_range: float):
    """Clipped value loss: ``0.5 * mean(max((v - R)^2, (clip(v, old - c, old + c) - R)^2))``.

    Args:
      values: [B, T] current value predictions (differentiated).
      old_values: [B, T] values at rollout time.
      returns: [B, T] GAE returns (treated as constants).
      mask: [B, T] true at real response tokens.
    Returns:
      ``(loss, {"value_loss", "value_clipfrac"})``; ``value_clipfrac`` is the fraction of
      tokens where the clipped term is the larger one.
    """
    mask = _bool(mask)
    v = jnp.where(mask, values, 0.0)
    old = lax.stop_gradient(jnp.where(mask, old_values, 0.0))
    ret = lax.stop_gradient(jnp.where(mask, returns, 0.0))
    v_clipped = jnp.clip(v, old - clip_range, old + clip_range)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "value_loss": loss,
        "value_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Sequence-level policy-gradient estimators (ablations)
# --------------------------------------------------------------------------------------------


def reinforce_loss(seq_logprob, advantages):
    """REINFORCE: ``-mean(stop_gradient(adv) * seq_logprob)``.

    The articles' method applied to a language model: treat the sampled tokens as if they were
    the right ones (cross-entropy against the sample) and scale that gradient by the reward
    (or an advantage). Its gradient is ``-mean(adv * grad log p(sequence))``.

    Args:
      seq_logprob: [B] sum of the response tokens' log-probs (use ``masked_sum``).
      advantages: [B] rewards or advantages.
    Returns:
      scalar loss.
    """
    return -jnp.mean(lax.stop_gradient(advantages) * seq_logprob)


def baseline_advantages(scores, baseline):
    """``scores - baseline`` with the baseline (scalar or broadcastable) held constant."""
    return jnp.asarray(scores) - lax.stop_gradient(baseline)


def rloo_advantages(scores):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

    Each sample's baseline is the mean score of the other ``K - 1`` samples of its prompt.

    Args:
      scores: [P, K] scores, ``K >= 2`` samples per prompt.
    Returns:
      [P, K] advantages ``s_i - (sum_j s_j - s_i) / (K - 1)``.
    """
    scores = jnp.asarray(scores).astype(jnp.float32)
    k = scores.shape[-1]
    if k < 2:
        raise ValueError(f"rloo_advantages needs at least 2 samples per prompt, got K={k}")
    others = (jnp.sum(scores, axis=-1, keepdims=True) - scores) / (k - 1)
    return scores - others


def grpo_advantages(scores, eps: float = 1e-4, ddof: int = 1, *, scale: bool = True):
    """GRPO group-relative advantages (Shao et al. 2024, "DeepSeekMath").

    ``scale=True`` (GRPO): ``(s - mean_g) / (std_g + eps)``. ``ddof=1`` (sample std) matches
    TRL's ``GRPOTrainer`` (``torch.std``); a group whose scores are all equal gets advantage 0.

    ``scale=False`` (Dr. GRPO; Liu et al. 2025, "Understanding R1-Zero-Like Training: A
    Critical Perspective"): ``s - mean_g``, centred but not divided by the group's std (the
    division up-weights prompts that are nearly always or nearly never solved). ``eps`` and
    ``ddof`` are then unused.

    Args:
      scores: [P, K] scores, ``K`` samples per prompt.
    Returns:
      [P, K] float32 advantages.
    """
    scores = jnp.asarray(scores).astype(jnp.float32)
    mean = jnp.mean(scores, axis=-1, keepdims=True)
    if not scale:
        return scores - mean
    std = jnp.std(scores, axis=-1, keepdims=True, ddof=ddof)
    return (scores - mean) / (std + eps)


def reinforce_pp_advantages(token_rewards, mask):
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models"): the reward-to-go of each token, whitened over the batch.

    With ``gamma = 1`` and ``t'`` running over the real tokens of the sequence::

        G_t = sum_{t' >= t} r_t'
        A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8)

    where ``mean`` and ``var`` (unbiased, ``ddof=1``) are taken over every real token of the
    batch (``whiten``): a global baseline instead of a critic or a per-prompt group. Rewards
    at masked positions are never read (NaN there is fine); the result is 0 there.

    Args:
      token_rewards: [B, T] per-token rewards, e.g. ``per_token_rewards(score, kl, mask, c)``.
      mask: [B, T] true at real response tokens.
    Returns:
      [B, T] float32 advantages, 0 at masked positions.
    """
    mask = _bool(mask)
    rewards = jnp.where(mask, token_rewards, 0).astype(jnp.float32)
    # Reverse cumulative sum along time: G_t = sum_{t' >= t} r_t'.
    returns = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=-1), axis=-1), axis=-1)
    return whiten(returns, mask, shift_mean=True, unbiased=True)


def overlong_penalty(lengths, *, max_len, cache_len):
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13), added to the score.

    With ``L`` a response's length in tokens, ``L_max = max_len`` and ``L_cache = cache_len``::

        R(L) = 0                                  L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  L_max - L_cache < L <= L_max
             = -1                                 L > L_max

    so the penalty falls linearly from 0 to -1 over the last ``cache_len`` tokens.
    ``cache_len = 0`` is the hard cut (0 up to ``max_len``, -1 beyond).

    Args:
      lengths: [B] response lengths (integers or floats).
      max_len: ``L_max``, a positive Python number.
      cache_len: ``L_cache``, a Python number in ``[0, max_len]``.
    Returns:
      [B] float32 penalties in [-1, 0].
    """
    if not max_len > 0:
        raise ValueError(f"overlong_penalty: max_len must be > 0, got {max_len!r}")
    if not 0 <= cache_len <= max_len:
        raise ValueError(
            f"overlong_penalty: cache_len must lie in [0, max_len={max_len}], got {cache_len!r}")
    lengths = jnp.asarray(lengths).astype(jnp.float32)
    start = float(max_len - cache_len)
    ramp = (start - lengths) / max(float(cache_len), 1.0)
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


# --------------------------------------------------------------------------------------------
# GRPO-family policy objectives
# --------------------------------------------------------------------------------------------


POLICY_LOSS_KINDS = ("clip", "gspo", "cispo")
POLICY_LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_policy_loss_args(kind, clip_low, clip_high, aggregation, max_len):
    if kind not in POLICY_LOSS_KINDS:
        raise ValueError(f"policy_loss: unknown kind {kind!r}; "
                         f"kind must be one of {', '.join(POLICY_LOSS_KINDS)}")
    if aggregation not in POLICY_LOSS_AGGREGATIONS:
        raise ValueError(f"policy_loss: unknown aggregation {aggregation!r}; "
                         f"aggregation must be one of {', '.join(POLICY_LOSS_AGGREGATIONS)}")
    if aggregation == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("policy_loss: aggregation='seq_mean_token_sum_norm' (Dr. GRPO) needs "
                             "max_len, the constant normaliser (the maximum response length)")
        if _is_concrete(max_len) and not float(max_len) > 0:
            raise ValueError(f"policy_loss: max_len must be > 0, got {max_len!r}")
    if _is_concrete(clip_low) and not 0.0 <= float(clip_low) < 1.0:
        raise ValueError(f"policy_loss: clip_low must lie in [0, 1), got {clip_low!r}")
    if _is_concrete(clip_high) and not float(clip_high) >= 0.0:
        raise ValueError(f"policy_loss: clip_high must be >= 0, got {clip_high!r}")


def aggregate_token_terms(per_token, mask, aggregation: str = "token_mean", max_len=None):
    """One scalar from [B, T] per-token loss terms, as the GRPO-family papers aggregate them.

    With ``n_i`` real tokens in row ``i``, ``N = sum n_i`` and ``B'`` the rows with at least one::

        token_mean               sum_{i,t} l_it / N                       (DAPO)
        seq_mean_token_mean      sum_i (sum_t l_it / n_i) / B'            (GRPO paper)
        seq_mean_token_sum_norm  sum_i (sum_t l_it / max_len) / B'        (Dr. GRPO)

    An empty row counts nowhere; masked terms are never read. Used for the policy objective and
    for a KL term in the loss, so both weigh tokens alike.
    """
    f32 = jnp.float32
    mask = _bool(mask)
    per_token = jnp.where(mask, per_token, 0.0).astype(f32)
    n_tokens = jnp.sum(mask, axis=-1)  # [B]
    if aggregation == "token_mean":
        return jnp.sum(per_token) / jnp.maximum(jnp.sum(n_tokens), 1).astype(f32)
    if aggregation == "seq_mean_token_mean":
        per_seq = jnp.sum(per_token, axis=-1) / jnp.maximum(n_tokens, 1).astype(f32)
    elif aggregation == "seq_mean_token_sum_norm":
        per_seq = jnp.sum(per_token, axis=-1) / jnp.asarray(max_len, f32)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(POLICY_LOSS_AGGREGATIONS)}")
    n_seqs = jnp.maximum(jnp.sum(n_tokens > 0), 1).astype(f32)
    return jnp.sum(jnp.where(n_tokens > 0, per_seq, 0.0)) / n_seqs


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    kind: str = "clip",
    clip_low=0.2,
    clip_high=0.2,
    aggregation: str = "token_mean",
    max_len=None,
    token_weights=None,
):
    """Clipped policy-gradient objectives of the GRPO family, with a choice of aggregation.

    With ``logp``, ``old`` and ``A`` the [B, T] log-probs under the current policy, log-probs
    at rollout time and advantages, ``r_t = exp(logp_t - old_t)`` the token ratio and
    ``clip(x) = clip(x, 1 - clip_low, 1 + clip_high)``, the per-token terms ``l_t`` are::

        clip   l_t = -min(r_t A_t, clip(r_t) A_t)
        gspo   l_t = -min(s_i A_i, clip(s_i) A_i)           for every token t of sequence i,
                 s_i = exp(sum_t (logp_t - old_t) / |y_i|),  A_i = mean_t A_t  (over y_i)
        cispo  l_t = -stop_gradient(clip(r_t)) A_t logp_t

    * ``clip``: PPO's clipped surrogate (Schulman et al. 2017) as used by GRPO (Shao et al.
      2024); ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025).
    * ``gspo``: GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one
      length-normalised importance ratio per sequence, clipped per sequence. The gradient
      flows through ``s_i``, as in the paper's GSPO objective, so within a sequence every
      token gets the same gradient ``d s_i / d logp_t = s_i / |y_i|`` times the term's
      factor. (The paper's GSPO-token variant has the same value and, with one advantage per
      sequence, the same gradient.) The sequence's term is counted on each of its tokens by
      the aggregation, so ``token_mean`` weights sequences by length.
    * ``cispo``: CISPO (MiniMax 2025, "MiniMax-M1"): REINFORCE weighted by the clipped,
      constant importance ratio; no token's gradient is ever switched off, the gradient w.r.t.
      ``logp_t`` is ``-clip(r_t) A_t`` times the aggregation weight.

    Aggregations of the [B, T] terms ``l`` (``n_i`` real tokens in row ``i``, ``N = sum n_i``,
    ``B'`` the number of rows with at least one real token)::

        token_mean               sum_{i,t} l_it / N                       (DAPO)
        seq_mean_token_mean      sum_i (sum_t l_it / n_i) / B'            (GRPO paper)
        seq_mean_token_sum_norm  sum_i (sum_t l_it / max_len) / B'        (Dr. GRPO, Liu et al.
                                                                           2025)

    A row with no real token contributes nothing (it is not counted in ``B'`` either), so
    padding a batch with empty rows changes neither the loss nor its gradient; an all-empty
    batch has loss 0. Values and gradients are finite whatever sits at masked positions.

    Metrics (means over real tokens; TRL's ``GRPOTrainer`` names and definitions, with the
    kind's ratio: ``s_i`` on each token for ``gspo``, ``r_t`` otherwise)::

        loss                    the returned loss
        clip_ratio/low_mean     ratio < 1 - clip_low  and  A < 0
        clip_ratio/high_mean    ratio > 1 + clip_high and  A > 0
        clip_ratio/region_mean  either of the two
        ratio_mean              the ratio
        approx_kl               0.5 (logp - old)^2    (token level for every kind; TRL's
                                                       PPO approxkl)

    Args:
      logprobs: [B, T] log-probs of the response tokens under the current policy
        (differentiated).
      old_logprobs: [B, T] log-probs at rollout time (held constant).
      advantages: [B, T] advantages (held constant); broadcast a [B] sequence advantage with
        ``adv[:, None]`` first.
      mask: [B, T] true at real response tokens.
      kind: one of ``POLICY_LOSS_KINDS``.
      clip_low: ``eps_low`` in [0, 1).
      clip_high: ``eps_high`` >= 0.
      aggregation: one of ``POLICY_LOSS_AGGREGATIONS``.
      max_len: the constant normaliser of ``seq_mean_token_sum_norm`` (the maximum response
        length, > 0); required by it, ignored by the others.
      token_weights: optional [B, T] constant weights each ``l_t`` is multiplied by before the
        aggregation: truncated importance sampling (``tis_weights``) when the rollout's
        sampler and the trained policy compute log-probs differently.
    Returns:
      ``(loss, metrics)``: the scalar float32 loss and the dict above.
    """
    _check_policy_loss_args(kind, clip_low, clip_high, aggregation, max_len)
    f32 = jnp.float32
    mask = _bool(mask)
    logp = jnp.where(mask, logprobs, 0).astype(f32)
    old = lax.stop_gradient(jnp.where(mask, old_logprobs, 0).astype(f32))
    adv = lax.stop_gradient(jnp.where(mask, advantages, 0).astype(f32))
    lo = 1.0 - jnp.asarray(clip_low, f32)
    hi = 1.0 + jnp.asarray(clip_high, f32)

    logratio = logp - old  # 0 at masked positions
    n_tokens = jnp.sum(mask, axis=-1)  # [B]
    n_safe = jnp.maximum(n_tokens, 1).astype(f32)

    if kind == "gspo":
        seq_ratio = jnp.exp(jnp.sum(logratio, axis=-1) / n_safe)  # [B], s_i
        seq_adv = jnp.sum(adv, axis=-1) / n_safe  # [B], A_i
        seq_term = -jnp.minimum(seq_ratio * seq_adv, jnp.clip(seq_ratio, lo, hi) * seq_adv)
        per_token = jnp.where(mask, seq_term[:, None], 0.0)
        ratio = jnp.broadcast_to(seq_ratio[:, None], mask.shape)  # for the metrics
        metric_adv = jnp.broadcast_to(seq_adv[:, None], mask.shape)
    else:
        ratio = jnp.exp(logratio)
        metric_adv = adv
        if kind == "clip":
            per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
        else:  # cispo
            per_token = -lax.stop_gradient(jnp.clip(ratio, lo, hi)) * adv * logp
        per_token = jnp.where(mask, per_token, 0.0)
    if token_weights is not None:
        per_token = per_token * lax.stop_gradient(jnp.where(mask, token_weights, 0).astype(f32))

    loss = aggregate_token_terms(per_token, mask, aggregation, max_len)

    ratio = lax.stop_gradient(ratio)
    is_low = (ratio < lo) & (metric_adv < 0)
    is_high = (ratio > hi) & (metric_adv > 0)
    fraction = lambda x: masked_mean(x.astype(f32), mask)
    metrics = {
        "loss": loss,
        "clip_ratio/low_mean": fraction(is_low),
        "clip_ratio/high_mean": fraction(is_high),
        "clip_ratio/region_mean": fraction(is_low | is_high),
        "ratio_mean": masked_mean(ratio, mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(lax.stop_gradient(logratio)), mask),
    }
    return loss, metrics


def tis_weights(old_logprobs, sampler_logprobs, mask, cap: float):
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; verl's ``tis_imp_ratio_cap``): the rollout's tokens were
    drawn by a sampler whose log-probs differ from the trainer's (bf16 sampling, another
    kernel), so each token's term is reweighted by ``min(exp(old_t - sampler_t), cap)``, with
    ``old`` the trainer's recomputed log-probs at rollout time. [B, T] -> [B, T], 0 at pads;
    exactly 1 where the two agree."""
    mask = _bool(mask)
    logratio = jnp.where(mask, old_logprobs - sampler_logprobs, 0).astype(jnp.float32)
    return jnp.where(mask, jnp.minimum(jnp.exp(logratio), cap), 0.0)


# --------------------------------------------------------------------------------------------
# KL coefficient control
# --------------------------------------------------------------------------------------------


def adaptive_kl_coef(coef, current_kl, target, horizon, n_steps):
    """One update of the adaptive KL controller (Ziegler et al. 2019, ``AdaptiveKLController``).

    ``proportional_error = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``coef *= 1 + proportional_error * n_steps / horizon``, where ``n_steps`` is the number of
    samples (episodes) seen since the last update. Pure and jit-friendly, so the coefficient
    can live in the train state. A fixed coefficient is simply not updated.

    Returns:
      the new coefficient.
    """
    proportional_error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + proportional_error * n_steps / horizon)
