"""The snack-place learner exactly as the articles teach it.

bias starts at 0, learning rate 1.0, plain gradient descent, only the bias trained with the
weight fixed at 20. Run:
    rlhf-jax train --config=experiments/snack_bandit.py --workdir=runs/snack
Variants:
    --config.model.trainable=all                       weight and bias
    --config.num_seeds=1024                            many seeds in one jitted program
    --config.learning_rates="(0.1, 0.3, 1.0)"          a learning-rate sweep, vmapped too
    experiments/snack_bandit.py:mlp                    a small MLP policy
"""

import ml_collections

from configs import mesh, optimizers, snack_models


def get_config(variant="linear"):
    c = ml_collections.ConfigDict()
    c.stage = "snack"
    c.seed = 0
    c.num_seeds = 16
    c.learning_rates = ()  # Empty: use optimizer.learning_rate. Non-empty: each trained num_seeds times.
    c.model = snack_models.mlp() if variant == "mlp" else snack_models.linear(weight=20.0, bias=0.0, trainable="bias")
    # The MLP saturates its tanh units with the articles' step size 1.0; 0.3 learns reliably.
    c.optimizer = optimizers.sgd(learning_rate=0.3 if variant == "mlp" else 1.0)
    c.num_steps = 1000
    c.log_every = 10
    c.checkpoint_every = 100
    c.progress_every_s = 10.0
    c.mesh = mesh.data_parallel()
    c.plot_metrics = ("reward_mean", "bias", "p_b_hunger_0", "p_b_hunger_1")
    return c


def get_sweep():
    """Learning rate x seed groups, for `rlhf-jax sweep`."""
    return [{"optimizer.learning_rate": lr, "seed": s} for lr in (0.1, 1.0) for s in (0, 1)]
