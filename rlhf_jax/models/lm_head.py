"""The LM head: hidden states -> per-token log-probs, entropies and next-token loss, in chunks.

    outputs, _ = model.apply(graphdef, params, tokens, positions, attention_mask, logits=False)
    logp, entropy, is_argmax = token_logprobs_and_entropy(outputs['hidden'], outputs['unembedding'],
                                                          targets, temperature, chunk_size)

Why: the float32 logits [B, T, V] of a 4 x 512 batch at V = 151,936 are 1.2 GB, and the gradient
of a log-softmax holds several arrays of that size. Here the tokens are unembedded about
`chunk_size` at a time (all rows, a few positions) in a `lax.map`, each chunk under
`jax.checkpoint`: the forward keeps only per-token numbers, the backward recomputes one chunk's
logits at a time. The results equal losses.token_logprobs / entropy_from_logits /
next_token_loss on the full logits to float32 rounding (tests/test_chunked_logprobs.py); the
LM loss's gradient needs 0.10x of the full logits' temp memory (experiments/bench_memory.py
--lm_loss: 499 against 4,870 MiB at V 151,936, 4 x 512, llama_tiny, chunks of 256 tokens).

Shapes: B batch, T tokens, D d_model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logits(hidden, unembedding):
    """hidden [..., D] (any compute dtype) x unembedding [V, D] -> logits [..., V] float32.

    Float32 accumulation and output even in bf16: PPO's probability ratios need it.
    """
    return jnp.einsum("...d,vd->...v", hidden, unembedding.astype(hidden.dtype), preferred_element_type=jnp.float32)


def token_logprobs_and_entropy(hidden, unembedding, targets, temperature=1.0, chunk_size: int = 0):
    """Per-token statistics of softmax(logits / temperature), without holding [B, T, V].

    hidden [B, T, D]: the model's output after the final norm (outputs['hidden']);
    unembedding [V, D]: outputs['unembedding'] (the embedding when tied);
    targets [B, T] int: hidden[:, t] scores targets[:, t] (no shifting here).
    chunk_size: tokens unembedded at a time, as every row's next max(1, chunk_size // B)
    positions (the batch axis stays whole, so a batch sharded over devices stays sharded); 0,
    or a chunk that covers all T positions, unembeds all at once (the reference computation).
    Returns (logprobs [B, T] float32, entropy [B, T] float32 (nats), is_argmax [B, T] bool:
    the target is the highest logit, the first one on ties).
    """
    b, t, d = hidden.shape
    targets = jnp.asarray(targets).astype(jnp.int32)

    def stats(h, y):  # h [N, D], y [N] -> three [N]: the equations of losses.token_logprobs / entropy_from_logits
        scaled = logits(h, unembedding) / temperature  # 2-D: a [B, S, D] einsum costs XLA extra [B, S, V] copies
        logp = jax.nn.log_softmax(scaled, axis=-1)
        target_logp = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
        probs = jnp.exp(logp)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
        return target_logp, entropy, jnp.argmax(scaled, axis=-1) == y

    steps = max(1, chunk_size // b)  # positions per chunk
    if chunk_size <= 0 or steps >= t:
        return tuple(x.reshape(b, t) for x in stats(hidden.reshape(b * t, d), targets.reshape(b * t)))
    pad = -t % steps  # the padded positions' statistics are computed and dropped

    def chunks(x):  # [B, T, ...] -> [T / steps, B * steps, ...]: chunk c is every row's positions c * steps ...
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, -1, steps, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(x.shape[0], b * steps, *x.shape[3:])

    # checkpoint: the backward recomputes one chunk's logits at a time instead of saving every chunk's.
    out = jax.lax.map(lambda hy: jax.checkpoint(stats)(*hy), (chunks(hidden), chunks(targets)))  # [T/steps, B*steps]
    return tuple(x.reshape(-1, b, steps).swapaxes(0, 1).reshape(b, -1)[:, :t] for x in out)


def next_token_loss(hidden, unembedding, tokens, loss_mask, chunk_size: int = 0):
    """losses.next_token_loss from hidden states: hidden[:, t] predicts tokens[:, t + 1], counted
    where loss_mask[:, t + 1]. hidden [B, T, D], unembedding [V, D], tokens, loss_mask [B, T].
    Returns (loss, {"loss", "accuracy", "num_tokens"}) as losses.next_token_loss.
    """
    targets = jnp.asarray(tokens)[:, 1:]
    mask = jnp.asarray(loss_mask).astype(bool)[:, 1:]
    # Zero the hidden states of uncounted positions (their logits become 0, as in
    # losses.next_token_loss), so that a NaN there cannot reach the gradient.
    hidden = jnp.where(mask[..., None], hidden[:, :-1], 0)
    logp, _, is_argmax = token_logprobs_and_entropy(hidden, unembedding, targets, 1.0, chunk_size)
    # (losses.masked_mean's equation: the models layer does not import the losses above it)
    count = jnp.maximum(jnp.sum(mask), 1)
    loss = -jnp.sum(jnp.where(mask, logp, 0)) / count
    metrics = {"loss": loss, "accuracy": jnp.sum(jnp.where(mask, is_argmax, False).astype(jnp.float32)) / count,
               "num_tokens": jnp.sum(mask)}
    return loss, metrics
