"""Reward model on the embedded review task: the SFT policy's own samples, labeled by a simulated
annotator whose gold score is VADER sentiment, so a good reward model ranks positive reviews high.

    rlhf-jax train --config=experiments/reviews/reward.py --workdir=runs/reviews/reward \
        --config.init_from=runs/reviews/sft
    rlhf-jax sweep --config=experiments/reviews/reward.py --workdir=runs/reviews/reward_noise

1024 prompts x 2 samples -> 1024 training pairs, 256 held-out prompts -> 256 held-out pairs;
200 steps of 16 pairs (about 3 epochs). About 3 minutes on 2 CPU cores with models.tiny().
Measured (2026-11-21): 128 prompts x 4 samples (766 pairs from 512 responses) overfit, held-out
accuracy 0.57 and Spearman 0.16 against VADER; 1024 x 2 (2048 distinct responses) reached 0.67
and 0.48.
The sweep varies the annotator's noise temperature: P(a) = sigmoid((vader(a) - vader(b)) / T).
"""

from configs.reward import reward_stage


def get_config():
    c = reward_stage(num_steps=200, batch_size=16, seq_len=256, learning_rate=3e-4)
    c.init_from = "runs/reviews/sft"
    c.preferences.num_prompts = 1024
    c.preferences.num_validation_prompts = 256
    c.preferences.samples_per_prompt = 2
    c.preferences.pairing = "all"
    c.preferences.noise_temperature = 0.1
    c.eval_every = 50
    return c


def get_sweep():
    return [{"preferences.noise_temperature": t} for t in (0.0, 0.25, 1.0)]
