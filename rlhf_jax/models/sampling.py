"""Batched autoregressive sampling with a KV cache, compiled once per shape.

    tokens, mask = encode_prompts(tokenizer, texts, max_prompt_len=64)        # left-padded
    out = generate(graphdef, params, tokens, mask, rng, max_new_tokens=32,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=0.7, top_k=50)
    texts = decode_responses(tokenizer, out['response'], out['response_mask'])

How it runs: positions come from the prompt mask (so left padding is invisible to the model);
one prefill call writes the whole prompt into the cache, then a `lax.while_loop` samples one
token per step and feeds it back, until `max_new_tokens` or until every row has emitted EOS.

What is static (a new value compiles a new program): the shapes, `max_new_tokens`, `eos_id`,
`pad_id`, `top_k`, `top_p` and `greedy`. `temperature` is traced, so a temperature sweep reuses
one program. `temperature` must be > 0 (it also scales the returned log-probs when greedy).

The returned `logprobs` are those of the *unfiltered* temperature distribution,
log_softmax(logits / temperature)[token]: what PPO recomputes from a full forward pass.
top-k / top-p only change which token is drawn.

Limits: P + N may not exceed config.max_len (the configs' checks and `generate_texts` refuse it;
with learned positions, larger positions would be clipped to the last one). A row with an all-pad prompt has nothing to condition on: its first
token is drawn from meaningless logits (use `encode_prompts(..., add_bos=True)` for unconditional
samples). Pad is never written inside a response except after EOS, but it is not masked out of
the sampling distribution (a trained model gives it ~0 probability).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import loaders
from rlhf_jax.models import lm_head
from rlhf_jax.models.model import apply, grow_cache, init_cache, model_config, positions_from_mask


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set to -inf every logit outside the top-k, then outside the top-p nucleus. [..., V].

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a
    token is kept when the probability of the tokens strictly ranked above it is < top_p
    (so the most likely token is always kept; tokens tied with the last kept one are kept).
    """
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_above < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(rng, logits, temperature, *, top_k: int = 0, top_p: float = 1.0, greedy: bool = False):
    """logits [B, V] -> (token [B] int32, logprob [B] float32 under the unfiltered temperature softmax)."""
    scaled = logits.astype(jnp.float32) / temperature
    if greedy:
        token = jnp.argmax(scaled, axis=-1)
    else:
        token = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


def generate(graphdef, params, prompt_tokens, prompt_mask, rng, *, max_new_tokens: int, eos_id: int,
             pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, vmap_axis: str | None = None, decode_chunk: int = 32) -> dict:
    """Sample `max_new_tokens` continuations of left-padded prompts.

    prompt_tokens, prompt_mask: [B, P] (mask 1 on real tokens; padding on the left).
    Returns a dict of arrays:
        tokens          [B, P + N] int32   prompt then response
        attention_mask  [B, P + N] int32   prompt_mask then response_mask
        response        [B, N] int32       pad_id after EOS
        response_mask   [B, N] int32       1 up to and including EOS
        logprobs        [B, N] float32     log_softmax(logits / temperature)[token]; 0 where masked
    vmap_axis: the axis name when called inside `jax.vmap(..., axis_name=vmap_axis)` (several
    policies sampled in one program): the loop then runs until all of them are done.
    decode_chunk: the cache starts with room for `decode_chunk` response tokens and doubles its
    room when full (steps decode_chunk, 2 decode_chunk, 4 decode_chunk, ...), so each decode step
    attends over at most twice the filled slots instead of all P + N of them. One loop per
    chunk size is compiled (log2(N / decode_chunk) + 1 of them); 0 = one cache of P + N slots.
    """
    return _generate(graphdef, params, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                     rng, jnp.asarray(temperature, jnp.float32), max_new_tokens=int(max_new_tokens),
                     eos_id=int(eos_id), pad_id=int(pad_id), top_k=int(top_k), top_p=float(top_p),
                     greedy=bool(greedy), vmap_axis=vmap_axis, decode_chunk=int(decode_chunk))


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "eos_id", "pad_id", "top_k", "top_p", "greedy", "vmap_axis",
                                    "decode_chunk"))
def _generate(graphdef, params, prompt_tokens, prompt_mask, rng, temperature, *, max_new_tokens, eos_id,
              pad_id, top_k, top_p, greedy, vmap_axis, decode_chunk):
    config = model_config(graphdef, params)
    batch, prompt_len = prompt_tokens.shape
    chunk_ends = decode_chunk_ends(max_new_tokens, decode_chunk)
    cache = init_cache(config, batch, prompt_len + chunk_ends[0])

    # Prefill: the whole prompt in one call. With left padding, the last column is every row's
    # last real token, so its logits predict the first response token: only those are computed.
    outputs, cache = apply(graphdef, params, prompt_tokens, positions_from_mask(prompt_mask), prompt_mask, cache,
                           logits=False)

    def not_finished(state, chunk_end):
        unfinished_rows = jnp.sum(~state["done"])
        if vmap_axis:  # under vmap: stop when every vmapped program is done, so the loop
            # condition is not batched (a batched one makes the loop select every carry, the
            # KV cache included, at every step)
            unfinished_rows = jax.lax.psum(unfinished_rows, vmap_axis)
        return (state["step"] < chunk_end) & (unfinished_rows > 0)

    def decode_step(state):
        step, done = state["step"], state["done"]
        token, logprob = sample_token(jax.random.fold_in(rng, step), state["logits"], temperature,
                                      top_k=top_k, top_p=top_p, greedy=greedy)
        active = ~done
        token = jnp.where(active, token, pad_id)
        outputs, cache = apply(graphdef, params, token[:, None], state["position"][:, None],
                               active[:, None].astype(jnp.int32), state["cache"])
        return {
            "step": step + 1,
            "done": done | (token == eos_id),
            "logits": outputs["logits"][:, 0],
            "position": state["position"] + 1,
            "cache": cache,
            "response": state["response"].at[:, step].set(token),
            "response_mask": state["response_mask"].at[:, step].set(active.astype(jnp.int32)),
            "logprobs": state["logprobs"].at[:, step].set(jnp.where(active, logprob, 0.0)),
        }

    state = {
        "step": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "logits": lm_head.logits(outputs["hidden"][:, -1], outputs["unembedding"]),
        "position": jnp.sum(prompt_mask, axis=-1).astype(jnp.int32),  # next position per row
        "cache": cache,
        "response": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        "response_mask": jnp.zeros((batch, max_new_tokens), jnp.int32),
        "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32),
    }
    for i, chunk_end in enumerate(chunk_ends):
        if i:  # room for the next chunk's tokens (once every row is done the loop exits at once)
            state["cache"] = grow_cache(state["cache"], chunk_end - chunk_ends[i - 1])
        state = jax.lax.while_loop(functools.partial(not_finished, chunk_end=chunk_end), decode_step, state)
    return {
        "tokens": jnp.concatenate([prompt_tokens, state["response"]], axis=1),
        "attention_mask": jnp.concatenate([prompt_mask, state["response_mask"]], axis=1),
        "response": state["response"],
        "response_mask": state["response_mask"],
        "logprobs": state["logprobs"],
    }


def decode_chunk_ends(max_new_tokens: int, decode_chunk: int) -> list[int]:
    """Response lengths at which the sampler's cache is full: [C, 2C, 4C, ..., N]."""
    if decode_chunk <= 0 or decode_chunk >= max_new_tokens:
        return [max_new_tokens]
    ends = [decode_chunk]
    while ends[-1] < max_new_tokens:
        ends.append(min(2 * ends[-1], max_new_tokens))
    return ends


def encode_prompts(tokenizer, texts, max_prompt_len: int, *, add_bos: bool = False):
    """Texts -> (tokens, mask), both [B, max_prompt_len] int32 NumPy arrays.

    Left-padded with tokenizer.pad_id; a text longer than max_prompt_len keeps its last tokens
    (truncated from the left, so the prompt still ends where the response begins).
    """
    tokens = np.full((len(texts), max_prompt_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), max_prompt_len), np.int32)
    for row, text in enumerate(texts):
        ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode_prompt(text))
        ids = ids[-max_prompt_len:] if max_prompt_len > 0 else []
        if ids:
            tokens[row, -len(ids):] = ids
            mask[row, -len(ids):] = 1
    return tokens, mask


def decode_responses(tokenizer, response, response_mask) -> list[str]:
    """[B, N] response tokens -> B strings (masked tokens and EOS dropped)."""
    response, response_mask = np.asarray(response), np.asarray(response_mask)
    return [tokenizer.decode([int(t) for t, m in zip(row, mask_row) if m and t != tokenizer.eos_id])
            for row, mask_row in zip(response, response_mask)]


def encode_prompt_responses(tokenizer, prompts, responses, seq_len: int):
    """prompt + response + EOS rows, right-padded: (tokens, mask) [N, seq_len] int32 NumPy arrays,
    the rows the reward model is trained on (loaders.preference_batches) and scores."""
    rows = [loaders.join_prompt_response(tokenizer.encode_prompt(p), tokenizer.encode(r), seq_len,
                                         tokenizer.eos_id)[0] for p, r in zip(prompts, responses)]
    tokens = np.full((len(rows), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return tokens, mask


def generate_texts(graphdef, params, tokenizer, prompts, *, max_new_tokens, rng, temperature=1.0,
                   greedy=False, top_k=0, top_p=1.0, max_prompt_len=64) -> list[str]:
    """Texts in, sampled continuations (as texts) out: encode_prompts -> generate -> decode_responses.
    A prompt longer than max_prompt_len tokens keeps its last max_prompt_len (a warning says so);
    max_prompt_len + max_new_tokens beyond the model's window is refused."""
    window = int(model_config(graphdef, params).max_len)
    if max_prompt_len + max_new_tokens > window:
        raise ValueError(window_error(max_prompt_len, max_new_tokens, window))
    tokens, mask = encode_prompts(tokenizer, prompts, max_prompt_len)
    cut = [p for p in prompts if len(tokenizer.encode_prompt(p)) > max_prompt_len]
    if cut:
        warnings.warn(f"{len(cut)} of {len(prompts)} prompts are longer than {max_prompt_len} tokens; "
                      f"the model sees their last {max_prompt_len} (e.g. {cut[0][-40:]!r})", stacklevel=2)
    out = generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), rng,
                   max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return decode_responses(tokenizer, np.asarray(out["response"]), np.asarray(out["response_mask"]))


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_sampling_config(c, group: str):
    """Fields of one sampling setup (preferences, normalize, ppo)."""
    g = group + "." if group else ""
    for key in ("batch_size", "max_prompt_len", "max_new_tokens", "num_prompts"):
        c.integer(g + key, 1)
    c.positive(g + "temperature")
    c.integer(g + "top_k", 0)
    c.number(g + "top_p", 0.0, 1.0, low_open=True)
    prompt_len, new_tokens, window = c.get(g + "max_prompt_len"), c.get(g + "max_new_tokens"), c.get("model.max_len")
    if window and prompt_len and new_tokens and prompt_len + new_tokens > window:
        c.fail(g + "max_new_tokens", new_tokens, window_error(prompt_len, new_tokens, window))


def window_error(prompt_len: int, new_tokens: int, window: int) -> str:
    return (f"max_prompt_len {prompt_len} + max_new_tokens {new_tokens} = {prompt_len + new_tokens} tokens exceed "
            f"the model's window, model.max_len={window} (its learned position table ends there)")
