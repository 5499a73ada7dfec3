"""Benchmark: S PPO seeds vmapped in one jitted program against the same S seeds one after another.

    python experiments/bench_ppo_seeds.py [--seeds 4] [--iterations 5] [--warmup 2] [--prompts 16]
                                          [--prompt_length 32] [--response_length 48] [--no_record]

Setting (the one bench_ppo.py uses for the TRL comparison, at loss 'ppo'): configs/models.tiny()
(d_model 128, 2 layers), random init, `--prompts` prompts of `--prompt_length` bytes, one
response each of up to `--response_length` tokens, temperature 1, k1 KL at beta 0.05 against the
frozen reference, a value head on the policy, 1 epoch x 1 minibatch, Adam; reward: the fraction
of 'e' in the decoded response (a Python function on the host).

    vmapped     `ppo.ppo_step` of a config with num_seeds=S: one rollout and one update program
                over state leaves [S, ...]; the host reward sees S x prompts responses at once
    sequential  `ppo.ppo_step` of the same config with num_seeds=1, called once for each of S
                states (seeds seed ... seed+S-1), i.e. what S separate runs cost per iteration,
                without the S-1 extra compilations separate runs also pay (reported apart)

Per iteration (after `--warmup` iterations), wall-clock with block_until_ready; median and best
of `--iterations`. The ratio is sequential / vmapped (> 1: vmap is faster). Results are printed
and appended to experiments/results/bench_ppo_seeds.jsonl with the machine and date.
"""

import argparse
import tempfile
import time

import bench_ppo
import jax
import numpy as np

from rlhf_jax.runtime import benchmarking, run as run_lib
from rlhf_jax.stages import ppo


def timed(fn, n):
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--response_length", type=int, default=48)
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args()
    s = args.seeds
    texts = bench_ppo.make_prompts(args.prompts, args.prompt_length)
    result = {"model": "tiny", "loss": "ppo", "seeds": s, "prompts": args.prompts,
              "prompt_length": args.prompt_length, "response_length": args.response_length,
              "iterations": args.iterations, "warmup": args.warmup, "devices": jax.device_count()}

    with tempfile.TemporaryDirectory() as tmp:
        config = bench_ppo.ours_config("ppo", args, tmp)
        config.ppo_epochs, config.num_minibatches = 1, 1
        config.prompts = tuple(texts)  # one batch holds every prompt (batch_size = --prompts)
        result["params"] = bench_ppo.make_sft_run(tmp, config.model)

        # Sequential: one compiled step, S states. The prompt batch is placed once, outside the timing.
        setup = ppo.build(config)
        states = [setup.state]
        for i in range(1, s):
            seed_config = config.copy_and_resolve_references()
            seed_config.seed = config.seed + i
            states.append(ppo.build(seed_config).state)
        batch = setup.batch_fn(0)

        def sequential(i):
            out = []
            for j in range(s):
                step_rng = run_lib.step_rng(jax.random.key(config.seed + j), i)
                states[j], metrics, _ = ppo.ppo_step(setup, states[j], {**batch, "step": i}, step_rng)
                out.append(metrics)
            return states, out

        first_seq = timed(sequential, 1)[0]
        seq = timed(sequential, args.warmup + args.iterations)[args.warmup:]

        # Vmapped: one compiled step over [S, ...] states.
        config.num_seeds = s
        setup = ppo.build(config)
        batch = setup.batch_fn(0)
        holder = [setup.state]

        def vmapped(i):
            holder[0], metrics, _ = ppo.ppo_step(setup, holder[0], {**batch, "step": i}, run_lib.step_rng(setup.rng, i))
            return holder[0], metrics

        first_vmap = timed(vmapped, 1)[0]
        vm = timed(vmapped, args.warmup + args.iterations)[args.warmup:]

    result["sequential"] = bench_ppo.summarise(seq) | {"first_iteration_s": first_seq}
    result["vmapped"] = bench_ppo.summarise(vm) | {"first_iteration_s": first_vmap}
    ratio = float(np.median(seq) / np.median(vm))
    result["speedup_vmapped_over_sequential"] = ratio
    print(f"{s} seeds, one PPO iteration each: sequential {np.median(seq):.3f} s (median; best {min(seq):.3f}), "
          f"vmapped {np.median(vm):.3f} s (best {min(vm):.3f}) -> vmapped is {ratio:.2f}x faster; "
          f"first iteration (compile) sequential {first_seq:.1f} s for one program "
          f"(separate runs compile it {s} times), vmapped {first_vmap:.1f} s", flush=True)
    if not args.no_record:
        print("written to", benchmarking.record_result("bench_ppo_seeds", result))


if __name__ == "__main__":
    main()
