"""The arithmetic task's RL stage (experiments/arithmetic/ppo.py) under one of the GRPO-family
presets of configs/ppo.py: the task's model, data, verifier, lengths, batch and optimizer, the
preset's algorithmic choices (configs.ppo.with_algorithm). What experiments/arithmetic/ablate.py
compares.

    rlhf-jax train --config=experiments/arithmetic/rl.py:dapo --workdir=runs/arithmetic/dapo \
        --config.init_from=runs/arithmetic/sft

Argument: grpo | dr_grpo | dapo | gspo | cispo | reinforce_pp (default grpo).
"""

import os

from configs import ppo as ppo_configs
from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp")


def get_config(preset: str = "grpo"):
    if preset not in PRESETS:
        raise ValueError(f"experiments/arithmetic/rl.py:{preset}: expected one of {', '.join(PRESETS)}")
    return ppo_configs.with_algorithm(load_config_file(os.path.join(HERE, "ppo.py")), preset)
