"""LoRA (Hu et al., 2021) as a pytree split: adapters are their own small params tree.

    trainable, base = split(params, lora_config, seed, heads=("scalar_head",))
    effective = combine(trainable, base, lora_config)      # jittable; base is never trained
    model.apply(graphdef, effective, ...)

For each targeted projection kernel W [L, d_in, d_out] (block params are stacked over layers)
the adapter is a [L, d_in, r] and b [L, r, d_out], and the model runs with

    W' = W + (alpha / r) a @ b

b starts at zero, so a fresh adapter gives exactly the base model. The train state holds only
`trainable` = {'lora': adapters, **heads} (and its optimizer state); the base weights are a
jit argument that is read, never donated or copied, so in PPO and DPO the frozen reference
*is* the base (adapters off) and the weights are held once. W' exists only inside a step (a
transient of the size of the targeted kernels); `rlhf-jax export` writes it merged.

lora_config: {'rank': int (0 = off), 'alpha': float, 'targets': 'q,k,v,o,gate,up,down' (any
subset; 'gate' exists only with mlp='swiglu')}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.runtime import checks

TARGETS = {"q": ("attn", "query"), "k": ("attn", "key"), "v": ("attn", "value"), "o": ("attn", "out"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


def enabled(lora_config) -> bool:
    return lora_config is not None and int(lora_config.get("rank", 0)) > 0


def target_names(lora_config) -> list[str]:
    names = [t.strip() for t in str(lora_config.targets).split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora.targets={lora_config.targets!r}: expected a comma-separated subset of "
                         f"{','.join(TARGETS)}")
    return names


def _kernel_path(name):
    return ("blocks",) + TARGETS[name] + ("kernel",)


def init_adapters(lora_config, params, seed: int) -> dict:
    """{target: {'a': [L, d_in, r] ~ N(0, 1/d_in), 'b': [L, r, d_out] zeros}} for every target the
    model has (gate only with SwiGLU)."""
    flat = dict(nnx.to_flat_state(params))
    rank, key = int(lora_config.rank), jax.random.key(seed)
    adapters = {}
    for i, name in enumerate(target_names(lora_config)):
        if _kernel_path(name) not in flat:
            continue
        layers, d_in, d_out = flat[_kernel_path(name)].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, d_in, rank), jnp.float32) / math.sqrt(d_in)
        adapters[name] = {"a": a, "b": jnp.zeros((layers, rank, d_out), jnp.float32)}
    if not adapters:
        raise ValueError(f"lora.targets={lora_config.targets!r}: the model has none of these projections")
    return adapters


def merge(base, adapters: dict, lora_config):
    """base params with W + (alpha / r) a @ b on every adapted kernel (same tree structure; pure)."""
    scale = float(lora_config.alpha) / int(lora_config.rank)
    by_path = {_kernel_path(name): ab for name, ab in adapters.items()}

    def merge_leaf(path, w):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if names not in by_path:
            return w
        ab = by_path[names]
        return w + (scale * jnp.einsum("lir,lro->lio", ab["a"], ab["b"])).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge_leaf, base)


def split(params, lora_config, seed: int, heads=()):
    """(trainable, base): without LoRA (params, None); with it ({'lora': adapters, **heads},
    params minus the heads). `heads` are top-level params trained in full (e.g. 'scalar_head')."""
    if not enabled(lora_config):
        return params, None
    base = type(params)({k: v for k, v in params.items() if k not in heads})
    trainable = {"lora": init_adapters(lora_config, base, seed), **{h: params[h] for h in heads}}
    return trainable, base


def combine(trainable, base, lora_config):
    """The params the model runs with: `trainable` itself without LoRA, else the base with the
    adapters merged and the trained heads added."""
    if not enabled(lora_config):
        return trainable
    heads = {k: v for k, v in trainable.items() if k != "lora"}
    merged = merge(base, trainable["lora"], lora_config)  # the base's own tree structure
    return nnx.State({**merged, **heads}) if heads else merged


def combine_restored(trainable, base, lora_config):
    """`combine` for a hand-off: the adapters of a restored run and the base reloaded from the run
    it started from may sit on different devices, so both are fetched and merged on the default
    device (once per hand-off; a vmapped merge for a leading seed axis is the caller's)."""
    return combine(jax.device_get(trainable), jax.device_get(base), lora_config)


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_lora_config(c):
    """config.lora (configs/lora.py); the stages add what LoRA needs of them (params to adapt)."""
    c.integer("lora.rank", 0)
    if not c.get("lora.rank"):
        return
    c.positive("lora.alpha")
    targets = c.get("lora.targets")
    names = [t.strip() for t in str(targets).split(",") if t.strip()] if targets is not checks.MISSING else []
    if targets is not checks.MISSING and (not names or not set(names) <= set(TARGETS)):
        c.fail("lora.targets", targets, f"expected a comma-separated subset of {','.join(TARGETS)}")
