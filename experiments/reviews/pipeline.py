"""The default experiment: the whole RLHF pipeline on the embedded review task, offline.

    rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir=runs/pipeline
    rlhf-jax pipeline --config=experiments/reviews/pipeline.py:dpo --workdir=runs/pipeline_dpo

pre-train a tiny byte-level GPT on generated reviews -> SFT on (prompt, review) pairs ->
sample 2 responses per prompt, pair them, label with a simulated annotator (VADER gold score
+ Bradley-Terry noise: "people prefer the more positive review") -> reward model -> PPO.
With `:dpo`: pre-train -> SFT -> the same pairs and labels -> DPO (no reward model, no RL).
Every stage's config is the experiment file of the same name beside this one; override any
field as --config.<stage>.<key>=<value>.
"""

import os

import ml_collections

from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
    if variant not in ("", "dpo"):
        raise ValueError(f"experiments/reviews/pipeline.py:{variant}: expected no argument or ':dpo'")
    c = ml_collections.ConfigDict()
    c.stages = ("pretrain", "sft", "dpo") if variant == "dpo" else ("pretrain", "sft", "reward", "ppo")
    for stage in c.stages:
        c[stage] = load_config_file(os.path.join(HERE, f"{stage}.py"))
    if variant == "dpo":
        # The DPO stage samples, pairs and labels its own preferences exactly as the reward stage
        # does (same fields, same seed: the same pairs), into dpo/preferences.
        reward = load_config_file(os.path.join(HERE, "reward.py"))
        c.dpo.preferences = reward.preferences
        c.dpo.preferences.enabled = True
        c.dpo.data_dir = reward.data_dir
        c.dpo.eval_every = 50
    # report.md: the SFT and the trained policy judged by rlhf_jax.models.evaluation on held-out prompts
    # (SFT's validation split unless report_prompts lists some), and a table of the first rows.
    c.report_prompts = ()
    c.num_report_prompts = 128
    c.report_table_rows = 8
    c.report_temperature = 0.7
    return c
