"""Pre-train a tiny byte-level GPT on the embedded review corpus (next-token prediction).

    rlhf-jax train --config=experiments/reviews/pretrain.py --workdir=runs/reviews/pretrain
"""

from configs import datasets
from configs.stages import language_model_stage


def get_config():
    # Windows of 128 bytes (a review is ~90): 37% more tokens/s than 256 on 2 CPU cores, and
    # lr 3e-3 reaches validation loss ~0.44 nats/byte (unigram: 3.12) in 600 steps (~2.5 min).
    c = language_model_stage("pretrain", num_steps=600, batch_size=32, seq_len=128, learning_rate=3e-3)
    c.data = datasets.reviews()
    c.sample_every = 300
    c.sample_prompts = ("The hotel", "I loved the", "This phone was")
    return c
