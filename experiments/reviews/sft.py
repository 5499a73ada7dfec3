"""Supervised fine-tuning on (prompt, review) pairs, initialised from the pre-training run.

    rlhf-jax train --config=experiments/reviews/sft.py --workdir=runs/reviews/sft \
        --config.init_from=runs/reviews/pretrain
"""

from configs import datasets
from configs.stages import language_model_stage


def get_config():
    # 224 covers prompt + review + EOS for all but the longest ~0.5% (truncated from the left).
    c = language_model_stage("sft", num_steps=200, batch_size=16, seq_len=224, learning_rate=1e-3)
    c.data = datasets.reviews_sft()
    c.init_from = "runs/reviews/pretrain"
    c.sample_every = 100
    c.sample_prompts = ("Write a review of the hotel:", "Review the film:", "The cafe was")
    return c
