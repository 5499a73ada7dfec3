"""bfloat16 against float32, end to end: every stage of the review pipeline (pre-training, SFT,
reward model, PPO, and DPO from the same SFT run) trained twice from the same seeds, once with
`model.dtype='float32'` and once with `model.dtype='bfloat16'` (params and Adam stay float32;
matmuls, activations and the KV cache in bf16, logits and losses in float32).

    python experiments/bf16_parity.py [--workdir runs/bf16_parity] [--scale 1.0]

Prints, per stage, the last logged value of the metrics that say whether it learned, in both
dtypes, and their difference; appends them to experiments/results/bf16_parity.jsonl with the
machine and date. The two runs see the same data in the same order, but bf16 rounding changes
every step a little, so the runs drift apart: what is compared is the end result, against the
tolerance stated in TOLERANCES (absolute, on the metric's own scale).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rlhf_jax.drivers import pipeline  # noqa: E402
from rlhf_jax.runtime import benchmarking, metrics as metrics_lib  # noqa: E402

PIPELINE = os.path.join(ROOT, "experiments", "reviews", "pipeline.py")
# (stage, metric): the largest |bf16 - float32| accepted at the end of the run.
TOLERANCES = {
    ("pretrain", "eval/loss"): 0.05,          # nats per byte (the unigram baseline is ~3)
    ("sft", "eval/loss"): 0.05,
    ("reward", "eval/accuracy"): 0.05,        # held-out pair accuracy
    ("ppo", "objective/scores"): 0.15,        # the normalised reward (std 1)
    ("ppo", "objective/kl"): 0.5,             # nats per response
    ("dpo", "eval/rewards/accuracies"): 0.05,
}


def overrides(scale: float, dtype: str, data_dir: str, dpo: bool):
    steps = lambda n: str(max(2, int(n * scale)))
    out = [("pretrain.num_steps", steps(200)), ("pretrain.optimizer.decay_steps", steps(200)),
           ("pretrain.eval_every", steps(100)), ("pretrain.checkpoint_every", steps(100)),
           ("pretrain.sample_every", "0"),
           ("sft.num_steps", steps(100)), ("sft.optimizer.decay_steps", steps(100)), ("sft.eval_every", steps(50)),
           ("sft.sample_every", "0"), ("num_report_prompts", "16")]
    stages = ["pretrain", "sft"]
    if dpo:
        out += [("dpo.num_steps", steps(60)), ("dpo.eval_every", steps(30)), ("dpo.preferences.num_prompts", "256"),
                ("dpo.preferences.num_validation_prompts", "64")]
        stages.append("dpo")
    else:
        out += [("reward.preferences.num_prompts", "256"), ("reward.preferences.num_validation_prompts", "64"),
                ("reward.num_steps", steps(100)), ("reward.optimizer.decay_steps", steps(100)),
                ("reward.eval_every", steps(50)),
                ("ppo.num_steps", steps(20)), ("ppo.checkpoint_every", steps(20)), ("ppo.sample_every", "0")]
        stages += ["reward", "ppo"]
    out += [(f"{stage}.model.dtype", dtype) for stage in stages]
    out += [(f"{stage}.data_dir", data_dir) for stage in stages]
    return out


def last_value(workdir: str, metric: str):
    rows = [r for r in metrics_lib.read_metrics(workdir) if metric in r]
    return rows[-1][metric] if rows else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bf16_parity"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's step count")
    args = parser.parse_args()
    data_dir = os.path.join(args.workdir, "datasets")
    for dtype in ("float32", "bfloat16"):
        # The DPO variant reuses the finished pre-training and SFT runs of the same workdir.
        for dpo, spec in ((False, PIPELINE), (True, PIPELINE + ":dpo")):
            pipeline.run_pipeline(spec, overrides(args.scale, dtype, data_dir, dpo), os.path.join(args.workdir, dtype))
    rows, ok = [], True
    for (stage, metric), tolerance in TOLERANCES.items():
        a, b = (last_value(os.path.join(args.workdir, dtype, stage), metric) for dtype in ("float32", "bfloat16"))
        within = a is not None and b is not None and abs(a - b) <= tolerance
        ok &= within
        rows.append({"stage": stage, "metric": metric, "float32": a, "bfloat16": b, "tolerance": tolerance,
                     "within": within})
        print(f"{stage:9s} {metric:26s} float32 {a:9.4f}  bfloat16 {b:9.4f}  |diff| {abs(a - b):.4f} "
              f"(tolerance {tolerance})  {'ok' if within else 'OUTSIDE'}")
    path = benchmarking.record_result("bf16_parity", {"scale": args.scale, "rows": rows, "all_within": ok})
    print(f"appended to {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
