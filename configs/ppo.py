"""PPO stage configs: every implementation detail that decides whether RLHF works is a field.

    base()          all fields, neutral values (what the two presets start from)
    openai_2019()   Ziegler et al. 2019 (lm-human-preferences): adaptive KL 0.15 -> target 6
                    over a horizon of 10000 episodes, reward-model normalisation, no reward or
                    advantage-free tricks beyond whitened advantages
    trl()           Hugging Face TRL / "The N implementation details of RLHF with PPO":
                    fixed KL 0.05 (k1), whitened advantages, value clipping 0.2, vf_coef 0.1,
                    missing-EOS penalty -1, temperature 0.7, Adam eps 1e-5
  The GRPO family (critic-free, K samples per prompt; for verifiable rewards): each takes the
  paper's algorithmic choices; the scale (batch, K, lengths, learning rate) stays the experiment's.
    grpo()          Shao et al. 2024 (DeepSeekMath)
    dr_grpo()       Liu et al. 2025 (Understanding R1-Zero-like training)
    dapo()          Yu et al. 2025 (DAPO)
    gspo()          Zheng et al. 2025 (Group Sequence Policy Optimization)
    cispo()         MiniMax 2025 (MiniMax-M1)
    reinforce_pp()  Hu 2025 (REINFORCE++)

Fields (see rlhf_jax/ppo.py):
    seed, num_seeds        num_seeds > 1 trains seeds seed, seed+1, ... at once (vmap; small models):
                           metrics are the mean over seeds and `<name>_std`
    init_from              SFT run: the policy and the frozen reference start from it
    reference_from         a different run for the frozen reference ('' = init_from), e.g. rounds
                           of `rlhf-jax rounds` continue from the last policy but keep the SFT reference
    model                  must equal init_from's model (the workdir's config.json describes the policy)
    reward_model           reward run workdir (scalar at the last real token), or
    reward_function        'module:fn' of fn(prompt, response) -> float, called on the host
    use_reward_normalization  apply the reward run's (mean, std) normalisation to its scores
    gold_function          'module:fn' logged as objective/gold_scores on the same samples ('' = off)
    value_model            'policy' (scalar head on the policy), 'reward_model' or 'sft' (separate)
    loss                   the advantage estimator: 'ppo' (GAE with a value function) |
                           'reinforce' | 'reinforce_baseline' | 'rloo' | 'grpo' | 'reinforce_pp';
                           ppo, grpo and reinforce_pp train on the clipped objective below, the
                           other three on REINFORCE's -A * log p(sequence)
    advantage_scaling      loss 'grpo': 'group' (divide by the group's std) | 'batch' (by the
                           batch's) | 'none' (Dr. GRPO: centred only)
    samples_per_prompt     K responses per prompt (>= 2 for rloo / grpo / dynamic sampling)
    objective              'clip' (PPO/GRPO token ratio) | 'gspo' (sequence ratio) | 'cispo'
                           (clipped, constant importance weight on REINFORCE); rlhf_jax.losses.policy_loss
    clip_low, clip_high    ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO: clip-higher)
    aggregation            'token_mean' | 'seq_mean_token_mean' | 'seq_mean_token_sum_norm' (needs max_len)
    max_len                the constant normaliser of 'seq_mean_token_sum_norm' (0: unset)
    kl_placement           'reward' (-beta * KL_t in the per-token reward; Ziegler et al.) |
                           'loss' (beta * KL in the loss, aggregated like the objective; GRPO) |
                           'none' (KL logged only)
    dynamic_sampling, oversample   DAPO: sample oversample * batch_size groups, train on up to
                           batch_size whose K scores are not all equal (the rest masked out)
    overlong_buffer, overlong_penalty_factor   DAPO's soft overlong punishment over the last
                           overlong_buffer tokens before max_new_tokens (0: off)
    mask_truncated         responses without EOS are not trained on (DAPO's overlong filtering)
    baseline_decay         EMA decay of the reinforce_baseline baseline
    batch_size             prompts per iteration (rollout batch = batch_size * K)
    max_prompt_len, max_new_tokens, temperature, top_k, top_p    sampling
    missing_eos            'keep' (score as is) | 'penalty' (score := missing_eos_penalty)
    truncate_token         '' or one token: responses end after its first occurrence (it counts as EOS)
    kl_estimator           'k1' | 'k2' | 'k3' | 'abs' (per token, where kl_placement puts it)
    kl_coef, adaptive_kl, kl_target, kl_horizon     beta; adaptive: Ziegler et al. controller
    whiten_rewards         whiten per-token rewards (mean kept)
    whiten_advantages      whiten GAE advantages (loss 'ppo')
    gamma, lam             GAE
    value_clip, vf_coef, entropy_coef                 value loss and entropy bonus
    ppo_epochs, num_minibatches                       update: epochs over shuffled minibatches
    optimizer              configs/optimizers.py: learning rate, schedule, Adam eps, grad clipping
    eval_every, eval_split, num_eval_prompts   held-out evaluation before every eval_every-th
                           update: samples_per_prompt samples on each of num_eval_prompts prompts of
                           data[eval_split] -> eval/scores (accuracy with a verifier), eval/length_*
    logprob_check_every    without a value head on the policy the update's old log-probs are the
                           sampler's (no policy forward per iteration); at every logprob_check_every-th
                           iteration (logged rows N, 2N, ...) a forward pass recomputes them and
                           rollout/logprob_diff_max, rollout/logprob_diff_mean are logged (0: never)
    rollout_dtype          '' (model.dtype) or 'bfloat16' | 'float32': the sampler's compute dtype
    rollout_correction     'none' | 'tis': truncated importance sampling of each token's term by
                           min(exp(recomputed - sampler log-prob), rollout_correction_cap) (the
                           policy forward then runs every iteration; its log-probs are the old ones)
    correct_score          with a reward function: raw reward >= correct_score counts as correct for
                           val/length_correct, val/length_incorrect (and their eval/ twins)
"""

import ml_collections

from configs import datasets, lora, mesh, models, optimizers


def base(num_steps: int = 100) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "ppo"
    c.seed = 0
    c.num_seeds = 1  # > 1: seeds seed ... seed + num_seeds - 1 vmapped in one jitted program
    c.model = models.tiny()
    # kind 'byte' or 'hf' (path: folder with tokenizer.json); chat_template=True (hf only): prompts
    # go through the tokenizer's chat template as one user message (instruction-tuned checkpoints).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path="", chat_template=False))
    c.lora = lora.off()  # --config.lora.rank=8: train adapters only (rlhf_jax/lora.py)
    c.init_from = ""
    c.init_from_unfinished = False  # True: init_from may be an unfinished run (its last checkpoint), said when it starts.
    c.reference_from = ""  # '' = init_from; another policy run: the frozen reference (rounds: the SFT run)
    c.reward_model = ""
    c.reward_function = ""
    c.use_reward_normalization = True
    c.gold_function = ""
    c.value_model = "policy"
    c.loss = "ppo"
    c.samples_per_prompt = 1
    c.baseline_decay = 0.9
    c.advantage_scaling = "group"
    c.objective = "clip"
    c.clip_low = 0.2
    c.clip_high = 0.2
    c.aggregation = "token_mean"
    c.max_len = 0
    c.kl_placement = "reward"
    c.dynamic_sampling = False
    c.oversample = 2
    c.overlong_buffer = 0
    c.overlong_penalty_factor = 1.0
    c.mask_truncated = False
    # Prompts: config.prompts if non-empty, else the 'prompt' field of data[prompt_split].
    c.data = datasets.reviews_sft()
    c.data_dir = "~/.cache/rlhf_jax/datasets"
    c.prompt_split = "train"
    c.prompts = ()
    c.batch_size = 32
    c.max_prompt_len = 64
    c.max_new_tokens = 48
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    c.logprob_check_every = 10
    c.rollout_dtype = ""
    c.rollout_correction = "none"
    c.rollout_correction_cap = 2.0
    c.missing_eos = "keep"
    c.missing_eos_penalty = -1.0
    c.truncate_token = ""
    c.kl_estimator = "k1"
    c.kl_coef = 0.05
    c.adaptive_kl = False
    c.kl_target = 6.0
    c.kl_horizon = 10000.0
    c.whiten_rewards = False
    c.whiten_advantages = True
    c.gamma = 1.0
    c.lam = 0.95
    c.value_clip = 0.2
    c.vf_coef = 0.1
    c.entropy_coef = 0.0
    c.ppo_epochs = 4
    c.num_minibatches = 4
    c.optimizer = optimizers.adam(1e-5, eps=1e-5, grad_clip_norm=1.0)
    c.num_steps = num_steps
    c.log_every = 5
    c.checkpoint_every = max(num_steps // 4, 1)
    c.progress_every_s = 10.0
    c.sample_every = 10
    c.num_sample_rows = 6
    c.eval_every = 0  # > 0: held-out evaluation every eval_every steps (eval/* metrics)
    c.eval_split = "validation"
    c.num_eval_prompts = 64
    c.correct_score = 1.0  # a raw reward >= this is "correct" (length_correct / length_incorrect metrics)
    c.mesh = mesh.data_parallel()
    c.plot_metrics = ("objective/scores", "objective/kl", "objective/gold_scores")
    return c


def openai_2019(num_steps: int = 100) -> ml_collections.ConfigDict:
    """lm-human-preferences (Ziegler et al. 2019) defaults for the sentiment task."""
    c = base(num_steps)
    c.kl_coef = 0.15
    c.adaptive_kl = True
    c.kl_target = 6.0
    c.kl_horizon = 10000.0
    c.kl_estimator = "k1"
    c.use_reward_normalization = True
    c.whiten_rewards = False
    c.whiten_advantages = True
    c.temperature = 0.7
    c.missing_eos = "keep"
    c.vf_coef = 0.1
    c.value_clip = 0.2
    c.ppo_epochs = 4
    c.num_minibatches = 1
    c.optimizer = optimizers.adam(1e-5, eps=1e-5, grad_clip_norm=0.0)
    return c


def trl(num_steps: int = 100) -> ml_collections.ConfigDict:
    """Hugging Face TRL PPO ("The N implementation details of RLHF with PPO")."""
    c = base(num_steps)
    c.kl_coef = 0.05
    c.adaptive_kl = False
    c.kl_estimator = "k1"
    c.whiten_rewards = False
    c.whiten_advantages = True
    c.value_clip = 0.2
    c.clip_low = c.clip_high = 0.2
    c.vf_coef = 0.1
    c.missing_eos = "penalty"
    c.missing_eos_penalty = -1.0
    c.temperature = 0.7
    c.ppo_epochs = 4
    c.num_minibatches = 1
    c.optimizer = optimizers.adam(3e-6, eps=1e-5, grad_clip_norm=1.0)
    return c


# ----------------------------------------------------------------------------- the GRPO family


def _critic_free(c, loss: str, samples_per_prompt: int) -> ml_collections.ConfigDict:
    """What every preset below shares: no value function, K samples per prompt, sampling at
    temperature 1, one pass over each rollout unless the paper says otherwise."""
    c.loss = loss
    c.samples_per_prompt = samples_per_prompt
    c.temperature = 1.0
    c.whiten_advantages = False
    c.adaptive_kl = False
    c.ppo_epochs = 1
    c.num_minibatches = 1
    return c


def grpo(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1-4.2): advantages are the group's scores
    minus their mean over their std (outcome supervision); the clipped token-ratio objective,
    eps 0.2, averaged over each response's tokens then over responses (seq_mean_token_mean);
    the KL to the reference in the loss, beta 0.04, with the unbiased estimator
    pi_ref/pi - log(pi_ref/pi) - 1 (k3); one update per rollout. (The paper's G = 64 samples.)"""
    c = _critic_free(base(num_steps), "grpo", samples_per_prompt)
    c.advantage_scaling = "group"
    c.objective, c.clip_low, c.clip_high = "clip", 0.2, 0.2
    c.aggregation = "seq_mean_token_mean"
    c.kl_placement, c.kl_estimator, c.kl_coef = "loss", "k3", 0.04
    return c


def dr_grpo(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
    GRPO without its two biases: advantages centred by the group mean but not divided by the
    group's std (advantage_scaling 'none'), and each response's token sum divided by a constant,
    the generation budget (seq_mean_token_sum_norm, max_len = max_new_tokens), not by its own
    length; no KL term (beta 0 in the paper's runs); eps 0.2."""
    c = _critic_free(base(num_steps), "grpo", samples_per_prompt)
    c.advantage_scaling = "none"
    c.objective, c.clip_low, c.clip_high = "clip", 0.2, 0.2
    c.aggregation, c.max_len = "seq_mean_token_sum_norm", c.max_new_tokens
    c.kl_placement, c.kl_coef = "none", 0.0
    return c


def dapo(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
    clip-higher (eps_low 0.2, eps_high 0.28); the token-level loss (token_mean); dynamic sampling
    (groups whose rewards are all equal are dropped; the paper resamples until the batch is full,
    here a static oversample of 3 batches); soft overlong punishment over the last fifth of the
    budget (the paper: 4096 of 20480 tokens, factor 1); no KL term; group-normalised advantages;
    16 gradient updates per rollout (the paper: mini-batches of 512 of 512 x 16 responses), without
    which the ratio never leaves 1 and clip-higher changes nothing. (The paper's G = 16 samples.)"""
    c = _critic_free(base(num_steps), "grpo", samples_per_prompt)
    c.advantage_scaling = "group"
    c.objective, c.clip_low, c.clip_high = "clip", 0.2, 0.28
    c.aggregation = "token_mean"
    c.kl_placement, c.kl_coef = "none", 0.0
    c.dynamic_sampling, c.oversample = True, 3
    c.num_minibatches = 16
    c.overlong_buffer, c.overlong_penalty_factor = max(c.max_new_tokens // 5, 1), 1.0
    return c


def gspo(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one length-normalised
    importance ratio per response, clipped per response to [1 - 3e-4, 1 + 4e-4] (the paper's
    ranges: a sequence ratio moves far less than a token's), each response weighted equally
    (seq_mean_token_mean); group-normalised advantages; no KL term; each rollout split into 4
    minibatches, so the later ones are off-policy and the ratio matters."""
    c = _critic_free(base(num_steps), "grpo", samples_per_prompt)
    c.advantage_scaling = "group"
    c.objective, c.clip_low, c.clip_high = "gspo", 3e-4, 4e-4
    c.aggregation = "seq_mean_token_mean"
    c.kl_placement, c.kl_coef = "none", 0.0
    c.num_minibatches = 4
    return c


def cispo(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """CISPO (MiniMax 2025, "MiniMax-M1", sec. 3.1): REINFORCE weighted by the importance ratio,
    clipped and held constant, so no token's gradient is switched off; the paper sets no lower
    bound (clip_low 0.99 here: clip_low < 1 is required) and tunes only eps_high, whose value it
    does not state (0.28, DAPO's clip-higher, as Trinity-RFT's default); token-level loss; group-
    normalised advantages; no KL term; 4 minibatches per rollout (off-policy updates are where
    CISPO differs from the clipped objective)."""
    c = _critic_free(base(num_steps), "grpo", samples_per_prompt)
    c.advantage_scaling = "group"
    c.objective, c.clip_low, c.clip_high = "cispo", 0.99, 0.28
    c.aggregation = "token_mean"
    c.kl_placement, c.kl_coef = "none", 0.0
    c.num_minibatches = 4
    return c


def reinforce_pp(num_steps: int = 100, samples_per_prompt: int = 8) -> ml_collections.ConfigDict:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"): no critic and no per-prompt group baseline; each token's advantage is its
    reward-to-go (the score at the last token minus beta * KL_t per token: the KL in the reward,
    k1, beta 0.01 as OpenRLHF's init_kl_coef) whitened over the whole batch; PPO's clipped token
    objective, eps 0.2, token-level loss."""
    c = _critic_free(base(num_steps), "reinforce_pp", samples_per_prompt)
    c.objective, c.clip_low, c.clip_high = "clip", 0.2, 0.2
    c.aggregation = "token_mean"
    c.kl_placement, c.kl_estimator, c.kl_coef = "reward", "k1", 0.01
    return c


ALGORITHM_FIELDS = ("loss", "advantage_scaling", "objective", "clip_low", "clip_high", "aggregation", "max_len",
                    "kl_placement", "kl_estimator", "kl_coef", "adaptive_kl", "whiten_advantages", "dynamic_sampling",
                    "oversample", "overlong_buffer", "overlong_penalty_factor", "mask_truncated", "ppo_epochs",
                    "num_minibatches")


def with_algorithm(task: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """A task's RL config (model, data, reward, lengths, batch, optimizer) with the algorithmic
    choices (ALGORITHM_FIELDS) of the preset named `preset` (e.g. 'dapo'); the lengths a preset
    derives from the budget (Dr. GRPO's max_len, DAPO's overlong buffer) are re-derived from the
    task's max_new_tokens. What an ablation over the presets runs on one task."""
    algorithm = globals()[preset](task.num_steps, task.samples_per_prompt)
    c = ml_collections.ConfigDict(task.to_dict())
    for key in ALGORITHM_FIELDS:
        c[key] = algorithm[key]
    if algorithm.max_len:
        c.max_len = c.max_new_tokens
    if algorithm.overlong_buffer:
        c.overlong_buffer = max(c.max_new_tokens // 5, 1)
    return c
