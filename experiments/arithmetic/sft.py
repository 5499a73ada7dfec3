"""Supervised fine-tuning on (problem, worked solution) pairs, from the pre-training run.

    rlhf-jax train --config=experiments/arithmetic/sft.py --workdir=runs/arithmetic/sft \
        --config.init_from=runs/arithmetic/pretrain
"""

import os

from configs import models
from configs.stages import language_model_stage
from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    # 48 bytes hold prompt (<= 16) + response (<= 30 at max_digits=2, '+-') + EOS.
    c = language_model_stage("sft", num_steps=600, batch_size=32, seq_len=48, learning_rate=3e-3)
    c.model = models.tiny()
    c.model.positions = "rope"  # relative positions: copying the operands is learned far sooner
    c.data = load_config_file(os.path.join(HERE, "task.py"))
    c.init_from = "runs/arithmetic/pretrain"
    return c
