"""Reward model on the embedded review task: the SFT policy's own samples, labeled by a simulated
annotator whose gold score is VADER sentiment, so a good reward model ranks positive reviews high.

    rlhf-jax train --config=experiments/reviews/reward.py --workdir=runs/reviews/reward \
        --config.init_from=runs/reviews/sft
    rlhf-jax sweep --config=experiments/reviews/reward.py --workdir=runs/reviews/reward_noise

128 prompts x 4 samples -> 768 training pairs ('all' pairs), 32 held-out prompts -> 192 held-out
pairs; 150 steps of 16 pairs (about 3 epochs). A minute or two on 2 CPU cores with models.tiny().
The sweep varies the annotator's noise temperature: P(a) = sigmoid((vader(a) - vader(b)) / T).
"""

from configs.reward import reward_stage


def get_config():
    c = reward_stage(num_steps=150, batch_size=16, seq_len=256, learning_rate=3e-4)
    c.init_from = "runs/reviews/sft"
    c.preferences.num_prompts = 128
    c.preferences.num_validation_prompts = 32
    c.preferences.samples_per_prompt = 4
    c.preferences.pairing = "all"
    c.preferences.noise_temperature = 0.1
    c.eval_every = 50
    return c


def get_sweep():
    return [{"preferences.noise_temperature": t} for t in (0.0, 0.25, 1.0)]
