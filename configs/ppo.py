"""PPO stage configs: every implementation detail that decides whether RLHF works is a field.

    base()          all fields, neutral values (what the two presets start from)
    openai_2019()   Ziegler et al. 2019 (lm-human-preferences): adaptive KL 0.15 -> target 6
                    over a horizon of 10000 episodes, reward-model normalisation, no reward or
                    advantage-free tricks beyond whitened advantages
    trl()           Hugging Face TRL / "The N implementation details of RLHF with PPO":
                    fixed KL 0.05 (k1), whitened advantages, value clipping 0.2, vf_coef 0.1,
                    missing-EOS penalty -1, temperature 0.7, Adam eps 1e-5

Fields (see rlhf_jax/ppo.py):
    seed, num_seeds        num_seeds > 1 trains seeds seed, seed+1, ... at once (vmap; small models):
                           metrics are the mean over seeds and `<name>_std`
    init_from              SFT run: the policy and the frozen reference start from it
    model                  must equal init_from's model (the workdir's config.json describes the policy)
    reward_model           reward run workdir (scalar at the last real token), or
    reward_function        'module:fn' of fn(prompt, response) -> float, called on the host
    use_reward_normalization  apply the reward run's (mean, std) normalisation to its scores
    gold_function          'module:fn' logged as objective/gold_scores on the same samples ('' = off)
    value_model            'policy' (scalar head on the policy), 'reward_model' or 'sft' (separate)
    loss                   'ppo' | 'reinforce' | 'reinforce_baseline' | 'rloo' | 'grpo'
    samples_per_prompt     K responses per prompt (>= 2 for rloo / grpo)
    baseline_decay         EMA decay of the reinforce_baseline baseline
    batch_size             prompts per iteration (rollout batch = batch_size * K)
    max_prompt_len, max_new_tokens, temperature, top_k, top_p    sampling
    missing_eos            'keep' (score as is) | 'penalty' (score := missing_eos_penalty)
    truncate_token         '' or one token: responses end after its first occurrence (it counts as EOS)
    kl_estimator           'k1' | 'k2' | 'k3' | 'abs' (per token, in the reward)
    kl_coef, adaptive_kl, kl_target, kl_horizon     beta; adaptive: Ziegler et al. controller
    whiten_rewards         whiten per-token rewards (mean kept)
    whiten_advantages      whiten GAE advantages (loss 'ppo')
    gamma, lam             GAE
    clip_eps, value_clip, vf_coef, entropy_coef       losses
    ppo_epochs, num_minibatches                       update: epochs over shuffled minibatches
    optimizer              configs/optimizers.py: learning rate, schedule, Adam eps, grad clipping
"""

import ml_collections

from configs import datasets, lora, mesh, models, optimizers


def base(num_steps: int = 100) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "ppo"
    c.seed = 0
    c.num_seeds = 1  # > 1: seeds seed ... seed + num_seeds - 1 vmapped in one jitted program
    c.model = models.tiny()
    c.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path=""))
    c.lora = lora.off()  # --config.lora.rank=8: train adapters only (rlhf_jax/lora.py)
    c.init_from = ""
    c.reward_model = ""
    c.reward_function = ""
    c.use_reward_normalization = True
    c.gold_function = ""
    c.value_model = "policy"
    c.loss = "ppo"
    c.samples_per_prompt = 1
    c.baseline_decay = 0.9
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
    c.clip_eps = 0.2
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
    c.clip_eps = 0.2
    c.vf_coef = 0.1
    c.missing_eos = "penalty"
    c.missing_eos_penalty = -1.0
    c.temperature = 0.7
    c.ppo_epochs = 4
    c.num_minibatches = 1
    c.optimizer = optimizers.adam(3e-6, eps=1e-5, grad_clip_norm=1.0)
    return c
