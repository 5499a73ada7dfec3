"""Continual improvement in rounds on the embedded review task (rlhf_jax.drivers.rounds).

    rlhf-jax rounds --config=experiments/reviews/rounds.py --workdir=runs/rounds
    rlhf-jax rounds --config=experiments/reviews/rounds.py:dpo --workdir=runs/rounds_dpo
    rlhf-jax rounds --config=experiments/reviews/rounds.py --workdir=runs/rounds --config.labeler=web
        (and, beside it: rlhf-jax serve --data=runs/rounds/labels)

Pre-train -> SFT once (or --config.base_policy=<an SFT run> to start from one), then each round:
sample pairs from the current policy on prompts no earlier round used, label them (the simulated
annotator: VADER gold + Bradley-Terry noise, as the default pipeline; or people through the web
app), train a reward model on every label so far, and continue PPO (or DPO with `:dpo`) from the
current policy, the frozen reference being the SFT policy (--config.reference=previous: the
previous round's). Round 0 is the default pipeline's reward -> PPO on the SFT policy's pairs.
"""

import os

import ml_collections

from configs import datasets
from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
VADER = "rlhf_jax.people.labelers:vader_gold_score"


def get_config(variant: str = ""):
    if variant not in ("", "dpo"):
        raise ValueError(f"experiments/reviews/rounds.py:{variant}: expected no argument or ':dpo'")
    c = ml_collections.ConfigDict()
    c.num_rounds = 3
    c.seed = 0
    # '' = pre-train and SFT into <workdir>/base first (the default pipeline's first two stages).
    c.base_policy = ""
    c.pretrain = load_config_file(os.path.join(HERE, "pretrain.py"))
    c.sft = load_config_file(os.path.join(HERE, "sft.py"))
    c.policy_stage = "dpo" if variant == "dpo" else "ppo"
    c.reference = "sft"  # the frozen reference of every round: 'sft' or 'previous' (the last round's policy)
    c.labeler = "simulated"  # 'simulated' (the gold score + noise) or 'web' (people, through rlhf-jax serve)
    c.answers_per_pair = 1  # web: annotators asked each pair
    c.web_poll_seconds = 15.0  # web: how often the driver looks at the store while waiting for labels
    c.quota = 0  # web: labelled train pairs a round needs before training (0 = all of the round's)
    # Round r > 0's reward model starts from round r - 1's (False: from SFT with a new head each round).
    c.continue_reward = True

    # Each round's pairs, sampled from the current policy on fresh prompts (round r takes the
    # r-th block of num_prompts of a fixed shuffle of the train split; the same for validation).
    c.pairs = ml_collections.ConfigDict()
    c.pairs.prompts = datasets.reviews_sft()
    c.pairs.train_split = "train"
    c.pairs.validation_split = "validation"
    c.pairs.num_prompts = 1024
    c.pairs.num_validation_prompts = 128
    c.pairs.samples_per_prompt = 2
    c.pairs.pairing = "all"
    c.pairs.temperature = 1.0
    c.pairs.top_k = 0
    c.pairs.top_p = 1.0
    c.pairs.max_prompt_len = 64
    c.pairs.max_new_tokens = 96
    c.pairs.batch_size = 32
    c.pairs.noise_temperature = 0.1  # simulated: P(a) = sigmoid((gold(a) - gold(b)) / T)
    c.pairs.gold = VADER
    # Where each round's labelled pairs are written (a TFDS preference dataset in <round>/tfds) and
    # read back by that round's reward and DPO stages.
    c.pairs.dataset = datasets.preferences("preferences")
    c.data_dir = "~/.cache/rlhf_jax/datasets"

    # The stages trained each round; init_from / reference_from / reward_model / data are wired
    # by the driver.
    c.reward = load_config_file(os.path.join(HERE, "reward.py"))
    c.reward.preferences.enabled = False
    c.ppo = load_config_file(os.path.join(HERE, "ppo.py"))
    c.ppo.num_steps = 60  # per round: 3 rounds of 60 iterations, the pipeline's 100 plus room to move
    c.dpo = load_config_file(os.path.join(HERE, "dpo.py"))

    # The report: every round's policy judged on the same held-out prompts (SFT's validation split).
    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 128
    c.eval.temperature = 0.7
    c.eval.max_new_tokens = 96
    c.eval.gold = VADER
    return c
