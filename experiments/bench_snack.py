"""Benchmark: the vmapped, jitted snack-place learner against NumPy, same machine, same run.

    python experiments/bench_snack.py [--seeds 1024] [--steps 2000]

Both run the identical algorithm (bias only, weight 20, SGD at learning rate 1): ours is
`snack.train_steps` (vmap over seeds, lax.scan over steps, one jitted program); the baselines are
`snack.numpy_reference_train` (NumPy vectorised over seeds, a loop over steps) and a plain
Python loop over seeds and steps (the articles' arithmetic written literally, fewer steps).
Prints learner-updates per second and the ratios; appends them to
experiments/results/bench_snack.jsonl with the machine and date.
"""

import argparse
import math
import random
import time

import jax

from rlhf_jax.runtime import benchmarking, config as config_lib
from rlhf_jax.stages import snack


def python_loop_train(num_runs, num_steps, weight=20.0, learning_rate=1.0, seed=0):
    rng = random.Random(seed)
    biases = [0.0] * num_runs
    for _ in range(num_steps):
        for i in range(num_runs):
            hunger, u = rng.random(), rng.random()
            p = 1.0 / (1.0 + math.exp(-(weight * hunger + biases[i])))
            chose_b = u >= 1.0 - p
            reward = 1.0 if chose_b == (hunger > 0.5) else -1.0
            derivative = -(1.0 - p) if chose_b else p
            biases[i] -= learning_rate * derivative * reward
    return biases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    config = config_lib.load_config("experiments/snack_bandit.py", [("num_seeds", str(args.seeds)),
                                                                    ("mesh.data", "1")])
    learners = snack.init_learners(config)
    run_steps = jax.jit(lambda l, k: snack.train_steps(l, k, args.steps, config.optimizer))
    key = jax.random.key(0)
    ours = benchmarking.best_time(lambda: jax.block_until_ready(run_steps(learners, key)))
    numpy_time = benchmarking.best_time(lambda: snack.numpy_reference_train(args.seeds, args.steps), repeats=3)
    loop_steps = max(args.steps // 100, 1)
    t0 = time.perf_counter()
    python_loop_train(args.seeds, loop_steps)
    loop_time = (time.perf_counter() - t0) * args.steps / loop_steps

    updates = args.seeds * args.steps
    result = {
        "seeds": args.seeds, "steps": args.steps,
        "jax_updates_per_s": updates / ours,
        "numpy_updates_per_s": updates / numpy_time,
        "python_loop_updates_per_s": updates / loop_time,
        "ratio_jax_over_numpy": numpy_time / ours,
        "ratio_jax_over_python_loop": loop_time / ours,
    }
    for k, v in result.items():
        print(f"{k:28s} {v:,.1f}" if isinstance(v, float) else f"{k:28s} {v}")
    print("written to", benchmarking.record_result("bench_snack", result))


if __name__ == "__main__":
    main()
