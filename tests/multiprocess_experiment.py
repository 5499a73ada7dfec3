"""The tiny runs tests/test_multiprocess.py launches as 1 or 2 processes (a config file, since
`rlhf-jax launch` starts fresh processes). `:pretrain` (default), `:reward`, `:ppo` or `:dpo`."""

from configs import datasets, models, optimizers, ppo as ppo_configs
from configs.dpo import dpo_stage
from configs.reward import reward_stage
from configs.stages import language_model_stage


def micro_model():
    m = models.tiny()
    m.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    return m


def get_config(stage="pretrain"):
    if stage == "reward":
        return reward_config()
    if stage == "ppo":
        return ppo_config()
    if stage == "dpo":
        return dpo_config()
    c = language_model_stage("pretrain", num_steps=6, batch_size=8, seq_len=32, learning_rate=3e-3)
    c.model = micro_model()
    c.data = datasets.reviews(num_train=200, num_validation=40)
    c.data_dir = "/tmp/rlhf_jax_multiprocess_data"  # tests override it
    c.log_every, c.checkpoint_every, c.eval_every, c.eval_batches = 1, 3, 3, 2
    return c


def reward_config():
    """A reward model from `init_from` (tests: a random SFT stand-in) on pairs read from a JSONL
    file (`data.path`), evaluated on held-out pairs, its rewards normalised on SFT samples."""
    c = reward_stage(num_steps=6, batch_size=8, seq_len=48, learning_rate=3e-3)
    c.model = micro_model()
    c.preferences.enabled = False
    c.preferences.prompts = datasets.reviews_sft(num_train=64, num_validation=32)  # (normalisation prompts)
    c.data = datasets.preferences_jsonl("", validation_fraction=0.25)
    c.data_dir = "/tmp/rlhf_jax_multiprocess_data"
    c.log_every, c.checkpoint_every, c.eval_every = 1, 3, 3
    c.normalize.update(num_prompts=8, samples_per_prompt=2, max_prompt_len=16, max_new_tokens=8, batch_size=8)
    return c


def lowercase_fraction(prompt: str, response: str) -> float:
    """A host-side reward function: the fraction of lowercase letters in the response."""
    del prompt
    return sum("a" <= ch <= "z" for ch in response) / max(len(response), 1)


def ppo_config():
    """PPO from `init_from` (tests: a random SFT stand-in) with a Python reward function, which
    each process runs on its own samples."""
    c = ppo_configs.trl(num_steps=4)
    c.model = micro_model()
    c.reward_function = "tests.multiprocess_experiment:lowercase_fraction"
    c.gold_function = "tests.multiprocess_experiment:lowercase_fraction"
    c.prompts = ("The hotel", "I loved", "A film", "My phone", "The cafe was", "Our room", "Service", "Food")
    c.batch_size = 8
    c.max_prompt_len, c.max_new_tokens = 16, 8
    c.missing_eos = "keep"
    c.num_minibatches, c.ppo_epochs = 2, 1
    c.optimizer = optimizers.adam(3e-3, eps=1e-5, grad_clip_norm=1.0)
    c.log_every, c.checkpoint_every, c.sample_every = 1, 2, 2
    return c


def dpo_config():
    """DPO from `init_from` on pairs read from a JSONL file (`data.path`), no held-out evaluation."""
    c = dpo_stage()
    c.model = micro_model()
    c.data = datasets.preferences_jsonl("", validation_fraction=0.0)
    c.data_dir = "/tmp/rlhf_jax_multiprocess_data"
    c.batch_size, c.seq_len, c.num_steps = 8, 48, 4
    c.log_every, c.checkpoint_every, c.eval_every = 1, 2, 0
    return c
