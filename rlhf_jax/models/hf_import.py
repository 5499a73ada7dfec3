"""Load a local Hugging Face checkpoint (GPT-2, Llama, Qwen2 or Qwen3) into our Transformer.

    config, params = load_hf_checkpoint("/path/to/gpt2")       # folder: config.json + *.safetensors
    graphdef, _ = model.abstract_params(config)                 # or: graphdef_for(config)
    outputs, _ = model.apply(graphdef, params, tokens, positions, mask)

Weights are read with `safetensors.numpy` (never pickle). The returned params have exactly the
structure of `init_params(config, head='lm')` (block params stacked on a leading layer axis); the vocabulary is the checkpoint's own (not
padded). Supported: `GPT2LMHeadModel`, and the Llama family: `LlamaForCausalLM` (Llama 2 and 3.x,
with the 'llama3' RoPE scaling), `Qwen2ForCausalLM` (q/k/v biases) and `Qwen3ForCausalLM`
(per-head q/k RMSNorm, head_dim apart from hidden_size / num_attention_heads); GQA, tied or
untied embeddings. Anything else (mixture of experts, sliding-window layers, other RoPE types,
partial rotary, attention or MLP biases elsewhere) is refused with one line naming the file and the key.

Layout notes: GPT-2 stores Conv1D weights as [in, out] (our kernel layout) with q, k, v fused in
`c_attn`; Llama, Qwen2 and Qwen3 store nn.Linear weights as [out, in] (transposed here). Llama's q/k projections
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
    else:  # llama, qwen2, qwen3: one layout, told apart by the config's qkv_bias and qk_norm
        config = _llama_config(hf_config, arch, path)
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


ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}


def _architecture(hf_config, path):
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and model_type in ARCHITECTURES.values():
        return model_type
    raise NotImplementedError(f"{path}/config.json: architectures={archs} model_type={model_type!r} is not "
                              f"supported ({', '.join(ARCHITECTURES)})")


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


# Keys whose presence alone means a model we do not build (mixture of experts).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _llama_config(hf, arch, path):
    """Llama, Qwen2 and Qwen3 share one layer layout; they differ in biases, q/k norms, head_dim."""
    for key in _MOE_KEYS:
        if hf.get(key):
            raise NotImplementedError(f"{path}/config.json: {key}={hf[key]!r}: mixture-of-experts layers are "
                                      "not supported")
    if hf.get("use_sliding_window"):
        raise NotImplementedError(f"{path}/config.json: use_sliding_window={hf['use_sliding_window']!r}: "
                                  "sliding-window attention is not supported")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise NotImplementedError(f"{path}/config.json: layer_types={sorted(layer_types)}: only 'full_attention' "
                                  "layers are supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{path}/config.json: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    # Qwen2 has q/k/v biases whatever its config says; Llama and Qwen3's attention_bias puts one on
    # o_proj as well, which our model does not have.
    if arch != "qwen2" and hf.get("attention_bias", False):
        raise NotImplementedError(f"{path}/config.json: attention_bias={hf['attention_bias']!r} is not supported "
                                  f"for {arch} (biases on q, k, v and o)")
    if hf.get("mlp_bias", False):
        raise NotImplementedError(f"{path}/config.json: mlp_bias={hf['mlp_bias']!r} is not supported")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    width = hf.get("head_dim") or d // heads
    config = presets.llama_tiny()
    config.update(dict(vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", 2048), d_model=d,
                       num_layers=hf["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       head_dim=0 if width * heads == d else width,  # 0: the usual d / heads
                       positions="rope", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                       use_bias=False, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_std=hf.get("initializer_range", 0.02)))
    config.update(_rope_fields(hf, path))
    return config


def _rope_fields(hf, path):
    """rope_theta and the 'llama3' scaling, from `rope_scaling` (published checkpoints, rope_theta
    beside it) or `rope_parameters` (transformers >= 5, rope_theta inside it)."""
    sources = {key: hf[key] for key in ("rope_parameters", "rope_scaling") if hf.get(key)}
    types = {key: rope.get("rope_type", rope.get("type", "default")) for key, rope in sources.items()}
    for key, rope_type in types.items():
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"{path}/config.json: {key}.rope_type={rope_type!r} is not supported "
                                      "('default', 'llama3')")
    if len(set(types.values())) > 1:
        raise NotImplementedError(f"{path}/config.json: rope_parameters and rope_scaling disagree on rope_type {types}")
    rope = {**sources.get("rope_scaling", {}), **sources.get("rope_parameters", {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    where = "rope_parameters" if "rope_parameters" in sources else "rope_scaling"
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise NotImplementedError(f"{path}/config.json: partial_rotary_factor={partial!r} is not supported (1.0)")
    fields = dict(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise KeyError(f"{path}/config.json: {where}.{key} is missing (needed by rope_type 'llama3')")
        # transformers falls back to max_position_embeddings when this is absent
        original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        fields.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]), rope_original_max_len=int(original))
    return fields


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
        if config.qkv_bias:  # Qwen2
            for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                flat[block + ("attn", ours, "bias")] = get(h + f"self_attn.{theirs}.bias")
        if config.qk_norm:  # Qwen3
            flat[block + ("attn", "query_norm", "scale")] = get(h + "self_attn.q_norm.weight")
            flat[block + ("attn", "key_norm", "scale")] = get(h + "self_attn.k_norm.weight")
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
