"""Pre-train a tiny byte-level GPT on the embedded review corpus (next-token prediction).

    rlhf-jax train --config=experiments/reviews/pretrain.py --workdir=runs/reviews/pretrain
"""

from configs import datasets
from configs.stages import language_model_stage


def get_config():
    c = language_model_stage("pretrain", num_steps=400, batch_size=16, seq_len=256, learning_rate=2e-3)
    c.data = datasets.reviews()
    c.sample_every = 200
    c.sample_prompts = ("The hotel", "I loved the", "This phone was")
    return c
