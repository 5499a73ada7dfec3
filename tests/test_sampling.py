"""generate(): greedy vs full-forward argmax, EOS and masks, left padding, sampling law, log-probs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from rlhf_jax.models import model as M
from rlhf_jax.models.sampling import decode_responses, encode_prompts, generate
from rlhf_jax.models.tokenizer import ByteTokenizer

VOCAB, PAD, NEVER = 40, 39, -1  # eos_id=-1: a token that is never sampled


def micro_config(arch):
    config = models.tiny()
    config.update(dict(vocab_size=VOCAB, max_len=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                       d_ff=64, init_std=0.3))  # large init: peaked, well-separated logits
    if arch == "llama":
        config.update(dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                           tie_embeddings=False, num_kv_heads=2))
    return config


@functools.lru_cache(maxsize=None)
def model(arch):
    return M.init_params(micro_config(arch), seed=11)


def prompts():
    """Three left-padded prompts of lengths 5, 3, 1 (padded to 5)."""
    rows = [[3, 14, 15, 9, 26], [5, 35, 8], [9]]
    tokens = np.full((3, 5), PAD, np.int32)
    mask = np.zeros((3, 5), np.int32)
    for i, row in enumerate(rows):
        tokens[i, 5 - len(row):], mask[i, 5 - len(row):] = row, 1
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def full_logits(graphdef, params, tokens, mask):
    return M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask)[0]["logits"]


def argmax_decode(graphdef, params, tokens, mask, steps):
    """Reference: no cache, the whole sequence re-run for every new token. The buffer has its
    final length from the start (future slots masked out) so the forward compiles once."""
    prompt_len = tokens.shape[1]
    tokens = jnp.concatenate([tokens, jnp.full((tokens.shape[0], steps), PAD, jnp.int32)], axis=1)
    mask = jnp.concatenate([mask, jnp.zeros((mask.shape[0], steps), jnp.int32)], axis=1)
    for i in range(prompt_len, prompt_len + steps):
        next_token = jnp.argmax(full_logits(graphdef, params, tokens, mask)[:, i - 1], axis=-1)
        tokens, mask = tokens.at[:, i].set(next_token.astype(jnp.int32)), mask.at[:, i].set(1)
    return tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_equals_full_forward_argmax(arch):
    graphdef, params = model(arch)
    tokens, mask = prompts()
    out = generate(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=6, eos_id=NEVER,
                   pad_id=PAD, greedy=True)
    expected = argmax_decode(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), 6)
    np.testing.assert_array_equal(out["tokens"], expected)
    np.testing.assert_array_equal(out["response"], expected[:, 5:])
    np.testing.assert_array_equal(out["response_mask"], np.ones((3, 6)))
    np.testing.assert_array_equal(out["attention_mask"], np.concatenate([mask, np.ones((3, 6))], axis=1))


def test_left_padding_gives_the_same_continuation():
    graphdef, params = model("llama")
    tokens, mask = prompts()
    padded = generate(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=5, eos_id=NEVER,
                      pad_id=PAD, greedy=True)
    alone = generate(graphdef, params, tokens[1:2, 2:], mask[1:2, 2:], jax.random.key(0), max_new_tokens=5,
                     eos_id=NEVER, pad_id=PAD, greedy=True)
    np.testing.assert_array_equal(padded["response"][1], alone["response"][0])
    np.testing.assert_allclose(padded["logprobs"][1], alone["logprobs"][0], atol=1e-5)


def test_eos_stops_rows_and_masks():
    graphdef, params = model("gpt2")
    tokens, mask = prompts()
    free = generate(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=6, eos_id=NEVER,
                    pad_id=PAD, greedy=True)["response"]
    eos = int(free[0, 2])  # row 0 emits this token at step 2 (or earlier)
    out = generate(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=6, eos_id=eos,
                   pad_id=PAD, greedy=True)
    for row in range(3):
        hits = np.flatnonzero(np.asarray(free[row]) == eos)
        length = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(out["response"][row, :length], free[row, :length])
        assert (out["response"][row, length:] == PAD).all()
        np.testing.assert_array_equal(out["response_mask"][row], np.arange(6) < length)
        assert (out["logprobs"][row, length:] == 0).all() and (out["logprobs"][row, :length] < 0).all()
    assert out["response_mask"][0].sum() <= 3


def test_stops_when_every_row_is_done():
    """With EOS = the first greedy token of every row... a prompt batch of one row is enough."""
    graphdef, params = model("gpt2")
    tokens, mask = prompts()
    first = generate(graphdef, params, tokens[:1], mask[:1], jax.random.key(0), max_new_tokens=1,
                     eos_id=NEVER, pad_id=PAD, greedy=True)["response"][0, 0]
    out = generate(graphdef, params, tokens[:1], mask[:1], jax.random.key(0), max_new_tokens=8,
                   eos_id=int(first), pad_id=PAD, greedy=True)
    np.testing.assert_array_equal(out["response_mask"][0], [1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["response"][0, 1:], [PAD] * 7)


def test_vmapped_programs_equal_separate_calls():
    """Several policies / prompt sets sampled in one vmapped program (PPO seeds): each equals its
    own call, when one finishes at the first step and the other runs to max_new_tokens."""
    graphdef, params = model("gpt2")
    tokens, mask = prompts()
    eos = int(generate(graphdef, params, tokens[:1], mask[:1], jax.random.key(0), max_new_tokens=1,
                       eos_id=NEVER, pad_id=PAD, greedy=True)["response"][0, 0])
    kwargs = dict(max_new_tokens=8, eos_id=eos, pad_id=PAD, greedy=True)  # row 0 ends at once
    stacked_tokens, stacked_mask = np.stack([tokens[:1], tokens[1:2]]), np.stack([mask[:1], mask[1:2]])
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    both = jax.vmap(lambda t, m, k: generate(graphdef, params, t, m, k, vmap_axis="programs", **kwargs),
                    axis_name="programs")(stacked_tokens, stacked_mask, keys)
    lengths = []
    for i in range(2):
        alone = generate(graphdef, params, stacked_tokens[i], stacked_mask[i], keys[i], **kwargs)
        np.testing.assert_array_equal(both["response"][i], alone["response"])
        np.testing.assert_array_equal(both["response_mask"][i], alone["response_mask"])
        np.testing.assert_allclose(both["logprobs"][i], alone["logprobs"], atol=1e-5)
        lengths.append(int(alone["response_mask"].sum()))
    assert lengths[0] < lengths[1], lengths  # one program stopped early while the other ran on


def numpy_filtered_probs(logits, temperature, top_k, top_p):
    """Reference sampling law in NumPy (float64): temperature, then top-k, then top-p."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[above < top_p]] = True
        threshold = p[nucleus].min()
        keep &= p >= threshold
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.5, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.9)])
def test_first_token_distribution(temperature, top_k, top_p):
    graphdef, params = model("gpt2")
    tokens, mask = prompts()
    n = 6000
    logits = np.asarray(full_logits(graphdef, params, jnp.asarray(tokens[:1]), jnp.asarray(mask[:1]))[0, -1])
    expected = numpy_filtered_probs(logits, temperature, top_k, top_p)
    out = generate(graphdef, params, np.repeat(tokens[:1], n, 0), np.repeat(mask[:1], n, 0), jax.random.key(1),
                   max_new_tokens=1, eos_id=NEVER, pad_id=PAD, temperature=temperature, top_k=top_k, top_p=top_p)
    empirical = np.bincount(np.asarray(out["response"][:, 0]), minlength=VOCAB) / n
    assert (empirical[expected == 0] == 0).all(), "sampled a filtered-out token"
    assert (expected > 0).sum() > 2, "test is too easy: the law should have several tokens"
    # Expected total variation of an n-sample histogram is ~ sum sqrt(p (1-p) / (2 pi n)); allow 4x.
    bound = 4 * np.sum(np.sqrt(expected * (1 - expected) / (2 * np.pi * n)))
    assert 0.5 * np.abs(empirical - expected).sum() < bound


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logprobs_match_full_forward(arch):
    graphdef, params = model(arch)
    tokens, mask = prompts()
    temperature = 0.8
    out = generate(graphdef, params, tokens, mask, jax.random.key(2), max_new_tokens=6, eos_id=7, pad_id=PAD,
                   temperature=temperature, top_k=10, top_p=0.95)
    logits = full_logits(graphdef, params, out["tokens"], out["attention_mask"])[:, 4:-1]  # predict response
    logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
    expected = np.take_along_axis(np.asarray(logprobs), np.asarray(out["response"])[..., None], -1)[..., 0]
    expected = np.where(out["response_mask"], expected, 0.0)
    np.testing.assert_allclose(out["logprobs"], expected, atol=1e-5)


def test_encode_and_decode():
    tok = ByteTokenizer()
    tokens, mask = encode_prompts(tok, ["hi", "hello world", ""], max_prompt_len=5)
    assert tokens.shape == mask.shape == (3, 5) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[0], [tok.pad_id] * 3 + list(b"hi"))
    np.testing.assert_array_equal(tokens[1], list(b"world"))  # truncated from the left
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1], [1] * 5, [0] * 5])
    response = np.array([list(b"ok") + [tok.eos_id, tok.pad_id], list(b"abcd")])
    response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert decode_responses(tok, response, response_mask) == ["ok", "abcd"]


def test_generate_with_bf16_remat_and_value_head():
    """Options that change the traced program (remat inside the while_loop, bf16 cache) still run."""
    config = micro_config("llama")
    config.update(dict(dtype="bfloat16", remat=True))
    graphdef, params = M.add_scalar_head(*M.init_params(config, seed=3), config)
    tokens, mask = prompts()
    out = generate(graphdef, params, tokens, mask, jax.random.key(3), max_new_tokens=4, eos_id=NEVER, pad_id=PAD,
                   temperature=0.9, top_k=5)
    assert out["response"].shape == (3, 4) and np.isfinite(out["logprobs"]).all()
    assert (out["logprobs"] < 0).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_growing_cache_gives_the_same_samples(arch):
    """decode_chunk grows the cache 2 -> 4 -> 8 -> 11 slots of response; the samples, masks and
    log-probs equal those of one cache of P + N slots (decode_chunk=0) for the same key."""
    graphdef, params = model(arch)
    tokens, mask = prompts()
    kwargs = dict(max_new_tokens=11, eos_id=NEVER, pad_id=PAD, temperature=1.0)
    whole = generate(graphdef, params, tokens, mask, jax.random.key(3), decode_chunk=0, **kwargs)
    grown = generate(graphdef, params, tokens, mask, jax.random.key(3), decode_chunk=2, **kwargs)
    np.testing.assert_array_equal(grown["response"], whole["response"])
    np.testing.assert_array_equal(grown["response_mask"], whole["response_mask"])
    np.testing.assert_allclose(grown["logprobs"], whole["logprobs"], atol=1e-5)


def test_decode_chunk_ends():
    from rlhf_jax.models.sampling import decode_chunk_ends
    assert decode_chunk_ends(192, 32) == [32, 64, 128, 192]
    assert decode_chunk_ends(48, 32) == [32, 48]
    assert decode_chunk_ends(20, 32) == [20] and decode_chunk_ends(20, 0) == [20]
