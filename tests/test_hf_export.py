"""Export to Hugging Face: round trips through our importer (same logits), the shipped
transformers fixtures still matched after import -> export -> import, refusals."""

import os

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


@pytest.mark.parametrize("name", ["hf_gpt2_tiny", "hf_llama_tiny"])
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


@pytest.mark.parametrize("preset", ["tiny", "llama_tiny"])
def test_random_model_round_trip_gives_identical_logits(preset, tmp_path):
    """A byte-vocabulary GPT-2 (vocab 264) and a GQA, untied Llama, from our own init."""
    config = getattr(models, preset)()
    config.update(num_layers=3)
    _, params = M.init_params(config, seed=4)
    export_hf(config, params, str(tmp_path))
    _, again = load_hf_checkpoint(str(tmp_path))
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
