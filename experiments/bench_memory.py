"""Benchmark: memory a PPO run holds, full fine-tuning against LoRA, at a given model size.

    python experiments/bench_memory.py [--size gpt2_124m] [--layers 12] [--ranks 0,8]

For each LoRA rank (0 = full fine-tuning) a fresh process builds the PPO run exactly as the stage
does (`ppo.build`: policy from a saved random 'SFT run', value head on the policy, the frozen
reference) and runs one iteration (2 prompts x 2 samples, 16 new tokens), then reports:

    state_bytes    the train state (trainable params + Adam moments + value head): what is updated
    frozen_bytes   the frozen reference (with LoRA: the base the adapters are added to)
    held_bytes     both: every array the run keeps between iterations
    peak_rss       the process's peak resident memory (ru_maxrss), activations and XLA included

A reward *model* would add one more full copy of the weights to both sides (its own params); this
benchmark uses a reward function, and also prints held_bytes + one param copy for that case.
Appends to experiments/results/bench_memory.jsonl with the machine and date.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def measure(size: str, layers: int, rank: int) -> dict:
    import jax
    import numpy as np

    from configs import lora as lora_configs, models, optimizers, ppo as ppo_configs
    from rlhf_jax.models import model as model_lib
    from rlhf_jax.stages import ppo, pretrain

    model = getattr(models, size)()
    model.num_layers = layers or model.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        pretrain.save_random_run(os.path.join(tmp, "sft"), model)
        c = ppo_configs.trl(num_steps=1)
        c.model = model
        c.init_from = os.path.join(tmp, "sft")
        c.reward_function = "rlhf_jax.people.labelers:vader_gold_score"
        c.gold_function = ""
        c.prompts = ("The food was", "The room was")
        c.batch_size, c.samples_per_prompt = 2, 2
        c.max_prompt_len, c.max_new_tokens = 8, 16
        c.value_model = "policy"
        c.optimizer = optimizers.adam(1e-5)
        c.lora = lora_configs.rank(rank) if rank else lora_configs.off()
        setup = ppo.build(c)
        nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
        state_bytes, frozen_bytes = nbytes(setup.state), nbytes(setup.frozen)
        state, metrics, _ = ppo.ppo_step(setup, setup.state, setup.batch_fn(0), jax.random.key(0))
        jax.block_until_ready((state, metrics))
        param_bytes = 4 * model_lib.count_params(model_lib.abstract_params(model)[1])
    return {"size": size, "layers": model.num_layers, "lora_rank": rank, "param_bytes": param_bytes,
            "state_bytes": state_bytes, "frozen_bytes": frozen_bytes, "held_bytes": state_bytes + frozen_bytes,
            "held_bytes_with_reward_model": state_bytes + frozen_bytes + param_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="gpt2_124m")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--ranks", default="0,8")
    parser.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child >= 0:
        print(json.dumps(measure(args.size, args.layers, args.child)))
        return
    from rlhf_jax.runtime import benchmarking

    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        out = subprocess.run([sys.executable, __file__, f"--size={args.size}", f"--layers={args.layers}",
                              f"--child={rank}"], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    full = next((r for r in rows if r["lora_rank"] == 0), None)
    result = {"rows": rows}
    if full:
        for r in rows:
            if r["lora_rank"]:
                for key in ("held_bytes", "held_bytes_with_reward_model", "peak_rss_bytes", "state_bytes"):
                    result[f"rank{r['lora_rank']}_{key}_over_full"] = r[key] / full[key]
    for k, v in result.items():
        if k != "rows":
            print(f"{k:48s} {v:.3f}")
    print("written to", benchmarking.record_result("bench_memory", result))


if __name__ == "__main__":
    main()
