"""Model sizes, the defaults of `rlhf_jax.models.model` (configs/models.py re-exports them). Each function returns a `ConfigDict` with every field the model reads.

Every preset carries the same fields (so a command-line override is type-checked against a
real default):

    vocab_size      tokens in the embedding table (byte tokenizer: 264)
    max_len         longest sequence the model sees (size of the learned position table)
    d_model         residual stream width
    num_layers      transformer blocks
    num_heads       query heads
    head_dim        width of one head; 0 means d_model // num_heads (Qwen3 sets it apart)
    num_kv_heads    key/value heads (GQA); equal to num_heads for plain multi-head attention
    d_ff            hidden width of the MLP
    positions       'learned' (GPT-2) or 'rope' (Llama)
    rope_theta      RoPE base frequency (read only when positions == 'rope')
    rope_scaling    'none', or 'llama3' (Llama 3.1+ frequency scaling, with the four fields below)
    rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len
                    the 'llama3' scaling's factor, low_freq_factor, high_freq_factor and
                    original_max_position_embeddings (read only when rope_scaling == 'llama3')
    norm            'layernorm' (GPT-2) or 'rmsnorm' (Llama)
    norm_eps        epsilon of the norms
    mlp             'gelu' (tanh approximation, as GPT-2) or 'swiglu' (Llama)
    use_bias        biases in the attention and MLP projections (and LayerNorm)
    qkv_bias        biases on the query, key and value projections only (Qwen2; implied by use_bias)
    qk_norm         RMSNorm over each query and key head before RoPE (Qwen3; needs norm='rmsnorm')
    tie_embeddings  unembedding is the transposed token embedding
    dtype           compute dtype: 'float32' or 'bfloat16' (logits always come back float32)
    param_dtype     parameter dtype: 'float32'
    remat           recompute each block in the backward pass (jax.checkpoint)
    logits_chunk    tokens unembedded at a time by the log-prob, entropy and loss paths
                    (rlhf_jax.models.lm_head), which never hold [B, T, V] logits; 0 = all at once
    attention_impl  'einsum' (our two einsums), 'xla' or 'cudnn' (jax.nn.dot_product_attention;
                    'cudnn' = fused flash attention on NVIDIA GPUs, bf16 only)
    dropout         must be 0.0: dropout is not implemented (the model raises otherwise)
    init_std        std of the normal init of embeddings and projections
"""

import ml_collections


def _base(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        vocab_size=264,
        max_len=256,
        d_model=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=0,
        d_ff=512,
        positions="learned",
        rope_theta=10000.0,
        rope_scaling="none",
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
        norm="layernorm",
        norm_eps=1e-5,
        mlp="gelu",
        use_bias=True,
        qkv_bias=False,
        qk_norm=False,
        tie_embeddings=True,
        dtype="float32",
        param_dtype="float32",
        remat=False,
        logits_chunk=256,
        attention_impl="einsum",
        dropout=0.0,
        init_std=0.02,
    ))
    config.update(overrides)
    return config


def tiny() -> ml_collections.ConfigDict:
    """GPT-2 style, byte vocabulary, ~0.5M parameters: tests and CPU smoke runs."""
    return _base()


def small() -> ml_collections.ConfigDict:
    """GPT-2 style, byte vocabulary, ~3M parameters."""
    return _base(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=1024, max_len=512)


def gpt2_124m() -> ml_collections.ConfigDict:
    """GPT-2 small. Vocabulary 50257 padded to 50304 (a multiple of 64, faster matmuls)."""
    return _base(vocab_size=50304, max_len=1024, d_model=768, num_layers=12, num_heads=12,
                 num_kv_heads=12, d_ff=3072)


def llama_tiny() -> ml_collections.ConfigDict:
    """Llama style (RoPE, RMSNorm, SwiGLU, untied, no biases, GQA), byte vocabulary."""
    return _base(positions="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", use_bias=False,
                 tie_embeddings=False, num_heads=4, num_kv_heads=2, d_ff=344)
