"""Load a local Hugging Face checkpoint (GPT-2 or Llama architecture) into our Transformer.

    config, params = load_hf_checkpoint("/path/to/gpt2")       # folder: config.json + *.safetensors
    graphdef, _ = model.abstract_params(config)                 # or: graphdef_for(config)
    outputs, _ = model.apply(graphdef, params, tokens, positions, mask)

Weights are read with `safetensors.numpy` (never pickle). The returned params have exactly the
structure of `init_params(config, head='lm')` (block params stacked on a leading layer axis); the vocabulary is the checkpoint's own (not
padded). Supported: `GPT2LMHeadModel` and `LlamaForCausalLM` (default RoPE, no rope scaling,
head_dim = hidden_size / num_attention_heads). Anything else is refused with a message naming the
file and the key.

Layout notes: GPT-2 stores Conv1D weights as [in, out] (our kernel layout) with q, k, v fused in
`c_attn`; Llama stores nn.Linear weights as [out, in] (transposed here). Llama's q/k projections
use the same "rotate half" RoPE layout as `model.apply_rope`, so no permutation is needed.
"""

from __future__ import annotations

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from rlhf_jax.models import model, presets


def load_hf_checkpoint(path: str):
    """(config, params) for a local GPT-2 or Llama checkpoint folder. See the module docstring."""
    hf_config = _read_config(path)
    arch = _architecture(hf_config, path)
    weights = _read_safetensors(path)
    if arch == "gpt2":
        config = _gpt2_config(hf_config, path)
        flat = _gpt2_params(weights, config, path)
    else:
        config = _llama_config(hf_config, path)
        flat = _llama_params(weights, config, path)
    return config, _to_state(flat, config, path)


def graphdef_for(config, head: str = "lm"):
    """The graphdef that goes with `load_hf_checkpoint`'s params."""
    return model.abstract_params(config, head)[0]


# ----------------------------------------------------------------------------------------------
# Files


def _read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder (expected a checkpoint folder with config.json)")
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(file) as f:
        return json.load(f)


def _architecture(hf_config, path):
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if "GPT2LMHeadModel" in archs or (not archs and model_type == "gpt2"):
        return "gpt2"
    if "LlamaForCausalLM" in archs or (not archs and model_type == "llama"):
        return "llama"
    raise NotImplementedError(f"{path}/config.json: architectures={archs} model_type={model_type!r} is not "
                              "supported (GPT2LMHeadModel, LlamaForCausalLM)")


def _read_safetensors(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
        hint = " (found pickle files, which are never loaded: convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors file in {path!r}{hint}")
    weights = {}
    for file in files:
        weights.update(load_file(file))
    return weights


# ----------------------------------------------------------------------------------------------
# GPT-2


def _require(hf_config, key, expected, path):
    value = hf_config.get(key, expected)
    if value != expected:
        raise NotImplementedError(f"{path}/config.json: {key}={value!r} is not supported (expected {expected!r})")


def _gpt2_config(hf, path):
    for key, expected in [("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False), ("add_cross_attention", False)]:
        _require(hf, key, expected, path)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NotImplementedError(f"{path}/config.json: activation_function={hf['activation_function']!r} "
                                  "is not supported (gelu_new)")
    d = hf["n_embd"]
    config = presets.tiny()
    config.update(dict(vocab_size=hf["vocab_size"], max_len=hf["n_positions"], d_model=d, num_layers=hf["n_layer"],
                       num_heads=hf["n_head"], num_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                       positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       mlp="gelu", use_bias=True, tie_embeddings=True,
                       init_std=hf.get("initializer_range", 0.02)))
    return config


def _gpt2_params(weights, config, path):
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
    get = _getter(weights, path)
    d = config.d_model
    flat = {
        ("embed", "embedding"): get("wte.weight"),
        ("position_embed", "embedding"): get("wpe.weight"),
        ("final_norm", "scale"): get("ln_f.weight"),
        ("final_norm", "bias"): get("ln_f.bias"),
    }
    for i in range(config.num_layers):
        h = f"h.{i}."
        block = ("blocks", i)
        qkv_w, qkv_b = get(h + "attn.c_attn.weight"), get(h + "attn.c_attn.bias")  # [d, 3d], [3d]
        for j, name in enumerate(("query", "key", "value")):
            flat[block + ("attn", name, "kernel")] = qkv_w[:, j * d:(j + 1) * d]
            flat[block + ("attn", name, "bias")] = qkv_b[j * d:(j + 1) * d]
        flat.update({
            block + ("attn", "out", "kernel"): get(h + "attn.c_proj.weight"),
            block + ("attn", "out", "bias"): get(h + "attn.c_proj.bias"),
            block + ("attn_norm", "scale"): get(h + "ln_1.weight"),
            block + ("attn_norm", "bias"): get(h + "ln_1.bias"),
            block + ("mlp_norm", "scale"): get(h + "ln_2.weight"),
            block + ("mlp_norm", "bias"): get(h + "ln_2.bias"),
            block + ("mlp", "up", "kernel"): get(h + "mlp.c_fc.weight"),
            block + ("mlp", "up", "bias"): get(h + "mlp.c_fc.bias"),
            block + ("mlp", "down", "kernel"): get(h + "mlp.c_proj.weight"),
            block + ("mlp", "down", "bias"): get(h + "mlp.c_proj.bias"),
        })
    return flat


# ----------------------------------------------------------------------------------------------
# Llama


def _llama_config(hf, path):
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"{path}/config.json: rope_type={rope_type!r} is not supported (default RoPE only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{path}/config.json: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", d // heads) != d // heads:
        raise NotImplementedError(f"{path}/config.json: head_dim={hf['head_dim']} != hidden_size / "
                                  f"num_attention_heads = {d // heads} is not supported")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias or mlp_bias:
        raise NotImplementedError(f"{path}/config.json: attention_bias={attention_bias}, mlp_bias={mlp_bias}: "
                                  "biases are not supported for Llama checkpoints")
    config = presets.llama_tiny()
    config.update(dict(vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", 2048), d_model=d,
                       num_layers=hf["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       positions="rope", rope_theta=float(theta), norm="rmsnorm",
                       norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", use_bias=False,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_std=hf.get("initializer_range", 0.02)))
    return config


def _llama_params(weights, config, path):
    get = _getter(weights, path)
    flat = {
        ("embed", "embedding"): get("model.embed_tokens.weight"),
        ("final_norm", "scale"): get("model.norm.weight"),
    }
    if not config.tie_embeddings:
        flat[("unembed", "kernel")] = get("lm_head.weight").T
    for i in range(config.num_layers):
        h = f"model.layers.{i}."
        block = ("blocks", i)
        flat.update({
            block + ("attn", "query", "kernel"): get(h + "self_attn.q_proj.weight").T,
            block + ("attn", "key", "kernel"): get(h + "self_attn.k_proj.weight").T,
            block + ("attn", "value", "kernel"): get(h + "self_attn.v_proj.weight").T,
            block + ("attn", "out", "kernel"): get(h + "self_attn.o_proj.weight").T,
            block + ("attn_norm", "scale"): get(h + "input_layernorm.weight"),
            block + ("mlp_norm", "scale"): get(h + "post_attention_layernorm.weight"),
            block + ("mlp", "gate", "kernel"): get(h + "mlp.gate_proj.weight").T,
            block + ("mlp", "up", "kernel"): get(h + "mlp.up_proj.weight").T,
            block + ("mlp", "down", "kernel"): get(h + "mlp.down_proj.weight").T,
        })
    return flat


# ----------------------------------------------------------------------------------------------
# Assembly


def _getter(weights, path):
    def get(key):
        if key not in weights:
            raise KeyError(f"{path}: tensor {key!r} is missing from the safetensors files")
        return weights[key]

    return get


def _to_state(flat, config, path):
    """Put the arrays into the abstract param tree of init_params(config), checking shapes.

    `flat` maps per-layer keys ('blocks', i, ...) as the checkpoint stores them; our block params
    are stacked on a leading layer axis ('blocks', ...) [L, ...], so layer i goes to index i.
    """
    _, abstract = model.abstract_params(config, "lm")
    leaves = []
    for key, variable in nnx.to_flat_state(abstract):
        name = "/".join(map(str, key))
        if key[0] == "blocks":
            layer_keys = [key[:1] + (i,) + key[1:] for i in range(config.num_layers)]
            missing = [k for k in layer_keys if k not in flat]
            if missing:
                raise KeyError(f"{path}: no tensor was mapped to param {'/'.join(map(str, missing[0]))}")
            value = np.stack([np.asarray(flat.pop(k), dtype=np.float32) for k in layer_keys])
        elif key not in flat:
            raise KeyError(f"{path}: no tensor was mapped to param {name}")
        else:
            value = np.asarray(flat.pop(key), dtype=np.float32)
        value = np.ascontiguousarray(value)
        if value.shape != variable.shape:
            raise ValueError(f"{path}: param {name} has shape {value.shape}, the model expects {variable.shape}")
        leaves.append((key, variable.replace(jnp.asarray(value))))
    if flat:
        raise ValueError(f"{path}: tensors mapped to unknown params {sorted(flat)}")
    return nnx.from_flat_state(leaves)
