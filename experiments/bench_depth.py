"""Benchmark: compile time and speed against depth, scanned layers (this checkout) against the
unrolled layers of an older checkout, same run.

    git worktree add /tmp/unrolled 346bc22          # the last commit with one Block per layer
    python experiments/bench_depth.py --other=/tmp/unrolled [--layers 2,12,24] [--batch 2 --seq 128]

At the width of `--size` (default GPT-2 124M: d768, 12 heads, vocab 50304) and each depth, in a
fresh process per (checkout, depth): compile time of the jitted AdamW train step and of the
sampler (first call minus a steady call), train tokens/s (best of 3), sampled tokens/s (prompt
32, 32 new tokens). Appends one line to experiments/results/bench_depth.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def measure(size, layers, batch, seq, new_tokens):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import mesh as mesh_configs, models, optimizers
    from rlhf_jax.models import model as model_lib, sampling
    from rlhf_jax.runtime import mesh as mesh_lib
    from rlhf_jax.runtime.optim import make_optimizer, make_train_step
    from rlhf_jax.stages import pretrain

    config = getattr(models, size)()
    config.num_layers = layers
    mesh = mesh_lib.make_mesh(mesh_configs.data_parallel())
    graphdef, params = model_lib.init_params(config)
    optimizer = make_optimizer(optimizers.adamw(3e-4))
    state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
    step = make_train_step(lambda p, b: pretrain.language_model_loss(p, graphdef, b), optimizer, mesh, shardings)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq)).astype(np.int32)
    data = mesh_lib.shard_batch(dict(tokens=tokens, positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                                     attention_mask=np.ones_like(tokens), loss_mask=np.ones_like(tokens)), mesh)

    def timed(fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return out, time.perf_counter() - t0

    (state, _), first = timed(lambda: step(state, data, jax.random.key(0)))
    steady = []
    for i in range(3):
        (state, _), t = timed(lambda: step(state, data, jax.random.key(i)))
        steady.append(t)
    prompts = jnp.asarray(tokens[:, :32])
    gen = lambda: sampling.generate(graphdef, state["params"], prompts, jnp.ones_like(prompts), jax.random.key(0),
                                    max_new_tokens=new_tokens, eos_id=config.vocab_size + 1, pad_id=256)["response"]
    _, gen_first = timed(gen)
    gen_steady = min(timed(gen)[1] for _ in range(2))
    return {"layers": layers, "train_compile_s": first - min(steady), "train_tokens_per_s": batch * seq / min(steady),
            "sample_compile_s": gen_first - gen_steady, "sample_tokens_per_s": batch * new_tokens / gen_steady}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", default="", help="an older checkout to compare with (its rlhf_jax is imported)")
    parser.add_argument("--size", default="gpt2_124m")
    parser.add_argument("--layers", default="2,12,24")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, args.child, args.batch, args.seq, args.new_tokens)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkouts = {"scanned (this checkout)": here}
    if args.other:
        checkouts[f"unrolled ({args.other})"] = os.path.abspath(args.other)
    result = {"size": args.size, "batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens}
    for name, path in checkouts.items():
        rows = []
        for layers in [int(n) for n in args.layers.split(",")]:
            env = dict(os.environ, PYTHONPATH=path)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={layers}", f"--size={args.size}",
                                  f"--batch={args.batch}", f"--seq={args.seq}", f"--new_tokens={args.new_tokens}"],
                                 env=env, cwd=path, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(name, rows[-1], flush=True)
        result[name] = rows
    sys.path.insert(0, here)
    from rlhf_jax.runtime import benchmarking

    print("written to", benchmarking.record_result("bench_depth", result))


if __name__ == "__main__":
    main()
