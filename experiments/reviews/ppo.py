"""PPO on the embedded review task: make the SFT policy write positive reviews.

    rlhf-jax train --config=experiments/reviews/ppo.py --workdir=runs/reviews/ppo
    rlhf-jax train --config=experiments/reviews/ppo.py:vader --workdir=runs/reviews/ppo_vader
    rlhf-jax sweep --config=experiments/reviews/ppo.py --workdir=runs/reviews/ppo_sweep

Policy and reference: runs/reviews/sft. Reward: the reward model runs/reviews/reward (trained on
VADER-labelled preferences), or with `:vader` the VADER function itself. Gold: VADER compound
sentiment of the same samples (objective/gold_scores), so reward hacking of the learned reward
model shows up as objective/scores rising while objective/gold_scores does not.

TRL preset ("N implementation details"): fixed KL (k1; 0.1 here, TRL's 0.05 let the tiny policy
collapse), whitened advantages, clipped value
loss, missing-EOS penalty. As in OpenAI 2019's sentiment task, responses end at the first '.'
(`truncate_token`); one that has none within 48 tokens gets the penalty -1. The learning rate is
larger than TRL's 3e-6 because the policy is models.tiny() (0.5M params), not a 1B model.
32 prompts x 48 new tokens, 50 iterations of 4 epochs x 4 minibatches: ~5 minutes on 2 CPU cores.
"""

from configs import models
from configs import ppo as ppo_configs

VADER = "rlhf_jax.labelers:vader_gold_score"


def get_config(arg: str = ""):
    c = ppo_configs.trl(num_steps=50)
    c.model = models.tiny()  # must equal the SFT run's model
    c.init_from = "runs/reviews/sft"
    c.reward_model = "runs/reviews/reward"
    c.gold_function = VADER
    if arg == "vader":
        c.reward_model, c.reward_function = "", VADER
    elif arg:
        raise ValueError(f"experiments/reviews/ppo.py:{arg}: expected no argument or ':vader'")
    c.value_model = "policy"
    c.batch_size = 32
    c.max_prompt_len = 64
    c.max_new_tokens = 48
    c.temperature = 0.7
    c.truncate_token = "."
    c.missing_eos = "penalty"
    c.ppo_epochs = 4
    c.num_minibatches = 4
    # Measured on this task: lr 1e-4 with beta 0.05 collapsed within 10 iterations to empty or
    # '.'-only responses (score exactly 0 beats the risk of a negative review, entropy -> 0);
    # lr 2e-5 with beta 0.1 raised the VADER gold score steadily (0.05 -> 0.2 in 50 iterations).
    c.kl_coef = 0.1
    c.optimizer.learning_rate = 2e-5
    c.log_every = 5
    c.sample_every = 10
    c.checkpoint_every = 25
    return c


def get_sweep():
    return [{"kl_coef": kl, "seed": seed} for kl in (0.05, 0.1, 0.2) for seed in (0, 1)]
