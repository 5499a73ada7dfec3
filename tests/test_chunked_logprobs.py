"""lm_head: log-probs, entropies and next-token loss from hidden states in chunks of tokens equal the
full-logits computation (losses.*) to 1e-5, values and gradients; the chunked gradient's compiled
temp memory is a fraction of the full one's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from rlhf_jax import losses
from rlhf_jax.models import lm_head, model as M


def micro(tied: bool, vocab_size: int = 97, dtype: str = "float32"):
    config = models.tiny() if tied else models.llama_tiny()
    config.update(dict(vocab_size=vocab_size, max_len=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                       num_kv_heads=2 if not tied else 4, dtype=dtype))
    return config


def batch(seed, b=3, t=13, vocab=97):
    """Tokens and a mask with left padding on row 1 and right padding on row 2."""
    rs = np.random.RandomState(seed)
    tokens = jnp.asarray(rs.randint(0, vocab, size=(b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :4] = 0
    mask[2, -5:] = 0
    return tokens, jnp.asarray(mask)


def full_stats(graphdef, params, tokens, mask, temperature):
    """The reference: [B, T, V] logits, losses.token_logprobs / entropy_from_logits on them."""
    outputs, _ = M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask)
    logits = outputs["logits"][:, :-1] / temperature
    return losses.token_logprobs(logits, tokens[:, 1:]), losses.entropy_from_logits(logits)


def chunked_stats(graphdef, params, tokens, mask, temperature, chunk):
    outputs, _ = M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask, logits=False)
    logp, entropy, _ = lm_head.token_logprobs_and_entropy(outputs["hidden"][:, :-1], outputs["unembedding"],
                                                          tokens[:, 1:], temperature, chunk)
    return logp, entropy


def assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


# B 3 x T 12: chunks of 1 and of 5 positions (16 // 3; 12 is not a multiple), 0 = all at once
@pytest.mark.parametrize("tied, chunk, temperature", [(True, 5, 1.0), (False, 5, 0.7), (True, 16, 0.7),
                                                      (False, 0, 1.0)])
def test_logprobs_and_entropy_equal_full_logits_values_and_gradients(tied, chunk, temperature):
    graphdef, params = M.init_params(micro(tied), seed=1)
    tokens, mask = batch(0)
    weights = jnp.asarray(np.random.RandomState(2).normal(size=(3, 12)), jnp.float32)
    m = mask[:, 1:].astype(bool)

    def objective(stats_fn):
        def f(params):
            logp, entropy = stats_fn(graphdef, params, tokens, mask, temperature)
            return jnp.sum(jnp.where(m, weights * logp + 0.1 * entropy, 0.0))
        return jax.jit(jax.value_and_grad(f))

    ref_logp, ref_entropy = jax.jit(full_stats, static_argnums=0)(graphdef, params, tokens, mask, temperature)
    logp, entropy = jax.jit(chunked_stats, static_argnums=(0, 5))(graphdef, params, tokens, mask, temperature, chunk)
    assert logp.shape == entropy.shape == (3, 12)
    assert_trees_close((logp, entropy), (ref_logp, ref_entropy))
    ref_value, ref_grad = objective(full_stats)(params)
    value, grad = objective(lambda *a: chunked_stats(*a, chunk))(params)
    assert_trees_close(value, ref_value)
    assert_trees_close(grad, ref_grad)
    assert np.abs(np.asarray(jax.tree.leaves(grad)[0])).max() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_next_token_loss_equals_full_logits_value_metrics_and_gradients(tied):
    graphdef, params = M.init_params(micro(tied), seed=3)
    tokens, mask = batch(4)
    loss_mask = mask.at[:, :3].set(0)  # an SFT-like mask: no loss on the first tokens nor the padding
    positions = M.positions_from_mask(mask)

    def full(params):
        outputs, _ = M.apply(graphdef, params, tokens, positions, mask)
        return losses.next_token_loss(outputs["logits"], tokens, loss_mask)

    def chunked(params):
        outputs, _ = M.apply(graphdef, params, tokens, positions, mask, logits=False)
        # chunks of 15 // 3 = 5 positions: 12 = 5 + 5 + 2
        return lm_head.next_token_loss(outputs["hidden"], outputs["unembedding"], tokens, loss_mask, 15)

    (ref_loss, ref_metrics), ref_grad = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    assert_trees_close((loss, metrics), (ref_loss, ref_metrics))
    assert int(metrics["num_tokens"]) == int(jnp.sum(loss_mask[:, 1:]))
    assert_trees_close(grad, ref_grad)


def test_bf16_hidden_states_give_float32_results_close_to_full_logits():
    """bf16 compute: the chunks accumulate float32 logits exactly as the model's einsum does."""
    graphdef, params = M.init_params(micro(False, dtype="bfloat16"), seed=5)
    tokens, mask = batch(6)
    ref_logp, ref_entropy = full_stats(graphdef, params, tokens, mask, 1.0)
    logp, entropy = chunked_stats(graphdef, params, tokens, mask, 1.0, 5)
    assert logp.dtype == entropy.dtype == jnp.float32
    assert_trees_close((logp, entropy), (ref_logp, ref_entropy))


def test_sequence_logprobs_is_the_chunked_sum_and_matches_full_logits():
    config = micro(True)
    config.logits_chunk = 4
    graphdef, params = M.init_params(config, seed=7)
    tokens, mask = batch(8)
    target = mask.at[:, :6].set(0)
    ref_logp, _ = full_stats(graphdef, params, tokens, mask, 0.8)
    expected = jnp.sum(jnp.where(target[:, 1:].astype(bool), ref_logp, 0.0), axis=-1)
    got = M.sequence_logprobs(graphdef, params, tokens, mask, target, 0.8)
    assert_trees_close(got, expected)


def test_chunked_lm_loss_gradient_needs_a_fraction_of_the_temp_memory():
    """At V = 32k, B 2 x T 256 the full logits' gradient holds several [512, 32k] float32 arrays;
    chunks of 64 tokens hold a few [64, 32k] ones (compile only, nothing runs)."""
    config = micro(False, vocab_size=32_000)
    config.max_len = 256
    graphdef, abstract = M.abstract_params(config)
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def temp_bytes(chunk):
        def loss(params, tokens):
            mask = jnp.ones_like(tokens)
            outputs, _ = M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask, logits=chunk < 0)
            if chunk < 0:
                return losses.next_token_loss(outputs["logits"], tokens, mask)[0]
            return lm_head.next_token_loss(outputs["hidden"], outputs["unembedding"], tokens, mask, chunk)[0]
        compiled = jax.jit(jax.grad(loss)).lower(abstract, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(-1), temp_bytes(64)
    assert chunked < 0.5 * full, (chunked, full)
