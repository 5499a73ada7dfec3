"""Verifiable rewards end to end: pre-train -> SFT -> GRPO against the arithmetic verifier.

    rlhf-jax pipeline --config=experiments/arithmetic/pipeline.py --workdir=runs/arithmetic

pre-train a byte-level GPT (RoPE) on worked solutions of integer '+' / '-' problems -> SFT on
(problem, worked solution) pairs -> GRPO with `rlhf_jax.data.arithmetic:arithmetic_reward` as
the reward function (1 for exactly one right '#### N' answer line, else 0): no preferences, no
reward model. The task (operand sizes, splits) is task.py; every stage's config is the file of
the same name beside this one; override any field as --config.<stage>.<key>=<value>.

At the end `report.md` / `report.json` (rlhf_jax.drivers.pipeline.write_accuracy_report): SFT
and RL accuracy on the held-out test problems, greedy (the headline) and sampled
(report_samples_per_prompt at report_temperature, with pass@k: the ceiling sampling reaches),
and `curves.png` (training accuracy, response length, entropy against GRPO step).
"""

import os

import ml_collections

from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = ml_collections.ConfigDict()
    c.stages = ("pretrain", "sft", "ppo")
    for stage in c.stages:
        c[stage] = load_config_file(os.path.join(HERE, f"{stage}.py"))
    c.verifier = c.ppo.reward_function  # the report judges with the reward GRPO trained on
    c.report_split = "test"
    c.report_prompts = ()
    c.num_report_prompts = 500
    c.report_samples_per_prompt = 8
    c.report_pass_k = (1, 2, 4, 8)
    c.report_temperature = 1.0  # the GRPO sampling temperature
    c.report_seed = 0
    c.report_table_rows = 8
    return c
