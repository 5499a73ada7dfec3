"""The arithmetic task every stage of experiments/arithmetic/ reads (one dataset folder).

    min_digits..max_digits-digit operands, '+' and '-', worked solutions ending '#### N'
    (rlhf_jax/data/arithmetic.py). Held-out problems: the test split (the report), validation
    (SFT's eval loss). Problems are distinct across splits, mirror images included.
"""

from configs import datasets


def get_config():
    # 1-2 digit operands: about 10,100 distinct problems up to commuting '+', so 8,000 train.
    return datasets.arithmetic(seed=0, num_train=8_000, num_validation=500, num_test=500,
                               min_digits=1, max_digits=2, operations="+-")
