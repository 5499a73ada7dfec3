"""Benchmark: one tiny-model SFT train step at a trimmed width against the full seq_len, same run.

    python experiments/bench_padding.py [--batch 32] [--seq_len 256] [--widths 192,128]

What `pad_to_multiple` buys (rlhf_jax/data/loaders.py): a batch whose longest row is shorter than
seq_len runs at the bucketed width instead. Times the jitted loss-gradient + Adam step of
`configs/models.tiny()` (median of 10 calls after compiling) at seq_len and at each width, and
reports each width's time as a ratio of seq_len's. Appends to experiments/results/bench_padding.jsonl.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import models
from rlhf_jax.models import model as model_lib
from rlhf_jax.runtime import benchmarking
from rlhf_jax.stages import pretrain


def step_time(graphdef, params, optimizer, batch_size: int, width: int) -> float:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch_size, width)), jnp.int32)
    ones = jnp.ones((batch_size, width), jnp.int32)
    batch = dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(width), (batch_size, width)),
                 attention_mask=ones, loss_mask=ones)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(pretrain.language_model_loss, has_aux=True)(params, graphdef, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    jax.block_until_ready(step(params, opt_state, batch))  # compile
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, opt_state, batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--widths", default="192,128")
    args = parser.parse_args()
    config = models.tiny()
    config.max_len = args.seq_len
    graphdef, params = model_lib.init_params(config)
    optimizer = optax.adam(1e-3)
    full = step_time(graphdef, params, optimizer, args.batch, args.seq_len)
    result = {"model": "tiny", "batch": args.batch, "seq_len": args.seq_len, "seq_len_step_s": full}  # (+ date, machine)
    print(f"T={args.seq_len}: {full * 1000:.0f} ms/step")
    for width in map(int, args.widths.split(",")):
        t = step_time(graphdef, params, optimizer, args.batch, width)
        result[f"width_{width}_step_s"], result[f"width_{width}_ratio"] = t, t / full
        print(f"T={width}: {t * 1000:.0f} ms/step = {t / full:.2f}x of T={args.seq_len}")
    print("written to", benchmarking.record_result("bench_padding", result))


if __name__ == "__main__":
    main()
