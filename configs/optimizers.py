"""Optimizer configs. Every field exists in every optimizer so any can be overridden."""

import ml_collections


def _base(name, learning_rate):
    return ml_collections.ConfigDict(dict(
        name=name, learning_rate=float(learning_rate), schedule="constant", warmup_steps=0,
        decay_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0,
        # A step with a NaN or inf loss, gradient or metric: 'stop' the run (run diverged), or
        # 'skip' its update (params kept, counted) up to max_consecutive_skips steps in a row.
        on_nonfinite="stop", max_consecutive_skips=10))


def sgd(learning_rate=1.0):
    """Gradient descent with step size = learning rate x derivative (the articles' update)."""
    return _base("sgd", learning_rate)


def adam(learning_rate=3e-4, eps=1e-8, grad_clip_norm=1.0, schedule="constant", warmup_steps=0, decay_steps=0):
    c = _base("adam", learning_rate)
    c.update(eps=eps, grad_clip_norm=grad_clip_norm, schedule=schedule, warmup_steps=warmup_steps,
             decay_steps=decay_steps)
    return c


def adamw(learning_rate=3e-4, weight_decay=0.1, **kw):
    c = adam(learning_rate, **kw)
    c.update(name="adamw", weight_decay=weight_decay)
    return c
