"""Pre-train a byte-level GPT on the arithmetic task's worked solutions (packed text).

    rlhf-jax train --config=experiments/arithmetic/pretrain.py --workdir=runs/arithmetic/pretrain

The documents are the train split's 'prompt + response' texts ('What is 347 + 85? 347+80=427,
427+5=432\\n#### 432'), joined with EOS and cut into 128-byte windows: the model learns the
format and the place-value steps; SFT then trains on the responses alone.
"""

import os

from configs import models
from configs.stages import language_model_stage
from rlhf_jax.runtime.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = language_model_stage("pretrain", num_steps=400, batch_size=32, seq_len=128, learning_rate=3e-3)
    c.model = models.tiny()
    c.model.positions = "rope"  # relative positions: copying the operands is learned far sooner
    c.data = load_config_file(os.path.join(HERE, "task.py"))
    return c
