"""Export to Hugging Face: round trips through our importer (same logits), the shipped
transformers fixtures still matched after import -> export -> import, refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from rlhf_jax.models import model as M
from rlhf_jax.models.hf_export import export_hf
from rlhf_jax.models.hf_import import graphdef_for, load_hf_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def logits(config, params, tokens, mask):
    return np.asarray(M.apply(graphdef_for(config), params, tokens, M.positions_from_mask(mask), mask)[0]["logits"])


@pytest.mark.parametrize("name", ["hf_gpt2_tiny", "hf_llama_tiny", "hf_qwen2_tiny", "hf_qwen3_tiny", "hf_llama3_tiny"])
def test_fixture_import_export_import_still_matches_transformers(name, tmp_path):
    folder = os.path.join(FIXTURES, name)
    config, params = load_hf_checkpoint(folder)
    export_hf(config, params, str(tmp_path))
    again_config, again = load_hf_checkpoint(str(tmp_path))
    assert again_config.to_dict() == config.to_dict()
    inputs, mask = np.load(os.path.join(folder, "inputs.npy")), np.load(os.path.join(folder, "attention_mask.npy"))
    expected = np.load(os.path.join(folder, "expected_logits.npy"))
    real = mask.astype(bool)
    assert np.abs(logits(again_config, again, inputs, mask)[real] - expected[real]).max() <= 1e-4


# Our own models with each family's features (on top of llama_tiny: GQA, untied), and what
# transformers class the export must name.
FAMILIES = {
    "gpt2": ("tiny", {}, "GPT2LMHeadModel"),
    "llama": ("llama_tiny", {}, "LlamaForCausalLM"),
    "qwen2": ("llama_tiny", dict(qkv_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),
    "qwen3": ("llama_tiny", dict(qk_norm=True, head_dim=48, rope_theta=1e6), "Qwen3ForCausalLM"),
    "llama3": ("llama_tiny", dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                                  rope_high_freq_factor=4.0, rope_original_max_len=64, rope_theta=5e5),
               "LlamaForCausalLM"),
}


def family_config(family):
    preset, overrides, _ = FAMILIES[family]
    config = getattr(models, preset)()
    config.update(num_layers=3, **overrides)
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_random_model_round_trip_gives_identical_logits(family, tmp_path):
    """A byte-vocabulary GPT-2 (vocab 264), a GQA untied Llama, and the Qwen2 / Qwen3 / Llama 3.x
    features, from our own init (noise on every norm and bias so none can be dropped unseen)."""
    config = family_config(family)
    _, params = M.init_params(config, seed=4)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params)
    export_hf(config, params, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [FAMILIES[family][2]]
    again_config, again = load_hf_checkpoint(str(tmp_path))
    assert again_config.to_dict() == config.to_dict()
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 264, (2, 12)), jnp.int32)
    mask = jnp.ones((2, 12), jnp.int32).at[1, :4].set(0)
    np.testing.assert_array_equal(logits(config, again, tokens, mask), logits(config, params, tokens, mask))


def test_models_without_a_hugging_face_layout_are_refused(tmp_path):
    config = models.tiny()
    config.update(positions="rope")  # RoPE with LayerNorm and GELU: neither GPT-2 nor Llama
    _, params = M.init_params(config)
    with pytest.raises(ValueError, match="neither GPT-2"):
        export_hf(config, params, str(tmp_path))
    config = models.tiny()
    config.update(num_kv_heads=2)
    _, params = M.init_params(config)
    with pytest.raises(ValueError, match="grouped-query"):
        export_hf(config, params, str(tmp_path))

    config = models.llama_tiny()
    config.update(qkv_bias=True, qk_norm=True)
    _, params = M.init_params(config)
    with pytest.raises(ValueError, match="qkv_bias=True with qk_norm=True"):
        export_hf(config, params, str(tmp_path))
