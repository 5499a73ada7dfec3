"""Data: the embedded review corpus, TFDS array_record builders, and Grain batch loaders.

    from rlhf_jax.data import load_dataset, pretrain_batches
    sources = load_dataset(configs.datasets.reviews(), data_dir)  # {'train': .., 'validation': ..}
    batches = pretrain_batches(sources['train'], tokenizer, seq_len=128, batch_size=32, seed=0)
    batch = batches[step]                                           # pure function of (seed, step)
"""

from rlhf_jax.data.builders import load_dataset, load_imdb_reviews, load_preferences, write_preferences
from rlhf_jax.data.loaders import (
    preference_batches, pretrain_batches, prompt_batches, prompt_texts, sft_batches, unigram_entropy
)
from rlhf_jax.data.reviews import generate_reviews, review_splits, sft_examples
