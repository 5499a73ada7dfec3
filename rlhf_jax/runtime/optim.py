"""Optimizers by name from the config (`configs/optimizers.py`).

`learning_rate` may be passed in (a traced scalar inside `vmap`), so a vector of learning rates
trains like a vector of seeds: build the optimizer inside the vmapped function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.runtime import mesh as mesh_lib, metrics as metrics_lib


def learning_rate_schedule(config, learning_rate=None):
    """constant | linear (decay to 0) | cosine, each with `warmup_steps` of linear warm-up."""
    lr = config.learning_rate if learning_rate is None else learning_rate
    warmup, total = int(config.get("warmup_steps", 0)), int(config.get("decay_steps", 0))
    kind = config.get("schedule", "constant")
    if kind == "constant" and not warmup:
        return lr
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(total - warmup, 1))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule={kind!r}: expected 'constant', 'linear' or 'cosine'")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    return decay


def make_optimizer(config, learning_rate=None) -> optax.GradientTransformation:
    """`config.name` in {'sgd', 'adam', 'adamw'}; optional gradient clipping by global norm."""
    name = config.name
    if name == "sgd":
        # Plain gradient descent: new = old - learning_rate * gradient (the articles' step size).
        opt = optax.sgd(learning_rate=learning_rate_schedule(config, learning_rate))
    elif name in ("adam", "adamw"):
        opt = optax.adamw(
            learning_rate=learning_rate_schedule(config, learning_rate), b1=config.b1, b2=config.b2,
            eps=config.eps, weight_decay=config.weight_decay if name == "adamw" else 0.0)
    else:
        raise ValueError(f"optimizer.name={name!r}: expected 'sgd', 'adam' or 'adamw'")
    clip = config.get("grad_clip_norm", 0.0)
    opt = optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
    on_nonfinite = config.get("on_nonfinite", "stop")
    if on_nonfinite == "skip":
        return skip_nonfinite(opt, int(config.get("max_consecutive_skips", 10)))
    if on_nonfinite != "stop":
        raise ValueError(f"optimizer.on_nonfinite={on_nonfinite!r}: expected 'stop' or 'skip'")
    return opt


class SkipNonFiniteState(NamedTuple):
    """The optimizer state under `skip_nonfinite`. run.train_loop reads `skipped_updates`."""

    consecutive: jax.Array  # int32: non-finite updates in a row up to now
    skipped_updates: jax.Array  # int32: updates skipped since the run started (checkpointed)
    inner_state: optax.OptState


def skip_nonfinite(inner: optax.GradientTransformation, max_consecutive: int) -> optax.GradientTransformation:
    """An update holding NaN or inf is dropped: zero updates, the inner state (moments, step
    count) unchanged, and counted. The `max_consecutive + 1`-th in a row is applied instead (a
    run that only produces NaN should stop, not idle): its non-finite metrics then stop the run
    in run.train_loop. (optax.apply_if_finite does the same but counts applied non-finite
    updates as skipped too, so a run could not tell the two apart.)"""

    def init(params):
        return SkipNonFiniteState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
        consecutive = jnp.where(finite, 0, state.consecutive + 1)
        skip = jnp.logical_not(finite) & (consecutive <= max_consecutive)
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        return new_updates, SkipNonFiniteState(consecutive, state.skipped_updates + skip.astype(jnp.int32),
                                               keep(new_inner, state.inner_state))

    return optax.GradientTransformation(init, update)


def make_train_step(loss_fn, optimizer, mesh, state_shardings, num_seeds: int = 1, frozen=None):
    """jit(train_step)(state, batch, rng) -> (state, metrics) for any supervised loss
    `loss_fn(params, batch) -> (loss, metrics)` (next-token in pretrain.py, Bradley-Terry in
    reward.py, DPO in dpo.py). State {'params', 'opt_state'}; its buffers are donated; the batch
    is split over every device of the mesh.

    frozen: params the loss reads but never trains (LoRA's base weights, placed on the mesh):
    then the loss is `loss_fn(params, batch, frozen)`, frozen is a jit argument (not a constant
    baked into the program, not donated, not copied) and `params` are the adapters and heads.

    num_seeds S > 1: the state and the batch carry a leading seed axis [S] (unsplit; shardings
    from mesh.stacked), the step is vmapped over it (frozen is shared), and the metrics are
    run.seed_summary's mean and `_std` over seeds.
    """

    def train_step(state, batch, rng, frozen):
        del rng  # Dropout is off; the signature is the one every stage shares.
        loss = loss_fn if frozen is None else (lambda params, batch: loss_fn(params, batch, frozen))
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state}, metrics

    batch_sharding = mesh_lib.batch_sharding(mesh)
    step = train_step
    if num_seeds > 1:
        per_seed, batch_sharding = jax.vmap(train_step, in_axes=(0, 0, None, None)), mesh_lib.stacked(batch_sharding)

        def step(state, batch, rng, frozen):
            state, metrics = per_seed(state, batch, rng, frozen)
            return state, metrics_lib.seed_summary(metrics)

    frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding, None, frozen_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=0)
    return lambda state, batch, rng: jitted(state, batch, rng, frozen)


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_optimizer_config(c):
    """rlhf_jax.runtime.optim.make_optimizer's fields."""
    c.choice("optimizer.name", ("sgd", "adam", "adamw"))
    c.positive("optimizer.learning_rate")
    c.choice("optimizer.schedule", ("constant", "linear", "cosine"))
    c.integer("optimizer.warmup_steps", 0)
    c.integer("optimizer.decay_steps", 0)
    c.number("optimizer.b1", 0.0, 1.0, high_open=True)
    c.number("optimizer.b2", 0.0, 1.0, high_open=True)
    c.positive("optimizer.eps")
    c.number("optimizer.weight_decay", 0.0)
    c.number("optimizer.grad_clip_norm", 0.0)
    c.choice("optimizer.on_nonfinite", ("stop", "skip"))
    c.integer("optimizer.max_consecutive_skips", 0)
