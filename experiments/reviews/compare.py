"""PPO vs RLOO vs GRPO vs the DPO family vs best-of-n, on the default pipeline's SFT run and
preference pairs, judged by one evaluation (rlhf_jax/compare.py).

    rlhf-jax compare --config=experiments/reviews/compare.py --workdir=runs/compare

Each method sweeps its KL knob (PPO and DPO: three values; RLOO, GRPO and the other DPO variants: two),
3 seeds per value trained in one vmapped program. PPO, RLOO and GRPO use experiments/reviews/ppo.py with a fixed kl_coef against the
pipeline's reward model (32 rollouts per iteration: PPO 32 prompts x 1, RLOO/GRPO 8 prompts x 4);
the DPO variants use experiments/reviews/dpo.py on the reward stage's own pairs. Evaluation:
one sample per held-out validation prompt (128) at temperature 1, KL(policy || SFT) estimated
from those samples, gold = VADER, RM = the pipeline's reward model (normalised).
"""

import ml_collections

from configs import datasets

PPO = "experiments/reviews/ppo.py"
DPO = "experiments/reviews/dpo.py"
# RL methods: fixed beta, no gold scoring or sample tables during training (the comparison
# evaluates every policy the same way afterwards).
RL = ("adaptive_kl=False", "num_steps=40", "gold_function=", "sample_every=0", "checkpoint_every=40", "log_every=10")
GROUPS = ("samples_per_prompt=4", "batch_size=8", "num_minibatches=2")
DPO_COMMON = ("eval_every=0", "num_steps=64", "checkpoint_every=64")


def method(config, knob, values, *overrides):
    return ml_collections.ConfigDict(dict(config=config, knob=knob, knob_values=tuple(values), overrides=tuple(overrides)))


def get_config():
    c = ml_collections.ConfigDict()
    c.sft = "runs/default/sft"
    c.reward_model = "runs/default/reward"
    c.num_seeds = 3
    c.methods = ml_collections.ConfigDict()
    c.methods.ppo = method(PPO, "kl_coef", (0.03, 0.1, 0.3), *RL)
    c.methods.rloo = method(PPO, "kl_coef", (0.03, 0.3), *RL, "loss=rloo", *GROUPS)
    c.methods.grpo = method(PPO, "kl_coef", (0.03, 0.3), *RL, "loss=grpo", *GROUPS)
    c.methods.dpo = method(DPO + ":sigmoid", "loss.beta", (0.03, 0.1, 0.3), *DPO_COMMON)
    # PPO and DPO at three knob values, the other methods at two: the whole comparison then
    # fits in about an hour and a half on 2 CPU cores.
    c.methods.robust_dpo = method(DPO + ":robust", "loss.beta", (0.03, 0.3), *DPO_COMMON)
    c.methods.ipo = method(DPO + ":ipo", "loss.beta", (0.1, 1.0), *DPO_COMMON)
    c.methods.slic_hinge = method(DPO + ":hinge", "loss.beta", (0.03, 0.3), *DPO_COMMON)
    c.methods.simpo = method(DPO + ":simpo", "loss.beta", (1.0, 4.0), *DPO_COMMON)
    c.best_of_n = ml_collections.ConfigDict(dict(ns=(1, 2, 4, 8, 16, 32, 64)))
    c.eval = ml_collections.ConfigDict(dict(data=datasets.reviews_sft(), split="validation", num_prompts=128,
                                            max_prompt_len=64, max_new_tokens=96, temperature=1.0, batch_size=128,
                                            seed=0))
    c.data_dir = "~/.cache/rlhf_jax/datasets"
    c.gold_function = "rlhf_jax.people.labelers:vader_gold_score"
    c.kl_budgets = (6.0, 15.0)
    return c
