"""Our forward pass on imported HF checkpoints vs logits stored from transformers (float32).

The fixtures are made by scripts/make_hf_fixtures.py; these tests need neither torch nor
transformers.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import model as M
from rlhf_jax.models.hf_import import graphdef_for, load_hf_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


NAMES = ["hf_gpt2_tiny", "hf_llama_tiny", "hf_qwen2_tiny", "hf_qwen3_tiny", "hf_llama3_tiny"]


@pytest.mark.parametrize("name", NAMES)
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


def test_family_config_fields():
    qwen2, params = load_hf_checkpoint(os.path.join(FIXTURES, "hf_qwen2_tiny"))
    assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.head_dim, qwen2.tie_embeddings) == (True, False, 0, False)
    assert params["blocks"]["attn"]["query"]["bias"].shape == (2, 64)
    assert "bias" not in params["blocks"]["attn"]["out"]  # Qwen2's o_proj has none

    qwen3, params = load_hf_checkpoint(os.path.join(FIXTURES, "hf_qwen3_tiny"))
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.tie_embeddings) == (False, True, 32, True)
    assert params["blocks"]["attn"]["query"]["kernel"].shape == (2, 64, 4 * 32)
    assert params["blocks"]["attn"]["key_norm"]["scale"].shape == (2, 32)
    assert qwen3.rope_theta == 1e6

    llama3, _ = load_hf_checkpoint(os.path.join(FIXTURES, "hf_llama3_tiny"))
    assert (llama3.rope_scaling, llama3.rope_factor, llama3.rope_low_freq_factor, llama3.rope_high_freq_factor,
            llama3.rope_original_max_len) == ("llama3", 8.0, 1.0, 4.0, 64)
    # The scaling is not a no-op at this size: all three bands occur.
    plain = M.rope_frequencies(ml_collections.ConfigDict({**llama3.to_dict(), "rope_scaling": "none"}))
    scaled = M.rope_frequencies(llama3)
    ratio = np.asarray(plain / scaled)
    assert ratio[0] == 1.0 and np.isclose(ratio[-1], 8.0) and np.any((ratio > 1.0) & (ratio < 8.0))

    llama2, _ = load_hf_checkpoint(os.path.join(FIXTURES, "hf_llama_tiny"))  # unchanged defaults
    assert (llama2.qkv_bias, llama2.qk_norm, llama2.head_dim, llama2.rope_scaling) == (False, False, 0, "none")


def test_llama3_rope_scaling_and_rope_parameters_import_the_same(tmp_path):
    """Published Llama 3.x: rope_scaling + top-level rope_theta; transformers >= 5 writes
    rope_parameters with rope_theta inside (the fixture's own form)."""
    source = os.path.join(FIXTURES, "hf_llama3_tiny")
    with open(os.path.join(source, "config.json")) as f:
        hf = json.load(f)
    assert "rope_parameters" in hf
    published = dict(hf)
    rope = dict(published.pop("rope_parameters"))
    published["rope_theta"] = rope.pop("rope_theta")
    published["rope_scaling"] = rope
    folder = tmp_path / "published"
    folder.mkdir()
    shutil.copy(os.path.join(source, "model.safetensors"), folder)
    (folder / "config.json").write_text(json.dumps(published))
    config_a, params_a = load_hf_checkpoint(source)
    config_b, params_b = load_hf_checkpoint(str(folder))
    assert config_a.to_dict() == config_b.to_dict()
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params_a, params_b))


@pytest.mark.parametrize("name, edit, key", [
    ("hf_qwen2_tiny", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("hf_qwen3_tiny", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("hf_qwen3_tiny", {"num_experts": 8}, "num_experts"),
    ("hf_llama_tiny", {"num_local_experts": 8}, "num_local_experts"),
    ("hf_qwen2_tiny", {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"}, "architectures"),
    ("hf_qwen3_tiny", {"architectures": [], "model_type": "qwen3_moe"}, "model_type"),
    ("hf_llama3_tiny", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ("hf_llama_tiny", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
    ("hf_llama_tiny", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ("hf_llama_tiny", {"rope_scaling": {"rope_type": "longrope"}}, "rope_type"),
    ("hf_llama_tiny", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("hf_llama_tiny", {"attention_bias": True}, "attention_bias"),
    ("hf_qwen3_tiny", {"attention_bias": True}, "attention_bias"),
    ("hf_llama_tiny", {"mlp_bias": True}, "mlp_bias"),
    ("hf_llama_tiny", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, name, edit, key):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        hf = json.load(f)
    hf.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shutil.copy(os.path.join(FIXTURES, name, "model.safetensors"), tmp_path)
    with pytest.raises(NotImplementedError) as error:
        load_hf_checkpoint(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and key in message and "config.json" in message


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
