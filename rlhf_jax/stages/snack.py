"""The snack-place policy-gradient learner of the article series (RL with neural networks, parts 1-6).

Hunger in [0, 1] goes in; the network gives p(B) = sigmoid(weight * hunger + bias). Place B
serves a large portion, place A a small one. One update:

  1. choose: draw u ~ U(0, 1) on the line [0, p(A)) -> A, [p(A), 1] -> B;
  2. guess that the chosen place was right and take the derivative of its cross-entropy,
     -log p(chosen), with respect to the trainable parameters;
  3. reward: +1 if the portion fits the hunger (large when hunger > 0.5, small otherwise), else -1;
  4. updated derivative = derivative x reward; step = learning rate x updated derivative.

Many learners (seeds x learning rates) train at once: the state has a leading "run" axis, the
update is `vmap`ped over it and `lax.scan`ned over steps inside one jitted program (PureJaxRL
style), and the run axis is sharded across the devices of the mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rlhf_jax.runtime import checks, mesh as mesh_lib, run as run_lib
from rlhf_jax.runtime.optim import check_optimizer_config, make_optimizer

# ----------------------------------------------------------------------------- the policy


def init_params(model, key):
    """Returns (trainable, frozen) parameter dicts of one learner."""
    if model.kind == "linear":
        params = {"weight": jnp.float32(model.weight), "bias": jnp.float32(model.bias)}
        if model.trainable == "bias":
            return {"bias": params["bias"]}, {"weight": params["weight"]}
        if model.trainable == "all":
            return params, {}
        raise ValueError(f"model.trainable={model.trainable!r}: expected 'bias' or 'all'")
    if model.kind == "mlp":
        k1, k2 = jax.random.split(key)
        h = model.hidden
        params = {
            "hidden_w": jax.random.normal(k1, (h,)) * 2.0,
            "hidden_b": jax.random.normal(k2, (h,)) * 1.0,
            "out_w": jnp.zeros((h,)),
            "bias": jnp.float32(model.bias),
        }
        return params, {}
    raise ValueError(f"model.kind={model.kind!r}: expected 'linear' or 'mlp'")


def logit_b(params, hunger):
    """The network's pre-sigmoid output x; p(B) = sigmoid(x). Works for both model kinds."""
    if "hidden_w" in params:
        hidden = jnp.tanh(hunger * params["hidden_w"] + params["hidden_b"])
        return hidden @ params["out_w"] + params["bias"]
    return params["weight"] * hunger + params["bias"]


def prob_b(params, hunger):
    return jax.nn.sigmoid(logit_b(params, hunger))


def choose_b(p_b, u):
    """The articles' line: A occupies [0, p(A)), B occupies [p(A), 1]."""
    return u >= 1.0 - p_b


def portion_reward(hunger, chose_b):
    """+1 when the portion fits the hunger (B's large portion when hunger > 0.5), else -1."""
    return jnp.where(chose_b == (hunger > 0.5), 1.0, -1.0)


def cross_entropy_of_choice(trainable, frozen, hunger, chose_b):
    """-log p(chosen place), as if the chosen place were the ideal output."""
    x = logit_b({**trainable, **frozen}, hunger)
    return -jnp.where(chose_b, jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x))


def policy_gradient_update(learner, hunger, u, optimizer_config):
    """One update of one learner from its draws (hunger, u). Returns (learner, reward)."""
    params = {**learner["params"], **learner["frozen"]}
    chose_b = choose_b(prob_b(params, hunger), u)
    reward = portion_reward(hunger, chose_b)
    derivative = jax.grad(cross_entropy_of_choice)(learner["params"], learner["frozen"], hunger, chose_b)
    updated_derivative = jax.tree.map(lambda d: d * reward, derivative)
    optimizer = make_optimizer(optimizer_config, learning_rate=learner["learning_rate"])
    updates, opt_state = optimizer.update(updated_derivative, learner["opt_state"], learner["params"])
    new_params = jax.tree.map(jnp.add, learner["params"], updates)
    return {**learner, "params": new_params, "opt_state": opt_state}, reward


def init_learner(model, optimizer_config, learning_rate, key):
    params, frozen = init_params(model, key)
    optimizer = make_optimizer(optimizer_config, learning_rate=learning_rate)
    return {"params": params, "frozen": frozen, "opt_state": optimizer.init(params),
            "learning_rate": jnp.float32(learning_rate)}


# ----------------------------------------------------------------------------- many learners


def learning_rates_of(config) -> list[float]:
    return [float(x) for x in config.learning_rates] or [float(config.optimizer.learning_rate)]


def init_learners(config):
    """All runs: learning rates (outer) x seeds (inner), stacked on a leading run axis [R]."""
    lrs = learning_rates_of(config)
    run_lr = jnp.repeat(jnp.asarray(lrs, jnp.float32), config.num_seeds)
    keys = jax.random.split(jax.random.key(config.seed), len(run_lr))
    init = functools.partial(init_learner, config.model, config.optimizer)
    return jax.vmap(init)(run_lr, keys)


def train_steps(learners, rng, num_steps: int, optimizer_config):
    """`num_steps` updates of every learner (vmapped), scanned. Returns (learners, rewards [S, R])."""
    num_runs = jax.tree.leaves(learners["learning_rate"])[0].shape[0]
    update = jax.vmap(functools.partial(policy_gradient_update, optimizer_config=optimizer_config))

    def one_step(learners, key):
        k_hunger, k_u = jax.random.split(key)
        hunger = jax.random.uniform(k_hunger, (num_runs,))
        u = jax.random.uniform(k_u, (num_runs,))
        return update(learners, hunger, u)

    return jax.lax.scan(one_step, learners, jax.random.split(rng, num_steps))


def summarize(learners, rewards, learning_rates, num_seeds):
    """Means (and spreads) over seeds of what the articles watch; per learning rate if several."""
    params = {**learners["params"], **learners["frozen"]}
    tracked = {
        "bias": params["bias"],
        "p_b_hunger_0": jax.vmap(prob_b, (0, None))(params, 0.0),
        "p_b_hunger_1": jax.vmap(prob_b, (0, None))(params, 1.0),
        "reward_mean": rewards.mean(axis=0),
    }
    metrics = {}
    for name, per_run in tracked.items():
        metrics[name] = per_run.mean()
        metrics[name + "_std"] = per_run.std()
        if len(learning_rates) > 1:
            by_lr = per_run.reshape(len(learning_rates), num_seeds).mean(axis=1)
            for i, lr in enumerate(learning_rates):
                metrics[f"{name}/lr={lr:g}"] = by_lr[i]
    return metrics


def make_train_chunk(config, mesh):
    """A jitted step_fn for `run.train_loop`: `log_every` updates of every learner."""
    learning_rates = learning_rates_of(config)
    runs = mesh_lib.batch_sharding(mesh)

    def train_chunk(learners, _batch, rng):
        learners, rewards = train_steps(learners, rng, config.log_every, config.optimizer)
        return learners, summarize(learners, rewards, learning_rates, config.num_seeds)

    return jax.jit(train_chunk, in_shardings=(runs, None, None),
                   out_shardings=(runs, None), donate_argnums=0)


def train(config, workdir: str):
    mesh = mesh_lib.make_mesh(config.mesh)
    learners = jax.device_put(init_learners(config), mesh_lib.batch_sharding(mesh))
    learners = run_lib.train_loop(
        workdir=workdir, state=learners, step_fn=make_train_chunk(config, mesh), batch_fn=None,
        num_steps=config.num_steps, rng=jax.random.key(config.seed + 1), log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, steps_per_call=config.log_every,
        progress_every_s=config.get("progress_every_s", 10.0),
        headline=("reward_mean", "bias", "p_b_hunger_0", "p_b_hunger_1"))
    return learners


# ----------------------------------------------------------------------------- the checkpointed state (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of the stacked learners, from the config alone."""
    return jax.eval_shape(lambda: init_learners(config))


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_config(c):
    """The snack learner: `log_every` updates per jitted call, so it divides the run and checkpoints."""
    run_lib.check_loop_config(c), check_optimizer_config(c)
    log_every = c.get("log_every")
    for key in ("num_steps", "checkpoint_every"):
        if c.get(key) % log_every:
            c.fail(key, c.get(key), f"expected a multiple of log_every={log_every}")
    rates = c.get("learning_rates")
    for i, rate in enumerate(rates if rates is not checks.MISSING else ()):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            c.fail("learning_rates", tuple(rates), f"expected finite numbers > 0 (item {i} is {rate!r})")
    c.choice("model.kind", ("linear", "mlp"))
    if c.get("model.kind") == "linear":
        c.choice("model.trainable", ("bias", "all"))
    else:
        c.integer("model.hidden", 1)
    devices = mesh_lib.mesh_devices(c)
    num_runs = max(len(rates) if rates is not checks.MISSING else 0, 1) * c.get("num_seeds")
    if devices and num_runs % devices:
        c.fail("num_seeds", c.get("num_seeds"), f"num_seeds x learning rates = {num_runs} runs cannot be split "
               f"over the {devices} devices of the mesh: expected a multiple of {devices}")
