"""The whole RLHF pipeline from one config: pre-train -> SFT -> pairs + labels -> reward model -> PPO.

    rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir=runs/pipeline \
        [--config.ppo.kl_coef=0.05 ...]

Each stage runs in its own subfolder with its own config.json / metrics.jsonl / checkpoints; a
finished stage (DONE marker) is skipped, an interrupted one resumes from its last checkpoint.
Stages hand off through checkpoints: SFT starts from pre-training, the reward model from SFT
(which also samples and labels the pairs), PPO from SFT (policy and reference) and the reward
model. At the end: `curves.png` (RM score, gold score, KL against PPO step) and `report.md`
(responses to held-out prompts before and after PPO).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import registry, runs, sampling
from rlhf_jax import run as run_lib

STAGE_ORDER = ("pretrain", "sft", "reward", "ppo")


def wire_stages(config, workdir: str) -> dict:
    """Each stage's config with pre-training's model and its hand-off paths pointing at the
    earlier stages' workdirs."""
    dirs = {name: os.path.join(workdir, name) for name in STAGE_ORDER}
    stages = {}
    for name in STAGE_ORDER:
        stage = config[name]
        with stage.unlocked():
            # One model through the whole pipeline: --config.pretrain.model.* sizes every stage.
            stage.model = config.pretrain.model
            if name == "sft":
                stage.init_from = dirs["pretrain"]
            elif name == "reward":
                stage.init_from = dirs["sft"]
            elif name == "ppo":
                stage.init_from = dirs["sft"]
                if not stage.get("reward_function"):
                    stage.reward_model = dirs["reward"]
        stages[name] = stage
    return stages


def run_pipeline(spec: str, overrides, workdir: str):
    from rlhf_jax import validation

    config = config_lib.load_config(spec, overrides)
    stages = wire_stages(config, workdir)
    for name in STAGE_ORDER:  # Every stage's values, before hours go into the first stage.
        validation.validate(stages[name], prefix=f"{name}.")
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_resolved_config(config, workdir, allow_change=True)
    for name in STAGE_ORDER:
        stage_dir = os.path.join(workdir, name)
        if run_lib.is_finished(stage_dir):
            print(f"=== {name}: finished earlier, skipped ({stage_dir})", file=sys.stderr, flush=True)
            continue
        print(f"=== {name} -> {stage_dir}", file=sys.stderr, flush=True)
        t0 = time.time()
        registry.run_stage(stages[name], stage_dir, allow_config_change=True)
        print(f"=== {name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    write_report(config, workdir)


def write_report(config, workdir: str):
    """curves.png of PPO's RM score, gold score and KL; report.md with before/after responses."""
    from rlhf_jax import plotting
    from rlhf_jax.tokenizer import make_tokenizer

    ppo_dir = os.path.join(workdir, "ppo")
    rows = run_lib.read_metrics(ppo_dir)
    metrics = [m for m in ("objective/scores", "objective/gold_scores", "objective/kl") if any(m in r for r in rows)]
    curves = plotting.plot_runs([ppo_dir], metrics, os.path.join(workdir, "curves.png"), labels=["ppo"])

    prompts = held_out_prompts(config)
    tokenizer = make_tokenizer(config.ppo.get("tokenizer"))
    lines = ["# RLHF pipeline report", "", f"workdir: `{workdir}`", ""]
    if rows:
        first, last = rows[0], rows[-1]
        lines += [f"PPO metrics (logged means), steps {first['step']} and {last['step']}:", "",
                  "| metric | first | last |", "|---|---|---|"]
        for m in metrics:
            lines.append(f"| {m} | {first.get(m, float('nan')):.4f} | {last.get(m, float('nan')):.4f} |")
        lines.append("")
    gold = _gold_function(config)
    responses = {}
    for stage in ("sft", "ppo"):
        _, graphdef, params = runs.load_policy(os.path.join(workdir, stage))
        responses[stage] = sampling.generate_texts(
            graphdef, params, tokenizer, prompts, max_new_tokens=config.ppo.get("max_new_tokens", 64),
            rng=jax.random.key(0), temperature=config.report_temperature)
    if gold:
        means = {stage: np.mean([gold(p, r) for p, r in zip(prompts, responses[stage])]) for stage in responses}
        lines += [f"Mean gold score of responses to {len(prompts)} held-out prompts (validation split, "
                  f"temperature {config.report_temperature}): SFT {means['sft']:+.3f}, PPO {means['ppo']:+.3f}", ""]
    lines += ["## Held-out prompts, before (SFT) and after (PPO)", ""]
    for i, prompt in enumerate(prompts[:config.report_table_rows]):
        lines.append(f"**{prompt}**")
        for stage in ("sft", "ppo"):
            text = responses[stage][i]
            score = f" (gold {gold(prompt, text):+.3f})" if gold else ""
            lines.append(f"- {stage}{score}: {text.strip()!r}")
        lines.append("")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"curves: {curves}\nreport: {os.path.join(workdir, 'report.md')}", flush=True)


def held_out_prompts(config) -> list[str]:
    """`report_prompts`, or the first `num_report_prompts` prompts of PPO's validation split."""
    if config.report_prompts:
        return list(config.report_prompts)
    from rlhf_jax.data import builders, loaders

    source = builders.load_dataset(config.ppo.data, config.ppo.data_dir)["validation"]
    return loaders.prompt_texts(source, range(min(config.num_report_prompts, len(source))))


def _gold_function(config):
    path = config.ppo.get("gold_function", "")
    if not path:
        return None
    from rlhf_jax.labelers import load_function

    return load_function(path)
