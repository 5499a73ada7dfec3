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

    python experiments/bench_memory.py --lm_loss [--size llama_tiny] [--vocab 151936] [--batch 4] [--seq 512]

instead compiles (never runs) the gradient of the LM loss twice and reports XLA's temp memory
(`memory_analysis().temp_size_in_bytes`): the old path, [B, T, V] float32 logits and
losses.next_token_loss, against the stage's own loss (pretrain.language_model_loss: lm_head in
chunks of model.logits_chunk tokens), and their ratio. The goal of issue 20: at V = 151,936,
4 x 512 tokens, the llama_tiny trunk, at most 0.2x of the full logits' temp memory.
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


def lm_loss_temp_bytes(size: str, vocab: int, batch: int, seq: int, chunk: int) -> dict:
    """Temp bytes of the compiled LM-loss gradient, full logits against lm_head's chunks."""
    import jax
    import jax.numpy as jnp

    from configs import models
    from rlhf_jax import losses
    from rlhf_jax.models import model as model_lib
    from rlhf_jax.stages import pretrain

    model = getattr(models, size)()
    model.vocab_size, model.max_len = vocab, max(model.max_len, seq)
    if chunk >= 0:
        model.logits_chunk = chunk
    graphdef, params = model_lib.abstract_params(model)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def full_logits_loss(params, graphdef, batch):
        outputs, _ = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["attention_mask"])
        return losses.next_token_loss(outputs["logits"], batch["tokens"], batch["loss_mask"])

    def temp_bytes(loss_fn):
        def grad(params, tokens):
            ones = jnp.ones_like(tokens)
            batch = {"tokens": tokens, "positions": model_lib.positions_from_mask(ones), "attention_mask": ones,
                     "loss_mask": ones}
            return jax.grad(lambda p: loss_fn(p, graphdef, batch)[0])(params)
        return int(jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes)

    full, chunked = temp_bytes(full_logits_loss), temp_bytes(pretrain.language_model_loss)
    return {"case": "lm_loss_grad_temp", "size": size, "vocab_size": vocab, "batch": batch, "seq_len": seq,
            "logits_chunk": int(model.logits_chunk), "backend": jax.default_backend(),
            "full_logits_temp_bytes": full, "chunked_temp_bytes": chunked, "chunked_over_full": chunked / full}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default=None, help="gpt2_124m (llama_tiny with --lm_loss)")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--ranks", default="0,8")
    parser.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--lm_loss", action="store_true", help="the LM loss's gradient: full logits vs chunks")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=-1, help="model.logits_chunk (-1: the preset's)")
    args = parser.parse_args()
    if args.lm_loss:
        from rlhf_jax.runtime import benchmarking

        result = lm_loss_temp_bytes(args.size or "llama_tiny", args.vocab, args.batch, args.seq, args.chunk)
        for key in ("full_logits_temp_bytes", "chunked_temp_bytes"):
            print(f"{key:32s} {result[key] / 2**20:10.1f} MiB")
        print(f"{'chunked_over_full':32s} {result['chunked_over_full']:10.3f}")
        print("written to", benchmarking.record_result("bench_memory", result))
        return
    args.size = args.size or "gpt2_124m"
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
