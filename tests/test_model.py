"""Transformer: shapes for every option, causality, left padding, KV cache, head surgery."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import models
from rlhf_jax.models import model as M


def micro(**overrides):
    """A very small config so each variant compiles in well under a second."""
    config = models.tiny()
    config.update(dict(vocab_size=40, max_len=32, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=4, d_ff=64))
    config.update(overrides)
    return config


def llama_micro(**overrides):
    llama = dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
                 num_kv_heads=2)
    return micro(**{**llama, **overrides})


def qwen_llama3_micro(**overrides):
    """Every family option at once: Qwen2's q/k/v biases, Qwen3's q/k norms and wider heads
    (4 x 16 > d_model 32), Llama 3's RoPE scaling (original length 16, so all three bands occur)."""
    family = dict(qkv_bias=True, qk_norm=True, head_dim=16, rope_scaling="llama3", rope_original_max_len=16)
    return llama_micro(**{**family, **overrides})


ARCHS = {"gpt2": micro, "llama": llama_micro, "families": qwen_llama3_micro}


def random_tokens(seed, shape, vocab=40):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, size=shape), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, mask, cache=None, positions=None):
    if positions is None:
        positions = M.positions_from_mask(mask)
    return M.apply(graphdef, params, tokens, positions, mask, cache)


# Architecture options: a half-fraction of the 2^4 design (tie = parity of the other three),
# so every pair of option values appears together. Compute options: each head with each dtype,
# remat on and off, and MHA / GQA / MQA.
_ARCH_OPTIONS = [(pos, norm, mlp, (pos == "rope") ^ (norm == "rmsnorm") ^ (mlp == "swiglu"))
                 for pos, norm, mlp in itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"],
                                                         ["gelu", "swiglu"])]
_COMPUTE_OPTIONS = [("lm", "float32", False, 4), ("scalar", "bfloat16", True, 2),
                    ("lm_and_scalar", "bfloat16", False, 1), ("lm", "bfloat16", True, 4),
                    ("scalar", "float32", True, 1), ("lm_and_scalar", "float32", False, 2)]


@pytest.mark.parametrize("positions,norm,mlp,tie", _ARCH_OPTIONS)
def test_shapes_every_architecture(positions, norm, mlp, tie):
    config = micro(positions=positions, norm=norm, mlp=mlp, tie_embeddings=tie, use_bias=(norm == "layernorm"))
    graphdef, params = M.init_params(config, head="lm_and_scalar")
    tokens = random_tokens(0, (2, 7))
    mask = jnp.ones((2, 7), jnp.int32).at[0, :2].set(0)
    outputs, cache = forward(graphdef, params, tokens, mask)
    assert cache is None
    assert outputs["logits"].shape == (2, 7, 40) and outputs["logits"].dtype == jnp.float32
    assert outputs["scalar"].shape == (2, 7) and outputs["scalar"].dtype == jnp.float32
    assert np.isfinite(outputs["logits"]).all() and np.isfinite(outputs["scalar"]).all()


@pytest.mark.parametrize("head,dtype,remat,kv_heads", _COMPUTE_OPTIONS)
def test_shapes_heads_dtype_remat_gqa(head, dtype, remat, kv_heads):
    config = llama_micro(dtype=dtype, remat=remat, num_kv_heads=kv_heads)
    graphdef, params = M.init_params(config, head=head)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = random_tokens(1, (3, 5))
    mask = jnp.ones((3, 5), jnp.int32)
    outputs, _ = forward(graphdef, params, tokens, mask)
    assert set(outputs) == {"lm": {"logits"}, "scalar": {"scalar"}, "lm_and_scalar": {"logits", "scalar"}}[head]
    if "logits" in outputs:
        assert outputs["logits"].shape == (3, 5, 40) and outputs["logits"].dtype == jnp.float32
    if "scalar" in outputs:
        assert outputs["scalar"].shape == (3, 5) and outputs["scalar"].dtype == jnp.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_close_to_float32(arch):
    graphdef32, params = M.init_params(ARCHS[arch](), seed=3)
    graphdef16, _ = M.abstract_params(ARCHS[arch](dtype="bfloat16"))
    tokens = random_tokens(2, (2, 6))
    mask = jnp.ones((2, 6), jnp.int32)
    logits32 = forward(graphdef32, params, tokens, mask)[0]["logits"]
    logits16 = forward(graphdef16, params, tokens, mask)[0]["logits"]
    np.testing.assert_allclose(logits16, logits32, atol=0.05)


def test_remat_gives_same_gradients():
    graphdef, params = M.init_params(llama_micro(), seed=4)
    graphdef_remat, _ = M.abstract_params(llama_micro(remat=True))
    tokens = random_tokens(3, (2, 6))
    mask = jnp.ones((2, 6), jnp.int32)

    def loss(params, graphdef):
        return jnp.mean(forward(graphdef, params, tokens, mask)[0]["logits"] ** 2)

    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef)
    grads_remat = jax.jit(jax.grad(loss), static_argnums=1)(params, graphdef_remat)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    graphdef, params = M.init_params(ARCHS[arch](), seed=5)
    tokens = random_tokens(4, (2, 8))
    mask = jnp.ones((2, 8), jnp.int32)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 40)
    before = forward(graphdef, params, tokens, mask)[0]["logits"]
    after = forward(graphdef, params, changed, mask)[0]["logits"]
    np.testing.assert_array_equal(before[:, :5], after[:, :5])
    assert not np.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_matches_unpadded(arch):
    graphdef, params = M.init_params(ARCHS[arch](), seed=6)
    tokens = random_tokens(5, (1, 5))
    unpadded = forward(graphdef, params, tokens, jnp.ones((1, 5), jnp.int32))[0]["logits"]
    pad = 3
    padded_tokens = jnp.concatenate([jnp.full((1, pad), 39, jnp.int32), tokens], axis=1)
    padded_mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 5), jnp.int32)], axis=1)
    outputs = forward(graphdef, params, padded_tokens, padded_mask)[0]["logits"]
    assert np.isfinite(outputs).all()
    np.testing.assert_allclose(outputs[:, pad:], unpadded, atol=1e-5)


def test_positions_from_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(M.positions_from_mask(mask), expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 2])
def test_cached_decoding_equals_full_forward(arch, chunk):
    config = ARCHS[arch]()
    graphdef, params = M.init_params(config, seed=7)
    b, prompt_len, total = 2, 4, 10
    tokens = random_tokens(6, (b, total))
    mask = jnp.ones((b, total), jnp.int32).at[0, :2].set(0)  # row 0 left-padded
    positions = M.positions_from_mask(mask)
    full = forward(graphdef, params, tokens, mask)[0]["logits"]

    step = jax.jit(M.apply, static_argnums=0)
    cache = M.init_cache(config, b, total)
    outputs, cache = step(graphdef, params, tokens[:, :prompt_len], positions[:, :prompt_len],
                          mask[:, :prompt_len], cache)
    pieces = [outputs["logits"]]
    for start in range(prompt_len, total, chunk):
        sl = slice(start, start + chunk)
        outputs, cache = step(graphdef, params, tokens[:, sl], positions[:, sl], mask[:, sl], cache)
        pieces.append(outputs["logits"])
    assert int(cache["index"]) == total
    cached = jnp.concatenate(pieces, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_replace_head_with_scalar_keeps_trunk(arch):
    config = ARCHS[arch]()
    graphdef, params = M.init_params(config, seed=8)
    rm_graphdef, rm_params = M.replace_head_with_scalar(graphdef, params, config, seed=1)
    lm_flat, rm_flat = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(rm_params))
    trunk = [p for p in lm_flat if p[0] != "unembed"]
    assert set(rm_flat) == set(trunk) | {("scalar_head", "kernel"), ("scalar_head", "bias")}
    for path in trunk:
        np.testing.assert_array_equal(rm_flat[path][...], lm_flat[path][...])
    assert rm_flat[("scalar_head", "kernel")][...].std() > 0

    tokens = random_tokens(7, (2, 6))
    mask = jnp.ones((2, 6), jnp.int32)
    outputs, _ = forward(rm_graphdef, rm_params, tokens, mask)
    assert set(outputs) == {"scalar"} and outputs["scalar"].shape == (2, 6)
    assert np.isfinite(outputs["scalar"]).all()

    # The reward model trains on its own: a gradient step on it leaves the LM params untouched.
    grads = jax.jit(jax.grad(lambda p: forward(rm_graphdef, p, tokens, mask)[0]["scalar"].sum()))(rm_params)
    assert set(dict(nnx.to_flat_state(grads))) == set(rm_flat)


def test_add_scalar_head_keeps_logits():
    config = llama_micro()
    graphdef, params = M.init_params(config, seed=9)
    vgraphdef, vparams = M.add_scalar_head(graphdef, params, config, seed=2)
    tokens = random_tokens(8, (2, 6))
    mask = jnp.ones((2, 6), jnp.int32)
    lm = forward(graphdef, params, tokens, mask)[0]
    both = forward(vgraphdef, vparams, tokens, mask)[0]
    np.testing.assert_array_equal(both["logits"], lm["logits"])
    assert both["scalar"].shape == (2, 6)


def test_config_errors():
    with pytest.raises(NotImplementedError, match="dropout"):
        M.init_params(micro(dropout=0.1))
    with pytest.raises(ValueError, match="num_kv_heads"):
        M.init_params(micro(num_kv_heads=3))
    with pytest.raises(ValueError, match="head="):
        M.init_params(micro(), head="value")


def test_family_config_errors():
    with pytest.raises(ValueError, match="rope_scaling='yarn'"):
        M.init_params(llama_micro(rope_scaling="yarn"))
    with pytest.raises(ValueError, match="rope_scaling='llama3' needs positions='rope'"):
        M.init_params(micro(rope_scaling="llama3"))
    with pytest.raises(ValueError, match="qk_norm=True needs norm='rmsnorm'"):
        M.init_params(micro(qk_norm=True))
    with pytest.raises(ValueError, match="head_dim=-2"):
        M.init_params(micro(head_dim=-2))
    M.init_params(micro(d_model=30, num_heads=4, head_dim=8))  # head_dim frees d_model from num_heads


def test_model_check_names_family_fields():
    from rlhf_jax.runtime import checks, config as config_lib

    def check(**model):
        config = config_lib.ml_collections.ConfigDict(dict(model={**llama_micro().to_dict(), **model}))
        M.check_model_config(checks.Checks(config, ""))

    check(**{k: v for k, v in qwen_llama3_micro().items() if k in M.FAMILY_DEFAULTS})
    for model, message in [
        (dict(head_dim=-1), r"model.head_dim=-1: expected an integer >= 0"),
        (dict(head_dim=7), r"model.head_dim=7: RoPE needs an even head_dim"),
        (dict(d_model=30), r"model.num_heads=4: expected a divisor of model.d_model=30"),
        (dict(rope_scaling="yarn"), r"model.rope_scaling='yarn'"),
        (dict(rope_scaling="llama3", rope_high_freq_factor=1.0), r"model.rope_high_freq_factor=1.0"),
        (dict(rope_scaling="llama3", rope_factor=0.0), r"model.rope_factor=0.0"),
        (dict(qkv_bias=1), r"model.qkv_bias=1: expected True or False"),
        (dict(qk_norm=True, norm="layernorm"), r"model.qk_norm=True: needs model.norm='rmsnorm'"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            check(**model)


def test_configs_without_the_family_fields_build_the_same_model():
    """Runs stored before head_dim, qkv_bias, qk_norm and rope_scaling existed: same params, same logits."""
    for make in (micro, llama_micro):
        config = make()
        old = config.to_dict()
        for key in M.FAMILY_DEFAULTS:
            del old[key]
        old = M.ml_collections.ConfigDict(old)
        graphdef, params = M.init_params(config, seed=1)
        old_graphdef, old_params = M.init_params(old, seed=1)
        assert jax.tree.structure(params) == jax.tree.structure(old_params)
        tokens, mask = random_tokens(0, (2, 8)), jnp.ones((2, 8), jnp.int32)
        np.testing.assert_array_equal(forward(graphdef, params, tokens, mask)[0]["logits"],
                                      forward(old_graphdef, old_params, tokens, mask)[0]["logits"])
        assert M.stored_model_config(old.to_dict()).to_dict() == config.to_dict()


def test_presets_have_the_same_fields():
    presets = [models.tiny(), models.small(), models.gpt2_124m(), models.llama_tiny()]
    for preset in presets:
        assert set(preset.keys()) == set(presets[0].keys())
    graphdef, params = M.abstract_params(models.gpt2_124m())
    assert 124e6 < M.count_params(params) < 125e6
    assert M.flops_per_token(models.gpt2_124m(), 1024) > 6 * 85e6
    _, tiny_params = M.abstract_params(models.llama_tiny())
    assert M.count_params(tiny_params) > 0


def test_block_params_are_stacked_on_a_layer_axis():
    """One scanned block: every block param has a leading [num_layers] axis, each layer its own init."""
    config = micro(num_layers=3)
    graphdef, params = M.init_params(config, seed=3)
    for path, leaf in nnx.to_flat_state(params):
        if path[0] == "blocks":
            assert leaf.shape[0] == 3, path
    kernels = np.asarray(params["blocks"]["attn"]["query"]["kernel"][...])
    assert not np.allclose(kernels[0], kernels[1])  # each layer initialised on its own


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["xla"])
def test_attention_impls_equal_einsum(arch, impl):
    """jax.nn.dot_product_attention (attention_impl) equals our einsum path: GQA, left padding,
    KV-cache decoding, and gradients."""
    base = ARCHS[arch]()
    graphdef, params = M.init_params(base, seed=5)
    other_graphdef, _ = M.abstract_params(ARCHS[arch](attention_impl=impl))
    tokens = random_tokens(9, (2, 8))
    mask = jnp.ones((2, 8), jnp.int32).at[0, :3].set(0)
    real = np.asarray(mask, bool)
    ours = forward(graphdef, params, tokens, mask)[0]["logits"]
    theirs = forward(other_graphdef, params, tokens, mask)[0]["logits"]
    np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=1e-5)

    cache = M.init_cache(base, 2, 8)
    _, cache = forward(other_graphdef, params, tokens[:, :6], mask[:, :6], cache)
    step = forward(other_graphdef, params, tokens[:, 6:], mask[:, 6:], cache,
                   M.positions_from_mask(mask)[:, 6:])[0]["logits"]
    np.testing.assert_allclose(step, ours[:, 6:], atol=1e-5)

    def loss(p, g):
        return jnp.sum(jnp.where(real[..., None], forward(g, p, tokens, mask)[0]["logits"], 0.0) ** 2)

    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, graphdef)),
                    jax.tree.leaves(jax.grad(loss)(params, other_graphdef))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_attention_impl_is_named():
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        M.init_params(micro(attention_impl="flash"))
