"""Build the tiny Hugging Face reference checkpoints used by tests/test_hf_import.py.

Needs the optional reference stack (tests do not):
    pip install torch==2.13.0 transformers
Run from the repository root:
    python scripts/make_hf_fixtures.py            # makes only the folders that are missing
    python scripts/make_hf_fixtures.py NAME ...   # (re)makes the named ones

Folders already shipped are never rewritten unless named: the tests' expected logits must not
drift with the transformers version that happens to be installed. The GPT-2 and Llama 2 fixtures
share one random stream (seed 0, in that order), each later family has its own seed.

hf_chat_tokenizer is a tokenizer only: a byte-level tokenizer.json (256 bytes + <|endoftext|>,
<|im_start|>, <|im_end|>) whose tokenizer_config.json carries a small ChatML chat template, and
expected_chat.json: transformers' apply_chat_template(add_generation_prompt=True) text and ids
for a few prompts (tests/test_tokenizer.py renders them with jinja2 and compares).

Each model folder gets config.json + model.safetensors (float32, random weights), inputs.npy [2, T]
(row 1 left-padded), attention_mask.npy [2, T] and expected_logits.npy [2, T, V]: the
transformers forward pass in float32 with position_ids = cumsum(mask) - 1 clipped at 0 (our
convention for left padding). Every parameter, norms and biases included, gets random noise,
so a swapped or transposed tensor cannot go unnoticed.
"""

import os
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
VOCAB, LENGTH, PADDING = 300, 12, 4


def perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def save(model, name):
    folder = os.path.join(ROOT, name)
    os.makedirs(folder, exist_ok=True)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.RandomState(0)
    inputs = rng.randint(0, VOCAB, size=(2, LENGTH)).astype(np.int32)
    mask = np.ones((2, LENGTH), np.int32)
    inputs[1, :PADDING], mask[1, :PADDING] = 0, 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(inputs, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long),
                       position_ids=torch.tensor(positions, dtype=torch.long)).logits
    np.save(os.path.join(folder, "inputs.npy"), inputs)
    np.save(os.path.join(folder, "attention_mask.npy"), mask)
    np.save(os.path.join(folder, "expected_logits.npy"), logits.float().numpy())
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{folder}: {sorted(os.listdir(folder))}, {size / 1e6:.2f} MB")


def gpt2_and_llama():
    """The first two fixtures, from one stream seeded 0 (as when they were first made)."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))
    perturb(gpt2)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        initializer_range=0.1, attention_bias=False, mlp_bias=False))
    perturb(llama)
    return {"hf_gpt2_tiny": gpt2, "hf_llama_tiny": llama}


def qwen2():
    """q/k/v biases (o_proj none), GQA, untied."""
    torch.manual_seed(2)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.1))
    perturb(model)  # biases start at zero: the noise makes them matter
    return model


def qwen3():
    """Per-head q/k RMSNorm, head_dim 32 with hidden 64 and 4 heads (so 128 != 64), GQA, tied."""
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, attention_bias=False,
        initializer_range=0.1))
    perturb(model)
    return model


def llama3():
    """Llama 3.1 RoPE scaling with original_max_position_embeddings=64: at head_dim 16 and theta
    10000 the wavelengths 6.3 .. 19869 fall in all three bands (kept < 16 <= smoothed <= 64 < divided)."""
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        initializer_range=0.1, attention_bias=False, mlp_bias=False))
    perturb(model)
    return model


# Whitespace and tags laid out as real templates are, so that trim_blocks and lstrip_blocks matter.
CHAT_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}
{% set messages = messages[1:] %}
{% else %}
{% set system = 'You are a helpful assistant.' %}
{% endif %}
{{ bos_token }}<|im_start|>system
{{ system }}<|im_end|>
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Conversation roles must be user or assistant') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CHAT_PROMPTS = ["Hello!", "  Two lines\nof text  ", "Çà et là: 3 × 4 = 12?", ""]


def chat_tokenizer(name):
    import json

    import tokenizers
    from tokenizers import decoders, models as tok_models, pre_tokenizers

    folder = os.path.join(ROOT, name)
    os.makedirs(folder, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(tok_models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|endoftext|>", eos_token="<|im_end|>",
                       pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE), f, indent=2)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    expected = []
    for prompt in CHAT_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        expected.append(dict(prompt=prompt, text=text, ids=ids))
    with open(os.path.join(folder, "expected_chat.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    print(f"{folder}: {sorted(os.listdir(folder))}")


def main():
    models = {**gpt2_and_llama(), "hf_qwen2_tiny": qwen2(), "hf_qwen3_tiny": qwen3(), "hf_llama3_tiny": llama3()}
    makers = {name: (lambda name, m=m: save(m, name)) for name, m in models.items()}
    makers["hf_chat_tokenizer"] = chat_tokenizer
    names = sys.argv[1:] or [n for n in makers if not os.path.exists(os.path.join(ROOT, n))]
    for name in names:
        makers[name](name)


if __name__ == "__main__":
    main()
