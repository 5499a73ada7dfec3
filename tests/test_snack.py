"""The snack-place learner against the articles' worked example and their convergence claims."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import optimizers, snack_models
from rlhf_jax.runtime import config as config_lib, metrics as metrics_lib
from rlhf_jax.stages import snack

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "snack_bandit.py")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def article_learner():
    return snack.init_learner(snack_models.linear(weight=20.0, bias=0.0, trainable="bias"),
                              optimizers.sgd(1.0), 1.0, jax.random.key(0))


def test_articles_worked_example_two_updates():
    """Hunger 0, draws 0.2 then 0.9 (RL with neural networks, parts 3-5)."""
    learner = article_learner()
    assert float(snack.prob_b({**learner["params"], **learner["frozen"]}, 0.0)) == pytest.approx(0.5)

    # 0.2 falls in A's segment [0, 0.5): A, the small portion; not hungry, so reward +1.
    # d(-log(1 - p))/d bias = p = 0.5; step = 1.0 x 0.5 x 1 -> bias = -0.5.
    learner, reward = snack.policy_gradient_update(learner, jnp.float32(0.0), jnp.float32(0.2), optimizers.sgd(1.0))
    assert float(reward) == 1.0
    assert float(learner["params"]["bias"]) == pytest.approx(-0.5, abs=1e-6)
    p_b = float(snack.prob_b({**learner["params"], **learner["frozen"]}, 0.0))
    assert p_b == pytest.approx(sigmoid(-0.5), abs=1e-6)
    assert round(p_b, 1) == 0.4  # The article's rounded "0.4".

    # 0.9 >= p(A) = 0.62: B, the large portion; reward -1. d(-log p)/d bias = -(1 - p) = "-0.6";
    # x reward -1 -> "0.6"; bias = -0.5 - 0.6.
    learner, reward = snack.policy_gradient_update(learner, jnp.float32(0.0), jnp.float32(0.9), optimizers.sgd(1.0))
    assert float(reward) == -1.0
    expected = -0.5 - (1.0 - sigmoid(-0.5))
    assert float(learner["params"]["bias"]) == pytest.approx(expected, abs=1e-6)
    assert float(snack.prob_b({**learner["params"], **learner["frozen"]}, 0.0)) < p_b
    assert float(learner["frozen"]["weight"]) == 20.0  # Only the bias is trained.


def test_choice_line_and_reward_table():
    # A occupies [0, p(A)), B occupies [p(A), 1].
    assert not bool(snack.choose_b(0.3, 0.69))
    assert bool(snack.choose_b(0.3, 0.70))
    assert float(snack.portion_reward(0.9, True)) == 1.0   # hungry, large portion
    assert float(snack.portion_reward(0.9, False)) == -1.0  # hungry, small portion
    assert float(snack.portion_reward(0.1, False)) == 1.0  # not hungry, small portion
    assert float(snack.portion_reward(0.1, True)) == -1.0  # not hungry, large portion


def test_vmapped_learners_match_numpy_reference_update():
    """Many learners, one step each, against the plain NumPy formula on the same draws."""
    config = config_lib.load_config(EXPERIMENT, [("num_seeds", "32")])
    learners = snack.init_learners(config)
    key = jax.random.key(7)
    new, rewards = snack.train_steps(learners, key, 1, config.optimizer)
    k_hunger, k_u = jax.random.split(jax.random.split(key, 1)[0])
    hunger = np.asarray(jax.random.uniform(k_hunger, (32,)))
    u = np.asarray(jax.random.uniform(k_u, (32,)))
    p = 1 / (1 + np.exp(-(20.0 * hunger + 0.0)))
    chose_b = u >= 1 - p
    reward = np.where(chose_b == (hunger > 0.5), 1.0, -1.0)
    derivative = np.where(chose_b, -(1 - p), p)
    np.testing.assert_allclose(np.asarray(new["params"]["bias"]), -1.0 * derivative * reward, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(rewards[0]), reward)


def test_default_run_converges_as_the_articles_say(tmp_path):
    workdir = str(tmp_path / "snack")
    config = config_lib.load_config(EXPERIMENT)
    config_lib.write_resolved_config(config, workdir)
    snack.train(config, workdir)
    rows = metrics_lib.read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(10, 1001, 10))
    for key in ("bias", "p_b_hunger_0", "p_b_hunger_1", "reward_mean"):
        assert all(key in r for r in rows)
    last = rows[-1]
    assert last["p_b_hunger_0"] < 0.01
    assert last["p_b_hunger_1"] > 0.99
    assert -11.5 < last["bias"] < -8.5
    assert rows[0]["reward_mean"] < last["reward_mean"]
    assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["learning_rate"] == 1.0


@pytest.mark.parametrize("variant, overrides", [
    ("linear", [("model.trainable", "all")]),
    ("mlp", []),
])
def test_variants_learn_the_decision(tmp_path, variant, overrides):
    config = config_lib.load_config(f"{EXPERIMENT}:{variant}", overrides + [("num_steps", "2000"), ("num_seeds", "8")])
    workdir = str(tmp_path / variant)
    snack.train(config, workdir)
    last = metrics_lib.read_metrics(workdir)[-1]
    assert last["p_b_hunger_0"] < 0.05 and last["p_b_hunger_1"] > 0.95
    assert last["reward_mean"] > 0.7


def test_learning_rate_sweep_in_one_program(tmp_path):
    config = config_lib.load_config(EXPERIMENT, [("learning_rates", "(0.01, 1.0)"), ("num_seeds", "4"),
                                                 ("num_steps", "200")])
    workdir = str(tmp_path / "lrs")
    learners = snack.train(config, workdir)
    assert learners["params"]["bias"].shape == (8,)
    last = metrics_lib.read_metrics(workdir)[-1]
    # The small learning rate has barely moved the bias in 200 steps; the large one is near -10.
    assert last["bias/lr=0.01"] > -2.5
    assert last["bias/lr=1"] < -7.0
