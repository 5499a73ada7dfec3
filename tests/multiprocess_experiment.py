"""The tiny runs tests/test_multiprocess.py launches as 1 or 2 processes (a config file, since
`rlhf-jax launch` starts fresh processes). `:pretrain` (default) or `:reward`."""

from configs import datasets, models
from configs.reward import reward_stage
from configs.stages import language_model_stage


def micro_model():
    m = models.tiny()
    m.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    return m


def get_config(stage="pretrain"):
    if stage == "reward":
        return reward_config()
    c = language_model_stage("pretrain", num_steps=6, batch_size=8, seq_len=32, learning_rate=3e-3)
    c.model = micro_model()
    c.data = datasets.reviews(num_train=200, num_validation=40)
    c.data_dir = "/tmp/rlhf_jax_multiprocess_data"  # tests override it
    c.log_every, c.checkpoint_every, c.eval_every, c.eval_batches = 1, 3, 3, 2
    return c


def reward_config():
    """A reward model from `init_from` (tests: a random SFT stand-in) on pairs read from a JSONL
    file (`data.path`). No held-out evaluation: its scorer runs on one host (see README)."""
    c = reward_stage(num_steps=6, batch_size=8, seq_len=48, learning_rate=3e-3)
    c.model = micro_model()
    c.preferences.enabled = False
    c.data = datasets.preferences_jsonl("", validation_fraction=0.0)
    c.data_dir = "/tmp/rlhf_jax_multiprocess_data"
    c.log_every, c.checkpoint_every, c.eval_every = 1, 3, 0
    return c
