"""The default experiment: the whole RLHF pipeline on the embedded review task, offline.

    rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir=runs/pipeline

pre-train a tiny byte-level GPT on generated reviews -> SFT on (prompt, review) pairs ->
sample 4 responses per prompt, pair them, label with a simulated annotator (VADER gold score
+ Bradley-Terry noise: "people prefer the more positive review") -> reward model -> PPO.
Every stage's config is the experiment file of the same name beside this one; override any
field as --config.<stage>.<key>=<value>.
"""

import os

import ml_collections

from rlhf_jax.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = ml_collections.ConfigDict()
    for stage in ("pretrain", "sft", "reward", "ppo"):
        c[stage] = load_config_file(os.path.join(HERE, f"{stage}.py"))
    # report.md: responses of the SFT and PPO policies to held-out prompts (PPO's validation
    # split unless report_prompts lists some), their mean gold score, and a table of the first rows.
    c.report_prompts = ()
    c.num_report_prompts = 128
    c.report_table_rows = 8
    c.report_temperature = 0.7
    return c
