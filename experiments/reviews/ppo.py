"""PPO on the embedded review task: make the SFT policy write reviews people (VADER) prefer.

    rlhf-jax train --config=experiments/reviews/ppo.py --workdir=runs/reviews/ppo
    rlhf-jax train --config=experiments/reviews/ppo.py:vader --workdir=runs/reviews/ppo_vader
    rlhf-jax train --config=experiments/reviews/ppo.py:no_kl --workdir=runs/reviews/ppo_no_kl
    rlhf-jax sweep --config=experiments/reviews/ppo.py --workdir=runs/reviews/ppo_sweep
    rlhf-jax train --config=experiments/reviews/ppo.py --config.num_seeds=4 --workdir=...  4 seeds at once

Policy and reference: runs/reviews/sft (after the default pipeline instead, add
--config.init_from=runs/default/sft --config.reward_model=runs/default/reward). Reward: the reward model runs/reviews/reward (trained on
VADER-labelled preferences), or with `:vader` the VADER function itself. Gold: VADER compound
sentiment of the same samples (objective/gold_scores), so over-optimisation of the learned
reward model shows up as objective/scores rising while objective/gold_scores falls: `:no_kl`
turns the KL penalty off and trains 200 iterations to show it.

TRL preset ("N implementation details": k1 KL in the reward, whitened advantages, clipped value
loss, missing-EOS penalty) with the KL coefficient adaptive (OpenAI 2019) towards a target of 6
nats per response. Responses are whole reviews ending in EOS (the reward model was trained on
those), at most 96 tokens. The learning rate is larger than TRL's 3e-6 because the policy is
models.tiny() (0.5M params), not a 1B model.
32 prompts x 96 new tokens, 100 iterations of 4 epochs x 4 minibatches: ~3 minutes on 2 CPU cores.

Measured (2026-11-21, fixed beta 0.1, 50 iterations): RM score -0.02 -> 2.33,
gold 0.17 -> 0.61, KL 0.7 -> 12. With beta 0 (200 iterations): RM score rises throughout
(0.0 -> 3.7) while gold peaks near iteration 80 (0.56) and falls (0.07 at 200), KL > 270. The
pipeline default (adaptive beta, 100 iterations): RM -0.14 -> 1.82, gold 0.18 -> 0.61, KL 7.3.
"""

from configs import models, ppo as ppo_configs

VADER = "rlhf_jax.people.labelers:vader_gold_score"


def get_config(arg: str = ""):
    c = ppo_configs.trl(num_steps=100)
    c.model = models.tiny()  # must equal the SFT run's model
    c.init_from = "runs/reviews/sft"
    c.reward_model = "runs/reviews/reward"
    c.gold_function = VADER
    if arg == "vader":
        c.reward_model, c.reward_function = "", VADER
    elif arg and arg != "no_kl":
        raise ValueError(f"experiments/reviews/ppo.py:{arg}: expected no argument, ':vader' or ':no_kl'")
    c.value_model = "policy"
    c.batch_size = 32
    c.max_prompt_len = 64
    c.max_new_tokens = 96
    c.temperature = 0.7
    c.truncate_token = ""
    c.missing_eos = "penalty"
    c.ppo_epochs = 4
    c.num_minibatches = 4
    # Measured on this task: lr 1e-4 with beta 0.05 collapsed within 10 iterations to empty
    # responses (entropy -> 0); lr 2e-5 with beta 0.1 raised the gold score steadily.
    c.kl_coef = 0.1
    c.adaptive_kl = True
    c.kl_target = 6.0
    # OpenAI's horizon 10000 (episodes) barely moves beta in a 3,200-episode run; 320 lets beta
    # change by up to 2% per iteration of 32 episodes.
    c.kl_horizon = 320.0
    c.optimizer.learning_rate = 2e-5
    c.log_every = 5
    c.sample_every = 10
    c.checkpoint_every = 25
    if arg == "no_kl":
        c.kl_coef, c.adaptive_kl, c.num_steps, c.checkpoint_every = 0.0, False, 200, 50
    return c


def get_sweep():
    """Fixed KL coefficients, 3 seeds each; the seeds of one coefficient train in one jitted
    program (num_seeds: vmap), so the sweep is 3 runs, each plotted as mean +- std over seeds."""
    return [{"kl_coef": kl, "adaptive_kl": False, "num_seeds": 3, "num_steps": 60} for kl in (0.03, 0.1, 0.3)]
