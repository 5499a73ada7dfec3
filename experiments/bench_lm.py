"""Benchmark: language-model training and sampling, ours against PyTorch `transformers`, same run.

    python experiments/bench_lm.py [--size tiny|small|gpt2_124m] [--batch 16] [--seq 256]
                                   [--new_tokens 64] [--prompt 32] [--dtype float32|bfloat16]
                                   [--layers 2,12,24] [--attention_impl einsum|xla|cudnn]

With --layers, the size's width at each depth (e.g. GPT-2 124M width with 2, 12 and 24 layers),
one result line each, with the compile time of the train step and of the sampler (first call
minus a steady call): layers are one scanned block, so compile time should stay flat in depth.

Training: tokens/s of our jitted AdamW step (`optim.make_train_step`) and of a
`transformers.GPT2LMHeadModel` of the same size with `torch.optim.AdamW` (forward, backward,
step), on the same batch shape; our achieved FLOP/s (`model.flops_per_token`) as a fraction of
the machine's measured matmul peak (the best of a few large `jnp.dot`s).
Sampling: new tokens/s of our `sampling.generate` (KV cache, one jitted program) and of
`transformers` `generate` (KV cache, multinomial sampling), same model size, batch, prompt and
response lengths, both forced to produce every token (no EOS stop).
Needs the optional reference stack: pip install -e '.[torch]'. Results are printed and appended
to experiments/results/bench_lm.jsonl with the machine and date.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mesh as mesh_configs, models, optimizers
from rlhf_jax.models import model as model_lib, sampling
from rlhf_jax.runtime import benchmarking, mesh as mesh_lib
from rlhf_jax.runtime.optim import make_optimizer, make_train_step
from rlhf_jax.stages import pretrain


def ours_train(config, batch, seq, steps):
    mesh = mesh_lib.make_mesh(mesh_configs.data_parallel())
    graphdef, params = model_lib.init_params(config)
    optimizer = make_optimizer(optimizers.adamw(3e-4))
    state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
    step = make_train_step(lambda p, b: pretrain.language_model_loss(p, graphdef, b), optimizer, mesh,
                                    shardings)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq)).astype(np.int32)
    data = mesh_lib.shard_batch(dict(tokens=tokens, positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                                     attention_mask=np.ones_like(tokens), loss_mask=np.ones_like(tokens)), mesh)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, data, jax.random.key(0)))  # compiles; the state is donated
    first_call = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        s = holder["state"]
        for i in range(steps):
            s, m = step(s, data, jax.random.key(i))
        jax.block_until_ready(m["loss"])
        holder["state"] = s

    seconds = benchmarking.best_time(run, repeats=3, warmup=0)
    return batch * seq * steps / seconds, first_call - seconds / steps


def torch_model(config, torch_dtype):
    import torch
    import transformers

    hf = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_len, n_embd=config.d_model,
                                 n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.d_ff,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return transformers.GPT2LMHeadModel(hf).to(device=device, dtype=torch_dtype), device


def torch_train(config, batch, seq, steps, torch_dtype):
    import torch

    model, device = torch_model(config, torch_dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = torch.randint(0, 256, (batch, seq), device=device)

    def run():
        for _ in range(steps):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = benchmarking.best_time(run, repeats=3)
    return batch * seq * steps / seconds


def ours_sample(config, batch, prompt_len, new_tokens):
    graphdef, params = model_lib.init_params(config)
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones_like(prompts)

    def run():  # eos_id outside the vocabulary: every row produces all new_tokens.
        out = sampling.generate(graphdef, params, prompts, mask, jax.random.key(0), max_new_tokens=new_tokens,
                                eos_id=config.vocab_size + 1, pad_id=256, temperature=1.0)
        jax.block_until_ready(out["response"])

    t0 = time.perf_counter()
    run()
    first_call = time.perf_counter() - t0
    seconds = benchmarking.best_time(run, repeats=3, warmup=0)
    return batch * new_tokens / seconds, first_call - seconds


def torch_sample(config, batch, prompt_len, new_tokens, torch_dtype):
    import torch

    model, device = torch_model(config, torch_dtype)
    model.eval()
    prompts = torch.randint(0, 256, (batch, prompt_len), device=device)

    def run():
        with torch.no_grad():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=256,
                           eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()

    return batch * new_tokens / benchmarking.best_time(run, repeats=3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", default="", help="comma-separated depths at the size's width")
    parser.add_argument("--attention_impl", default="einsum")
    parser.add_argument("--no_torch", action="store_true")
    args = parser.parse_args()
    peak = benchmarking.matmul_peak_flops(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    for layers in [int(n) for n in args.layers.split(",")] if args.layers else [None]:
        config = getattr(models, args.size)()
        config.dtype, config.attention_impl = args.dtype, args.attention_impl
        config.num_layers = layers or config.num_layers
        config.max_len = max(config.max_len, args.seq, args.prompt + args.new_tokens)
        benchmark(config, args, peak)


def benchmark(config, args, peak):
    result = {"size": args.size, "layers": config.num_layers, "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "attention_impl": config.attention_impl,
              "params": model_lib.count_params(model_lib.abstract_params(config)[1])}
    result["ours_train_tokens_per_s"], result["ours_train_compile_s"] = ours_train(config, args.batch, args.seq,
                                                                                   args.steps)
    result["matmul_peak_flops"] = peak
    result["ours_flops_fraction_of_peak"] = result["ours_train_tokens_per_s"] * model_lib.flops_per_token(config, args.seq) / peak
    result["ours_sample_tokens_per_s"], result["ours_sample_compile_s"] = ours_sample(config, args.batch, args.prompt,
                                                                                      args.new_tokens)
    try:
        if args.no_torch:
            raise ImportError
        import torch
    except ImportError:
        print("no PyTorch comparison (--no_torch, or torch not installed: pip install -e '.[torch]')")
    else:
        torch.manual_seed(0)
        torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        result["torch_threads"] = torch.get_num_threads()
        result["torch_train_tokens_per_s"] = torch_train(config, args.batch, args.seq, args.steps, torch_dtype)
        result["torch_sample_tokens_per_s"] = torch_sample(config, args.batch, args.prompt, args.new_tokens, torch_dtype)
        result["train_ratio_ours_over_torch"] = result["ours_train_tokens_per_s"] / result["torch_train_tokens_per_s"]
        result["sample_ratio_ours_over_torch"] = result["ours_sample_tokens_per_s"] / result["torch_sample_tokens_per_s"]
    for k, v in result.items():
        print(f"{k:32s} {v:,.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print("written to", benchmarking.record_result("bench_lm", result), flush=True)


if __name__ == "__main__":
    main()
