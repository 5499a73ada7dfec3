"""Decoder-only transformer (GPT-2, Llama, Qwen2 and Qwen3 styles) and its functional API.

The module is a plain `flax.nnx` module; training and sampling code use it functionally:

    graphdef, params = init_params(config, head='lm', seed=0)
    outputs, cache = apply(graphdef, params, tokens, positions, attention_mask)   # jittable
    outputs['logits']   # [B, T, V] float32
    outputs, cache = apply(graphdef, params, tokens, positions, attention_mask, logits=False)
    outputs['hidden'], outputs['unembedding']   # [B, T, d_model], [V, d_model]: for lm_head's chunks

Shapes: B batch, T new tokens, S cache slots, V vocabulary, D head_dim, H query heads,
K key/value heads (GQA: each key/value head serves H // K query heads).

Heads ('head' argument):
    'lm'             outputs['logits'] [B, T, V]         (policy, SFT, reference model)
    'scalar'         outputs['scalar'] [B, T]            (reward model: unembedding replaced)
    'lm_and_scalar'  both                                (policy with a value head)

Log-probs, entropies and the next-token loss are computed from the hidden states by
`lm_head` in chunks of `config.logits_chunk` tokens, never holding [B, T, V] logits
(`sequence_logprobs` here, and the stages); `logits=True` is for sampling and tests.

Padding: `attention_mask[B, T]` is 1 on real tokens. Pad tokens are never attended to; their
own outputs are finite but meaningless. `positions[B, T]` are explicit, so left-padded prompts
get positions 0, 1, ... on their real tokens (`positions_from_mask`).

KV cache (a plain pytree, see `init_cache`): with a cache, `tokens` are the new tokens; their keys
and values are written at slots [index, index + T) and they attend to every earlier slot whose
key is real, and causally among themselves.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlhf_jax.models import lm_head
from rlhf_jax.runtime import checks

HEADS = ("lm", "scalar", "lm_and_scalar")
LOGITS_CHUNK = 256  # presets' logits_chunk: [256, 151936] f32 logits are 156 MB
_MASKED = -1e30  # finite, so a row with no visible key gives a uniform softmax, never NaN


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# Fields added after the first checkpoints were written: a stored config without them means these
# defaults (plain RoPE, no q/k/v biases or q/k norms, head_dim = d_model / num_heads, logits in
# chunks of 256 tokens), so old runs keep their params tree and logits.
FAMILY_DEFAULTS = dict(head_dim=0, qkv_bias=False, qk_norm=False, rope_scaling="none", rope_factor=8.0,
                       rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
                       logits_chunk=LOGITS_CHUNK)
# How a model is computed, not what it is: a run may start from another's params with other values.
COMPUTE_FIELDS = ("dtype", "remat", "logits_chunk", "attention_impl")
ROPE_SCALINGS = ("none", "llama3")


def config_field(config, name):
    """One of the FAMILY_DEFAULTS fields of a model config, its default when the config predates it."""
    return config.get(name, FAMILY_DEFAULTS[name])


def stored_model_config(model: dict) -> ml_collections.ConfigDict:
    """The ConfigDict of a model dict stored by a run, with the fields it predates at their defaults
    (so it compares equal to a current config of the same model)."""
    return ml_collections.ConfigDict({**FAMILY_DEFAULTS, **model})


def head_dim(config) -> int:
    """Width of one attention head: `head_dim`, or d_model / num_heads when it is 0 (Qwen3 sets it)."""
    return config_field(config, "head_dim") or config.d_model // config.num_heads


def _check_config(config) -> None:
    if not config_field(config, "head_dim") and config.d_model % config.num_heads:
        raise ValueError(f"d_model={config.d_model} is not a multiple of num_heads={config.num_heads} "
                         "(set head_dim to use heads of another width)")
    if config_field(config, "head_dim") < 0:
        raise ValueError(f"head_dim={config.head_dim}: expected 0 (d_model / num_heads) or a positive width")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_heads={config.num_heads} is not a multiple of num_kv_heads={config.num_kv_heads}")
    if config.positions not in ("learned", "rope"):
        raise ValueError(f"positions={config.positions!r}: expected 'learned' or 'rope'")
    if config.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm={config.norm!r}: expected 'layernorm' or 'rmsnorm'")
    if config.mlp not in ("gelu", "swiglu"):
        raise ValueError(f"mlp={config.mlp!r}: expected 'gelu' or 'swiglu'")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={config.dtype!r}: expected 'float32' or 'bfloat16'")
    if config.param_dtype != "float32":
        raise ValueError(f"param_dtype={config.param_dtype!r}: only 'float32' is supported")
    if config.get("attention_impl", "einsum") not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={config.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
    if config.dropout != 0.0:
        raise NotImplementedError(f"dropout={config.dropout}: dropout is not implemented; set model.dropout=0.0")
    if config_field(config, "rope_scaling") not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={config.rope_scaling!r}: expected one of {ROPE_SCALINGS}")
    if config_field(config, "rope_scaling") != "none" and config.positions != "rope":
        raise ValueError(f"rope_scaling={config.rope_scaling!r} needs positions='rope'")
    if config_field(config, "qk_norm") and config.norm != "rmsnorm":
        raise ValueError(f"qk_norm=True needs norm='rmsnorm' (Qwen3's per-head RMSNorm), not {config.norm!r}")


# ----------------------------------------------------------------------------------------------
# Building blocks


def rope_frequencies(config) -> jax.Array:
    """[head_dim / 2] float32 inverse frequencies: theta^(-2i/D), then the config's rope_scaling.

    'llama3' is transformers' `_compute_llama3_parameters` (Llama 3.1+): wavelengths longer than
    original_max_len / low_freq_factor are slowed by `rope_factor`, those shorter than
    original_max_len / high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    d = head_dim(config)
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if config_field(config, "rope_scaling") == "none":
        return inv_freq
    factor, old_len = config_field(config, "rope_factor"), config_field(config, "rope_original_max_len")
    low, high = config_field(config, "rope_low_freq_factor"), config_field(config, "rope_high_freq_factor")
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, Llama ("rotate half") convention. x [B, T, N, D], positions [B, T],
    inv_freq [D/2] (`rope_frequencies`)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def attention(q, key, value, mask, impl: str = "einsum"):
    """Softmax attention with GQA. q [B, T, H, D]; key, value [B, S, K, D]; mask [B, T, S] bool.

    Returns [B, T, H, D]. Scores and softmax in float32 whatever the input dtype.
    impl: 'einsum' (our own two einsums), 'xla' or 'cudnn' (`jax.nn.dot_product_attention`;
    'cudnn' is the fused flash-attention kernel on NVIDIA GPUs, bf16/fp16 only).
    """
    b, t, h, d = q.shape
    k = key.shape[2]
    if impl == "einsum":
        q = q.reshape(b, t, k, h // k, d)  # query head k * G + g uses key/value head k
        scores = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32) / math.sqrt(d)
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(b, t, h, d)
    return jax.nn.dot_product_attention(q, key, value, mask=mask[:, None], implementation=impl)


def _norm(config, rngs, width=None):
    dtype = _dtype(config.dtype)
    if config.norm == "layernorm":
        return nnx.LayerNorm(width or config.d_model, epsilon=config.norm_eps, use_bias=config.use_bias,
                             use_fast_variance=False, dtype=dtype, rngs=rngs)
    return nnx.RMSNorm(width or config.d_model, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)


def _linear(config, d_in, d_out, rngs, std=None, use_bias=None):
    use_bias = config.use_bias if use_bias is None else use_bias
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=_dtype(config.dtype),
                      kernel_init=nnx.initializers.normal(std or config.init_std), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = head_dim(config)
        self.rope = config.positions == "rope"
        self.attention_impl = config.get("attention_impl", "einsum")
        d, hd, kvd = config.d_model, config.num_heads * self.head_dim, config.num_kv_heads * self.head_dim
        residual_std = config.init_std / math.sqrt(2 * config.num_layers)  # GPT-2 scaled init
        qkv_bias = config.use_bias or config_field(config, "qkv_bias")  # Qwen2: biases on q, k, v but not out
        self.query = _linear(config, d, hd, rngs, use_bias=qkv_bias)
        self.key = _linear(config, d, kvd, rngs, use_bias=qkv_bias)
        self.value = _linear(config, d, kvd, rngs, use_bias=qkv_bias)
        self.out = _linear(config, hd, d, rngs, std=residual_std)
        self.qk_norm = config_field(config, "qk_norm")
        if self.qk_norm:  # Qwen3: RMSNorm over each head's width, shared by all heads, before RoPE
            self.query_norm = _norm(config, rngs, width=self.head_dim)
            self.key_norm = _norm(config, rngs, width=self.head_dim)

    def __call__(self, x, positions, mask, inv_freq, cache=None, layer=None, cache_index=None):
        """x [B, T, d_model], positions [B, T], mask [B, T, S] bool (True = may attend),
        inv_freq [D/2] RoPE frequencies (unused with learned positions).

        cache: None, or {'k', 'v'} [L, B, S, K, D] for every layer; this layer's (`layer`, traced)
        new keys/values go to slots [cache_index, cache_index + T). Only the new tokens are
        written (in place in the scan carry), not the layer's whole slice.
        Returns (y [B, T, d_model], updated cache or None).
        """
        b, t, _ = x.shape
        h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.query(x).reshape(b, t, h, d)
        key = self.key(x).reshape(b, t, k, d)
        value = self.value(x).reshape(b, t, k, d)
        if self.qk_norm:
            q, key = self.query_norm(q), self.key_norm(key)
        if self.rope:
            q, key = apply_rope(q, positions, inv_freq), apply_rope(key, positions, inv_freq)
        if cache is not None:
            start = (layer, 0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], key[None].astype(cache["k"].dtype), start),
                     "v": jax.lax.dynamic_update_slice(cache["v"], value[None].astype(cache["v"].dtype), start)}
            key, value = cache["k"][layer], cache["v"][layer]
        y = attention(q, key.astype(q.dtype), value.astype(q.dtype), mask, self.attention_impl)
        return self.out(y.reshape(b, t, h * d)), cache


class MLP(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.kind = config.mlp
        residual_std = config.init_std / math.sqrt(2 * config.num_layers)
        if self.kind == "swiglu":
            self.gate = _linear(config, config.d_model, config.d_ff, rngs)
        self.up = _linear(config, config.d_model, config.d_ff, rngs)
        self.down = _linear(config, config.d_ff, config.d_model, rngs, std=residual_std)

    def __call__(self, x):
        if self.kind == "swiglu":
            return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = _norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, inv_freq, cache=None, layer=None, cache_index=None):
        y, cache = self.attn(self.attn_norm(x), positions, mask, inv_freq, cache, layer, cache_index)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


def _stacked_blocks(config, rngs):
    """`num_layers` Blocks as one module whose params carry a leading layer axis [L, ...]."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(config, rngs=rngs)

    return make(rngs)


def _scalar_head(config, rngs):
    """One number per token, computed in float32. Small normal init (1 / sqrt(d_model + 1))."""
    return nnx.Linear(config.d_model, 1, use_bias=True, dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(1.0 / math.sqrt(config.d_model + 1)), rngs=rngs)


class Transformer(nnx.Module):
    def __init__(self, config, *, head: str = "lm", rngs: nnx.Rngs):
        _check_config(config)
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {HEADS}")
        # Frozen (hashable) copy: it lives in the graphdef, so sampling can read shapes from it.
        self.config = ml_collections.FrozenConfigDict(config)
        self.head = head
        dtype = _dtype(config.dtype)
        embed_init = nnx.initializers.normal(config.init_std)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, embedding_init=embed_init, rngs=rngs)
        if config.positions == "learned":
            self.position_embed = nnx.Embed(config.max_len, config.d_model, dtype=dtype,
                                            embedding_init=embed_init, rngs=rngs)
        self.blocks = _stacked_blocks(config, rngs)  # one scanned block: compile time flat in depth
        self.final_norm = _norm(config, rngs)
        if head in ("lm", "lm_and_scalar") and not config.tie_embeddings:
            self.unembed = nnx.Linear(config.d_model, config.vocab_size, use_bias=False, dtype=dtype,
                                      kernel_init=embed_init, rngs=rngs)
        if head in ("scalar", "lm_and_scalar"):
            self.scalar_head = _scalar_head(config, rngs)

    def unembedding(self):
        """[V, d_model]: the token embedding when tied, else the transposed unembedding kernel."""
        if self.config.tie_embeddings:
            return self.embed.embedding[...]
        return self.unembed.kernel[...].T

    def __call__(self, tokens, positions, attention_mask, cache=None, logits: bool = True):
        """tokens, positions, attention_mask: [B, T] int. cache: None or from `init_cache`.

        Returns (outputs, cache): outputs {'logits': [B, T, V] f32} and/or {'scalar': [B, T] f32};
        with logits=False, {'hidden': [B, T, d_model] (after the final norm, compute dtype),
        'unembedding': [V, d_model]} in place of 'logits', for `lm_head`.
        cache is the updated cache (index advanced by T), or None without one.
        """
        config = self.config
        t = tokens.shape[1]
        attention_mask = attention_mask.astype(bool)
        # Pad ids may lie outside the vocabulary (e.g. GPT-2's added pad): look up id 0 there.
        x = self.embed(jnp.where(attention_mask, tokens, 0))
        if config.positions == "learned":
            x = x + self.position_embed(jnp.clip(positions, 0, config.max_len - 1))

        if cache is None:
            key_mask, index = attention_mask, 0  # keys are the tokens themselves
        else:
            index = cache["index"]
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
        query_slot = index + jnp.arange(t)  # [T]
        causal = jnp.arange(key_mask.shape[1])[None, :] <= query_slot[:, None]  # [T, S]
        mask = key_mask[:, None, :] & causal[None]  # [B, T, S]

        block_graphdef, stacked_params = nnx.split(self.blocks)
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        inv_freq = rope_frequencies(config) if config.positions == "rope" else None

        def run_block(x, kv, layer_params, layer):
            return nnx.merge(block_graphdef, layer_params)(x, positions, mask, inv_freq, kv, layer, index)

        if config.remat:  # recompute each block in the backward pass: activations of one layer live
            run_block = jax.checkpoint(run_block)

        def scan_body(carry, layer_inputs):
            x, kv = run_block(*carry, *layer_inputs)
            return (x, kv), None

        layers = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, kv), _ = jax.lax.scan(scan_body, (x, kv), (stacked_params, layers))
        x = self.final_norm(x)

        outputs = {}
        if self.head in ("lm", "lm_and_scalar") and logits:
            outputs["logits"] = lm_head.logits(x, self.unembedding())
        elif self.head in ("lm", "lm_and_scalar"):
            outputs["hidden"], outputs["unembedding"] = x, self.unembedding()
        if self.head in ("scalar", "lm_and_scalar"):
            outputs["scalar"] = self.scalar_head(x.astype(jnp.float32))[..., 0]
        if cache is not None:
            cache = {"k": kv["k"], "v": kv["v"], "mask": key_mask, "index": index + t}
        return outputs, cache


# ----------------------------------------------------------------------------------------------
# Functional API


def abstract_params(config, head: str = "lm"):
    """(graphdef, params as ShapeDtypeStructs) without allocating: for Orbax targets, shardings."""
    model = nnx.eval_shape(lambda: Transformer(config, head=head, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def init_params(config, head: str = "lm", seed: int = 0):
    """Random init. Returns (graphdef, params): params is an nnx.State pytree of float32 arrays."""
    graphdef, _ = abstract_params(config, head)
    return graphdef, _init_state(ml_collections.FrozenConfigDict(config), head, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(config, head, key):
    """Compiled once per (config, head); the seed is traced."""
    return nnx.split(Transformer(config, head=head, rngs=nnx.Rngs(key)))[1]


def apply(graphdef, params, tokens, positions, attention_mask, cache=None, logits: bool = True):
    """Pure forward pass: `Transformer.__call__` on `nnx.merge(graphdef, params)`. Jittable."""
    return nnx.merge(graphdef, params)(tokens, positions, attention_mask, cache, logits)


def logits_chunk(graphdef, params) -> int:
    """Tokens `lm_head` unembeds at a time for this model (config.logits_chunk; runs saved
    before the field existed get the presets' default)."""
    return int(model_config(graphdef, params).get("logits_chunk", LOGITS_CHUNK))


def model_config(graphdef, params) -> ml_collections.FrozenConfigDict:
    """The frozen config a (graphdef, params) pair was built from. Cheap, also inside jit."""
    return nnx.merge(graphdef, params).config


def init_cache(config, batch_size: int, max_len: int, dtype=None):
    """Empty KV cache for `max_len` slots, stacked over layers like the block params.

    {'k': [L, B, S, K, D], 'v': [L, B, S, K, D],
     'mask': [B, S] bool (True where the slot holds a real token), 'index': int32 (next slot)}
    """
    dtype = dtype or _dtype(config.dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, head_dim(config))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def grow_cache(cache, extra_slots: int):
    """The same cache with `extra_slots` empty slots appended (a copy; the sampler grows its cache
    view in chunks so that decode attention reads only about the filled part)."""
    pad = [(0, 0)] * 5
    pad[2] = (0, extra_slots)
    return {"k": jnp.pad(cache["k"], pad), "v": jnp.pad(cache["v"], pad),
            "mask": jnp.pad(cache["mask"], ((0, 0), (0, extra_slots))), "index": cache["index"]}


def last_token_index(attention_mask):
    """[B, T] mask -> [B] int32 index of the last real token (0 for a row with none)."""
    mask = jnp.asarray(attention_mask).astype(bool)
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask, t, 0), axis=-1)


def reward_scores(graphdef, params, tokens, attention_mask):
    """Raw rewards [B] float32 of a 'scalar'-head model: its output at the last real token.

    tokens, attention_mask: [B, T] (prompt + response + EOS, any padding: left, right or both).
    Pure and jittable; a reward run's normalisation is applied by the caller: (r - mean) / std.
    """
    positions = positions_from_mask(attention_mask)
    outputs, _ = apply(graphdef, params, tokens, positions, attention_mask)
    last = last_token_index(attention_mask)
    return jnp.take_along_axis(outputs["scalar"], last[:, None], axis=-1)[:, 0]


def sequence_logprobs(graphdef, params, tokens, attention_mask, target_mask, temperature: float = 1.0):
    """log p(targets | what precedes them), summed per row: [B] float32.

    tokens, attention_mask [B, T] (any padding); target_mask [B, T] is 1 where tokens[:, t] is a
    target, predicted from position t - 1 (the loss_mask convention of data/loaders: column 0 is
    never a target). Logits are divided by `temperature`, as when the tokens were sampled.
    """
    positions = positions_from_mask(attention_mask)
    outputs, _ = apply(graphdef, params, tokens, positions, attention_mask, logits=False)
    token_logp, _, _ = lm_head.token_logprobs_and_entropy(outputs["hidden"][:, :-1], outputs["unembedding"],
                                                          tokens[:, 1:], temperature, logits_chunk(graphdef, params))
    return jnp.sum(jnp.where(jnp.asarray(target_mask)[:, 1:].astype(bool), token_logp, 0.0), axis=-1)


def positions_from_mask(attention_mask):
    """[B, T] mask -> [B, T] int32 positions: cumsum - 1, clipped at 0 (right for left padding)."""
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


# ----------------------------------------------------------------------------------------------
# Heads as pytree operations


def _with_head(params, config, head: str, seed: int):
    """Same trunk params, new head: copies every matching param, initializes the scalar head."""
    graphdef, abstract = abstract_params(config, head)
    old = dict(nnx.to_flat_state(params))
    fresh_head = dict(nnx.to_flat_state(nnx.state(_scalar_head(config, nnx.Rngs(seed)))))
    flat = []
    for path, _ in nnx.to_flat_state(abstract):
        if path[0] == "scalar_head":
            flat.append((path, fresh_head[path[1:]]))
        elif path in old:
            flat.append((path, old[path]))
        else:
            raise ValueError(f"cannot build head {head!r}: params have no {'/'.join(map(str, path))}")
    return graphdef, nnx.from_flat_state(flat)


def replace_head_with_scalar(graphdef, params, config, seed: int = 0):
    """Reward model from an LM: drop the unembedding, add a scalar head. Trunk params are shared
    (the same arrays). Returns (graphdef, params) of a head='scalar' model."""
    del graphdef  # the new graphdef comes from the config
    return _with_head(params, config, "scalar", seed)


def add_scalar_head(graphdef, params, config, seed: int = 0):
    """Policy with a value head: keep the LM head, add a scalar head ('lm_and_scalar')."""
    del graphdef
    return _with_head(params, config, "lm_and_scalar", seed)


# ----------------------------------------------------------------------------------------------
# Accounting


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H D T.

    N counts the matmul weights (attention, MLP, unembedding, tied or not); embedding lookups
    are free. The attention term is not halved for causality. T defaults to config.max_len.
    """
    t = seq_len or config.max_len
    d, hd = config.d_model, head_dim(config)
    attn = d * config.num_heads * hd * 2 + d * config.num_kv_heads * hd * 2
    mlp = (3 if config.mlp == "swiglu" else 2) * d * config.d_ff
    n = config.num_layers * (attn + mlp) + d * config.vocab_size
    return 6.0 * n + 12.0 * config.num_layers * config.num_heads * hd * t


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_model_config(c):
    """The decoder-only transformer (rlhf_jax.models.model; configs/models.py)."""
    for key in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
        c.integer("model." + key, 1)
    c.integer("model.head_dim", 0)
    d_model, heads, kv_heads = c.get("model.d_model"), c.get("model.num_heads"), c.get("model.num_kv_heads")
    width = c.get("model.head_dim")
    if not width and d_model % heads:
        c.fail("model.num_heads", heads, f"expected a divisor of model.d_model={d_model} (or set model.head_dim)")
    if heads % kv_heads:
        c.fail("model.num_kv_heads", kv_heads, f"expected a divisor of model.num_heads={heads}")
    c.choice("model.positions", ("learned", "rope"))
    width = width or d_model // heads
    if c.get("model.positions") == "rope" and width % 2:
        c.fail("model.head_dim" if c.get("model.head_dim") else "model.num_heads", c.get("model.head_dim") or heads,
               f"RoPE needs an even head_dim (here {width})")
    c.choice("model.rope_scaling", ROPE_SCALINGS)
    if c.get("model.rope_scaling") == "llama3":
        if c.get("model.positions") != "rope":
            c.fail("model.rope_scaling", "llama3", "needs model.positions='rope'")
        c.positive("model.rope_factor")
        c.positive("model.rope_low_freq_factor")
        c.positive("model.rope_original_max_len")
        low, high = c.get("model.rope_low_freq_factor"), c.get("model.rope_high_freq_factor")
        if checks.MISSING not in (low, high) and high <= low:
            c.fail("model.rope_high_freq_factor", high, f"expected more than model.rope_low_freq_factor={low}")
    c.boolean("model.qkv_bias")
    c.boolean("model.qk_norm")
    if c.get("model.qk_norm") is True and c.get("model.norm") != "rmsnorm":
        c.fail("model.qk_norm", True, "needs model.norm='rmsnorm' (Qwen3's per-head RMSNorm)")
    c.choice("model.norm", ("layernorm", "rmsnorm"))
    c.choice("model.mlp", ("gelu", "swiglu"))
    c.choice("model.dtype", ("float32", "bfloat16"))
    c.choice("model.attention_impl", ATTENTION_IMPLS)
    c.choice("model.param_dtype", ("float32",))
    c.choice("model.dropout", (0.0,))
    c.integer("model.logits_chunk", 0)
    c.positive("model.norm_eps")
    c.positive("model.init_std")
    c.positive("model.rope_theta")
    c.choice("tokenizer.kind", ("byte", "hf"))
    if c.get("tokenizer.kind") == "hf" and not c.get("tokenizer.path"):
        c.fail("tokenizer.path", c.get("tokenizer.path"), "tokenizer.kind='hf' needs the folder holding tokenizer.json")
    c.boolean("tokenizer.chat_template")
    if c.get("tokenizer.chat_template") is True and c.get("tokenizer.kind") != "hf":
        c.fail("tokenizer.chat_template", True, "needs tokenizer.kind='hf' (the template comes with an HF tokenizer)")


def check_sequence_config(c):
    c.integer("seq_len", 2)
    c.integer("pad_to_multiple", 0)
    seq_len, max_len = c.get("seq_len"), c.get("model.max_len")
    if seq_len is not checks.MISSING and max_len is not checks.MISSING and seq_len > max_len:
        c.fail("seq_len", seq_len, f"expected at most model.max_len={max_len}")
