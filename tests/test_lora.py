"""LoRA as a pytree split: a fresh adapter is the base model exactly, only adapters and heads
train, the base is never touched, and SFT / reward / DPO / PPO with LoRA hand off merged params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lora as lora_configs, models
from rlhf_jax.models import lora, model as M


def micro(**overrides):
    config = models.llama_tiny()
    config.update(dict(vocab_size=40, max_len=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64))
    config.update(overrides)
    return config


def logits(graphdef, params, tokens):
    mask = jnp.ones_like(tokens)
    return M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask)[0]["logits"]


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 40, (2, 9)), jnp.int32)


@pytest.mark.parametrize("targets", ["q,k,v,o,gate,up,down", "q,v"])
def test_fresh_adapters_give_exactly_the_base_model(targets):
    config = micro()
    graphdef, params = M.init_params(config, seed=1)
    lcfg = lora_configs.rank(4, targets=targets)
    trainable, base = lora.split(params, lcfg, seed=0)
    assert set(trainable["lora"]) == set(targets.split(","))
    np.testing.assert_array_equal(logits(graphdef, lora.combine(trainable, base, lcfg), TOKENS),
                                  logits(graphdef, params, TOKENS))


def test_merge_is_w_plus_scaled_ab():
    """Hand-computed: W' = W + (alpha / r) a @ b, per layer, on the targeted kernel only."""
    config = micro()
    _, params = M.init_params(config, seed=2)
    lcfg = lora_configs.rank(2, alpha=6.0, targets="v")
    rng = np.random.RandomState(3)
    w = np.asarray(params["blocks"]["attn"]["value"]["kernel"][...])
    a, b = rng.randn(2, 32, 2).astype(np.float32), rng.randn(2, 2, w.shape[-1]).astype(np.float32)
    merged = lora.merge(params, {"v": {"a": a, "b": b}}, lcfg)
    expected = w + 3.0 * np.stack([a[i] @ b[i] for i in range(2)])
    np.testing.assert_allclose(merged["blocks"]["attn"]["value"]["kernel"][...], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["blocks"]["attn"]["query"]["kernel"][...],
                                  params["blocks"]["attn"]["query"]["kernel"][...])


def test_gradients_reach_only_adapters_and_heads():
    config = micro()
    _, params = M.init_params(config, seed=4)
    vgraphdef, vparams = M.replace_head_with_scalar(None, params, config, seed=1)
    lcfg = lora_configs.rank(4)
    trainable, base = lora.split(vparams, lcfg, seed=0, heads=("scalar_head",))
    assert set(trainable) == {"lora", "scalar_head"} and "scalar_head" not in base

    def loss(trainable, base):
        mask = jnp.ones_like(TOKENS)
        return jnp.sum(M.apply(vgraphdef, lora.combine(trainable, base, lcfg), TOKENS,
                               M.positions_from_mask(mask), mask)[0]["scalar"] ** 2)

    grads = jax.grad(loss)(trainable, base)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    # b starts at zero: the first gradient moves b (and the head), not a.
    for name, ab in grads["lora"].items():
        assert float(jnp.abs(ab["b"]).max()) > 0, name
        assert float(jnp.abs(ab["a"]).max()) == 0, name
    assert float(jnp.abs(grads["scalar_head"]["kernel"][...]).max()) > 0

    optimizer = optax.adam(1e-2)
    before = jax.tree.map(np.asarray, base)
    new = optax.apply_updates(trainable, optimizer.update(grads, optimizer.init(trainable), trainable)[0])
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
    assert not np.allclose(new["lora"]["q"]["b"], trainable["lora"]["q"]["b"])


def test_targets_are_checked():
    _, params = M.init_params(micro(mlp="gelu", use_bias=True), seed=0)
    with pytest.raises(ValueError, match="lora.targets"):
        lora.split(params, lora_configs.rank(4, targets="q,attention"), seed=0)
    trainable, _ = lora.split(params, lora_configs.rank(4), seed=0)  # no gate with GELU: skipped
    assert "gate" not in trainable["lora"] and "up" in trainable["lora"]
