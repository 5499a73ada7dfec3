"""Write a policy back out as a Hugging Face checkpoint (GPT-2, Llama, Qwen2 or Qwen3 layout), the
inverse of `hf_import`:

    files = export_hf(model_config, params, "/tmp/out", tokenizer_path=None)
    # /tmp/out/config.json + model.safetensors: transformers.AutoModelForCausalLM.from_pretrained

The layout follows the model: learned positions + LayerNorm + GELU + biases + tied embeddings is
GPT-2 (`GPT2LMHeadModel`, byte-vocabulary models included, with their own vocab_size); RoPE +
RMSNorm + SwiGLU without biases is the Llama family: `Qwen3ForCausalLM` with qk_norm,
`Qwen2ForCausalLM` with qkv_bias, `LlamaForCausalLM` otherwise (GQA, untied unembedding, head_dim
and the 'llama3' RoPE scaling in all three; the scaling is written as published checkpoints
write it: `rope_scaling` with `rope_theta` beside it, which transformers 4 and 5 both read).
Any other mix has no Hugging Face counterpart here and is refused, naming the field.
Value and scalar heads are not exported (a policy is its language model). Weights are float32.
When the run used an HF tokenizer (`tokenizer.kind='hf'`), its files are copied beside the
weights so the folder loads with `AutoTokenizer` too.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from rlhf_jax.models import model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def hf_architecture(config) -> str:
    """'gpt2', 'llama', 'qwen2' or 'qwen3' for a model config; ValueError naming the fields that fit none."""
    gpt2 = dict(positions="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
    llama = dict(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)
    qkv_bias, qk_norm = model.config_field(config, "qkv_bias"), model.config_field(config, "qk_norm")
    if all(config[k] == v for k, v in gpt2.items()):
        if config.num_kv_heads != config.num_heads:
            raise ValueError(f"num_kv_heads={config.num_kv_heads} != num_heads={config.num_heads}: GPT-2 has no "
                             "grouped-query attention, so this model has no Hugging Face layout")
        if model.head_dim(config) * config.num_heads != config.d_model:
            raise ValueError(f"head_dim={config.head_dim}: GPT-2's heads are d_model / num_heads wide, so this "
                             "model has no Hugging Face layout")
        return "gpt2"
    if all(config[k] == v for k, v in llama.items()):
        if qkv_bias and qk_norm:
            raise ValueError("qkv_bias=True with qk_norm=True: Qwen2 has no q/k norms and Qwen3 no q/k/v-only "
                             "biases, so this model has no Hugging Face layout")
        return "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"
    fields = {k: config[k] for k in gpt2}
    raise ValueError(f"model {fields} is neither GPT-2 ({gpt2}) nor Llama ({llama}): no Hugging Face layout")


def export_hf(config, params, out_dir: str, tokenizer_path: str | None = None) -> list[str]:
    """Write config.json + model.safetensors (+ tokenizer files) into `out_dir`; returns the paths.

    config: the model config; params: the policy's params (`init_params` structure, layers stacked,
    any head: only the language model is written)."""
    arch = hf_architecture(config)
    flat = {tuple(path): np.asarray(leaf[...], np.float32) for path, leaf in nnx.to_flat_state(params)}
    tensors, hf_config = (_gpt2(flat, config) if arch == "gpt2" else _llama(flat, config, arch))
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors")]
    with open(written[0], "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, written[1], metadata={"format": "pt"})
    if tokenizer_path:
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_path, name)):
                written.append(shutil.copy(os.path.join(tokenizer_path, name), out_dir))
    return written


def _layers(flat, config):
    """Per-layer views of the stacked block params: [{('attn', 'query', 'kernel'): [...], ...}] * L."""
    blocks = {path[1:]: value for path, value in flat.items() if path[0] == "blocks"}
    return [{path: value[i] for path, value in blocks.items()} for i in range(config.num_layers)]


def _gpt2(flat, config):
    tensors = {
        "transformer.wte.weight": flat[("embed", "embedding")],
        "transformer.wpe.weight": flat[("position_embed", "embedding")],
        "transformer.ln_f.weight": flat[("final_norm", "scale")],
        "transformer.ln_f.bias": flat[("final_norm", "bias")],
        "lm_head.weight": flat[("embed", "embedding")],  # tied; written so every loader finds it
    }
    for i, layer in enumerate(_layers(flat, config)):
        h = f"transformer.h.{i}."
        qkv = [("attn", name) for name in ("query", "key", "value")]
        tensors.update({
            h + "attn.c_attn.weight": np.concatenate([layer[p + ("kernel",)] for p in qkv], axis=1),  # [d, 3d]
            h + "attn.c_attn.bias": np.concatenate([layer[p + ("bias",)] for p in qkv]),
            h + "attn.c_proj.weight": layer[("attn", "out", "kernel")],
            h + "attn.c_proj.bias": layer[("attn", "out", "bias")],
            h + "ln_1.weight": layer[("attn_norm", "scale")],
            h + "ln_1.bias": layer[("attn_norm", "bias")],
            h + "ln_2.weight": layer[("mlp_norm", "scale")],
            h + "ln_2.bias": layer[("mlp_norm", "bias")],
            h + "mlp.c_fc.weight": layer[("mlp", "up", "kernel")],
            h + "mlp.c_fc.bias": layer[("mlp", "up", "bias")],
            h + "mlp.c_proj.weight": layer[("mlp", "down", "kernel")],
            h + "mlp.c_proj.bias": layer[("mlp", "down", "bias")],
        })
    hf_config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
        n_positions=config.max_len, n_ctx=config.max_len, n_embd=config.d_model, n_layer=config.num_layers,
        n_head=config.num_heads, n_inner=config.d_ff, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, scale_attn_weights=True, tie_word_embeddings=True, torch_dtype="float32")
    return tensors, hf_config


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _llama(flat, config, arch):
    """Llama, Qwen2 (+ q/k/v biases) and Qwen3 (+ q/k norms) share every other tensor name."""
    tensors = {
        "model.embed_tokens.weight": flat[("embed", "embedding")],
        "model.norm.weight": flat[("final_norm", "scale")],
    }
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = flat[("unembed", "kernel")].T
    names = {("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
             ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.o_proj",
             ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj", ("mlp", "down"): "mlp.down_proj"}
    for i, layer in enumerate(_layers(flat, config)):
        h = f"model.layers.{i}."
        for ours, theirs in names.items():
            tensors[h + theirs + ".weight"] = layer[ours + ("kernel",)].T  # nn.Linear stores [out, in]
        tensors[h + "input_layernorm.weight"] = layer[("attn_norm", "scale")]
        tensors[h + "post_attention_layernorm.weight"] = layer[("mlp_norm", "scale")]
        if arch == "qwen2":
            for ours in (("attn", "query"), ("attn", "key"), ("attn", "value")):
                tensors[h + names[ours] + ".bias"] = layer[ours + ("bias",)]
        if arch == "qwen3":
            tensors[h + "self_attn.q_norm.weight"] = layer[("attn", "query_norm", "scale")]
            tensors[h + "self_attn.k_norm.weight"] = layer[("attn", "key_norm", "scale")]
    hf_config = dict(
        architectures=[ARCHITECTURES[arch]], model_type=arch, vocab_size=config.vocab_size,
        hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=model.head_dim(config), max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, hidden_act="silu",
        tie_word_embeddings=bool(config.tie_embeddings), initializer_range=config.init_std,
        torch_dtype="float32")
    if arch == "llama":
        hf_config.update(attention_bias=False, mlp_bias=False)
    else:  # every layer full attention (Qwen's sliding window is off)
        hf_config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers,
                         layer_types=["full_attention"] * config.num_layers)
    if arch == "qwen3":
        hf_config.update(attention_bias=False)  # True would put biases on o_proj as well
    if model.config_field(config, "rope_scaling") == "llama3":
        hf_config["rope_scaling"] = dict(
            rope_type="llama3", factor=model.config_field(config, "rope_factor"),
            low_freq_factor=model.config_field(config, "rope_low_freq_factor"),
            high_freq_factor=model.config_field(config, "rope_high_freq_factor"),
            original_max_position_embeddings=model.config_field(config, "rope_original_max_len"))
    return tensors, hf_config
