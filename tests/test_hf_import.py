"""Our forward pass on imported HF checkpoints vs logits stored from transformers (float32).

The fixtures are made by scripts/make_hf_fixtures.py; these tests need neither torch nor
transformers.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import model as M
from rlhf_jax.models.hf_import import graphdef_for, load_hf_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("name", ["hf_gpt2_tiny", "hf_llama_tiny"])
def test_logits_match_transformers(name):
    folder = os.path.join(FIXTURES, name)
    config, params = load_hf_checkpoint(folder)
    graphdef = graphdef_for(config)
    inputs = np.load(os.path.join(folder, "inputs.npy"))
    mask = np.load(os.path.join(folder, "attention_mask.npy"))
    expected = np.load(os.path.join(folder, "expected_logits.npy"))
    logits = M.apply(graphdef, params, inputs, M.positions_from_mask(mask), mask)[0]["logits"]
    assert logits.shape == expected.shape
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - expected[real]).max() <= 1e-4

    # Same tree as a fresh init of the same config, so every training stage accepts it.
    _, fresh = M.abstract_params(config)
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    assert [(p, v.shape) for p, v in nnx.to_flat_state(fresh)] == [(p, v.shape) for p, v in nnx.to_flat_state(params)]


def test_llama_config_fields():
    config, _ = load_hf_checkpoint(os.path.join(FIXTURES, "hf_llama_tiny"))
    assert (config.positions, config.norm, config.mlp, config.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False)
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (4, 2, 300)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(tmp_path))

    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(NotImplementedError, match="BertModel"):
        load_hf_checkpoint(str(bad))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(FIXTURES, "hf_gpt2_tiny", "config.json"), no_weights)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(str(no_weights))

    from safetensors.numpy import load_file, save_file

    missing = tmp_path / "missing_key"
    missing.mkdir()
    shutil.copy(os.path.join(FIXTURES, "hf_llama_tiny", "config.json"), missing)
    weights = load_file(os.path.join(FIXTURES, "hf_llama_tiny", "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(missing / "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_checkpoint(str(missing))
