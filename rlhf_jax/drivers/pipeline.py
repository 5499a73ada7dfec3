"""The whole RLHF pipeline from one config: pre-train -> SFT -> pairs + labels -> reward model -> PPO
(or, with `experiments/reviews/pipeline.py:dpo`, pre-train -> SFT -> pairs + labels -> DPO).

    rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir=runs/pipeline \
        [--config.ppo.kl_coef=0.05 ...]

Each stage runs in its own subfolder with its own config.json / metrics.jsonl / checkpoints; a
finished stage (DONE marker) is skipped, an interrupted one resumes from its last checkpoint.
Stages hand off through checkpoints: SFT starts from pre-training, the reward model from SFT
(which also samples and labels the pairs), PPO from SFT (policy and reference) and the reward
model, DPO from SFT (policy, reference, and the policy its pairs are sampled from). At the end:
`curves.png` (the last stage's headline metrics against step) and `report.md` (the SFT and the
trained policy judged by rlhf_jax.models.evaluation on held-out prompts, and their responses).

A pipeline whose config names a `verifier` ('module:fn' of fn(prompt, response) -> 1.0 | 0.0,
e.g. experiments/arithmetic/pipeline.py) has a checkable task: no reward model, the RL stage's
`reward_function` is the verifier, and the report is accuracy on held-out problems instead
(`write_accuracy_report`). Both reports write `report.json`: {"sft": {...}, "rl": {...},
"rl_stage", "held_out": {the prompts and sampling settings}}.
"""

from __future__ import annotations

import os

import numpy as np

from rlhf_jax.data import builders, loaders
from rlhf_jax.models import evaluation
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib, metrics as metrics_lib, plotting
from rlhf_jax.stages import registry, runs


def wire_stages(config, workdir: str) -> dict:
    """Each stage's config (config.stages, in order) with pre-training's model and its hand-off
    paths pointing at the earlier stages' workdirs."""
    dirs = {name: os.path.join(workdir, name) for name in config.stages}
    stages = {}
    for name in config.stages:
        stage = config[name]
        with stage.unlocked():
            # One model through the whole pipeline: --config.pretrain.model.* sizes every stage.
            stage.model = config.pretrain.model
            if name in ("sft",):
                stage.init_from = dirs["pretrain"]
            elif name in ("reward", "dpo", "ppo"):
                stage.init_from = dirs["sft"]
            if name == "ppo" and not stage.get("reward_function"):
                stage.reward_model = dirs["reward"]
        stages[name] = stage
    return stages


def run_pipeline(spec: str, overrides, workdir: str):
    config = config_lib.load_config(spec, overrides)
    stages = wire_stages(config, workdir)
    for name in config.stages:  # Every stage's values, before hours go into the first stage.
        registry.validate(stages[name], prefix=f"{name}.")
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_resolved_config(config, workdir, allow_change=True)
    for name in config.stages:
        registry.run_stage_once(stages[name], os.path.join(workdir, name), name)
    write_report(config, workdir)


CURVES = {"ppo": ("objective/scores", "objective/gold_scores", "objective/kl"),
          "dpo": ("rewards/accuracies", "eval/rewards/accuracies", "eval/gold", "eval/kl")}


def write_report(config, workdir: str):
    """curves.png of the policy stage's headline metrics; report.md: the SFT and the trained
    policy judged by the shared evaluation (rlhf_jax.models.evaluation: gold score, KL to SFT, reward
    model score of samples on held-out prompts) and their responses side by side. With a
    `verifier` in the config: write_accuracy_report."""
    if config.get("verifier"):
        return write_accuracy_report(config, workdir)
    final = [name for name in config.stages if name in runs.RL_STAGES][-1]
    final_dir = os.path.join(workdir, final)
    rows = metrics_lib.read_metrics(final_dir)
    metrics = [m for m in CURVES[final] if any(m in r for r in rows)]
    curves = plotting.plot_runs([final_dir], metrics, os.path.join(workdir, "curves.png"), labels=[final])

    prompts = held_out_prompts(config)
    tokenizer = make_tokenizer(config[final].get("tokenizer"))
    label = final.upper()
    lines = ["# RLHF pipeline report", "", f"workdir: `{shown_path(workdir)}`", ""]
    if rows:
        first, last = rows[0], rows[-1]
        lines += [f"{label} metrics (logged means), steps {first['step']} and {last['step']}:", "",
                  "| metric | first | last |", "|---|---|---|"]
        for m in metrics:
            lines.append(f"| {m} | {first.get(m, float('nan')):.4f} | {last.get(m, float('nan')):.4f} |")
        lines.append("")
    gold_path = config[final].get("gold_function", "") or config.get("report_gold_function", "")
    gold = labelers.load_function(gold_path) if gold_path else None
    reward = None
    if "reward" in config.stages:
        reward_dir = os.path.join(workdir, "reward")
        reward = evaluation.make_reward(runs.load_reward_model(reward_dir), tokenizer, int(config.reward.seq_len))
    _, sft_graphdef, sft_params = runs.load_policy(os.path.join(workdir, "sft"))
    evaluate = evaluation.make_policy_evaluator(
        (sft_graphdef, sft_params), tokenizer, prompts, gold_fn=gold, reward=reward,
        max_new_tokens=config[final].get("max_new_tokens", 96), temperature=config.report_temperature)
    results = {"sft": evaluate(sft_graphdef, sft_params)}
    _, graphdef, params = runs.load_policy(final_dir)
    results[final] = evaluate(graphdef, params)
    lines += [f"Held-out evaluation (rlhf_jax.models.evaluation): {len(prompts)} validation prompts, one sample each at "
              f"temperature {config.report_temperature}; KL = sampled sequence KL to the SFT policy (nats).", "",
              "| policy | " + " | ".join(k for k in ("gold", "rm", "kl", "length") if k in results["sft"]) + " |",
              "|---|" + "---|" * sum(k in results["sft"] for k in ("gold", "rm", "kl", "length"))]
    for stage, m in results.items():
        cells = [f"{m[k]:+.3f} +- {m[k + '_sem']:.3f}" if k + "_sem" in m else f"{m[k]:.1f}"
                 for k in ("gold", "rm", "kl", "length") if k in m]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    if gold:
        lines += [f"Mean gold score of responses to {len(prompts)} held-out prompts (validation split, temperature "
                  f"{config.report_temperature}): SFT {results['sft']['gold']:+.3f}, {label} {results[final]['gold']:+.3f}",
                  ""]
    lines += [f"## Held-out prompts, before (SFT) and after ({label})", ""]
    for i, prompt in enumerate(prompts[:config.report_table_rows]):
        lines.append(f"**{prompt}**")
        for stage, m in results.items():
            text = m["samples"][i][1]
            score = f" (gold {gold(prompt, text):+.3f})" if gold else ""
            lines.append(f"- {stage}{score}: {text.strip()!r}")
        lines.append("")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # The same numbers for scripts: {"sft": {...}, "rl": {...}} on the held-out prompts.
    summary = {"sft": _numbers(results["sft"]), "rl": _numbers(results[final]), "rl_stage": final,
               "held_out": {"prompts": len(prompts), "samples_per_prompt": 1, "temperature": config.report_temperature,
                            "max_new_tokens": config[final].get("max_new_tokens", 96)}}
    config_lib.write_json_atomic(os.path.join(workdir, "report.json"), summary)
    print(f"curves: {curves}\nreport: {os.path.join(workdir, 'report.md')}", flush=True)


def _numbers(evaluated: dict) -> dict:
    """The scalar results of one policy's evaluation (the samples stay in report.md)."""
    return {k: float(v) for k, v in evaluated.items() if not isinstance(v, (str, list, dict)) and np.ndim(v) == 0}


def shown_path(path: str) -> str:
    """A path as reports print it: relative to the current folder when inside it (so a committed
    report names `runs/default`, not the temporary folder of the machine that made it)."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def held_out_prompts(config) -> list[str]:
    """`report_prompts`, or the first `num_report_prompts` prompts of SFT's `report_split`
    (default 'validation'; the arithmetic task reports on 'test')."""
    if config.report_prompts:
        return list(config.report_prompts)

    source = builders.load_dataset(config.sft.data, config.sft.data_dir)[config.get("report_split", "validation")]
    return loaders.prompt_texts(source, range(min(config.num_report_prompts, len(source))))


# ----------------------------------------------------------------------------------------------
# Tasks with a verifier: accuracy on held-out problems.

ACCURACY_CURVES = ("objective/scores", "val/mean_response_length", "policy/entropy_avg", "objective/kl")


def write_accuracy_report(config, workdir: str):
    """curves.png of the RL stage (objective/scores is the verifier's mean on the train prompts:
    training accuracy); report.md and report.json: the SFT and the RL policy on the same held-out
    problems, each decoded two ways with the same keys for both policies:

        greedy    one argmax response per problem -> accuracy (the headline number)
        sampled   report_samples_per_prompt responses per problem at report_temperature ->
                  mean accuracy over them, and pass@k for k in report_pass_k (unbiased, from
                  those samples): how often some sample is right, the ceiling RL can sharpen
                  towards without learning anything new.
    Plus mean response length of right and of wrong responses, and a table of responses.
    """
    final = [name for name in config.stages if name in runs.RL_STAGES][-1]
    final_dir = os.path.join(workdir, final)
    rows = metrics_lib.read_metrics(final_dir)
    metrics = [m for m in ACCURACY_CURVES if any(m in r for r in rows)]
    curves = plotting.plot_runs([final_dir], metrics, os.path.join(workdir, "curves.png"), labels=[final])

    verifier = labelers.load_function(config.verifier)
    prompts = held_out_prompts(config)
    tokenizer = make_tokenizer(config[final].get("tokenizer"))
    k = int(config.report_samples_per_prompt)
    ks = tuple(int(n) for n in config.report_pass_k if int(n) <= k)
    decoding = dict(max_prompt_len=int(config[final].max_prompt_len),
                    max_new_tokens=int(config[final].max_new_tokens), seed=int(config.get("report_seed", 0)))
    greedy = evaluation.make_accuracy_evaluator(tokenizer, prompts, verifier, greedy=True, batch_size=256,
                                                **decoding)
    sampled = evaluation.make_accuracy_evaluator(tokenizer, prompts, verifier, samples_per_prompt=k, ks=ks,
                                                 temperature=float(config.report_temperature), batch_size=512,
                                                 **decoding)
    results = {}
    for stage, stage_dir in (("sft", os.path.join(workdir, "sft")), (final, final_dir)):
        _, graphdef, params = runs.load_policy(stage_dir)
        results[stage] = {"greedy": greedy(graphdef, params), "sampled": sampled(graphdef, params)}

    def numbers(stage: str) -> dict:
        g, s = results[stage]["greedy"], results[stage]["sampled"]
        out = {"accuracy": g["accuracy"], "accuracy_sem": g["accuracy_sem"],
               "sampled_accuracy": s["accuracy"], "sampled_accuracy_sem": s["accuracy_sem"]}
        out.update({f"pass@{n}": s[f"pass@{n}"] for n in ks})
        out.update({key: s[key] for key in ("length", "length_correct", "length_incorrect")})
        return out

    summary = {"sft": numbers("sft"), "rl": numbers(final), "rl_stage": final, "verifier": config.verifier,
               "held_out": {"split": config.get("report_split", "validation") if not config.report_prompts else "report_prompts",
                            "prompts": len(prompts),
                            "accuracy": "greedy decoding, one response per problem",
                            "sampled_accuracy": f"mean over {k} samples per problem at temperature "
                                                f"{config.report_temperature}",
                            "pass@k": f"unbiased estimate from the same {k} samples per problem",
                            "samples_per_prompt": k, "temperature": float(config.report_temperature),
                            "max_new_tokens": decoding["max_new_tokens"]}}
    config_lib.write_json_atomic(os.path.join(workdir, "report.json"), summary)

    label = f"RL ({config[final].get('loss', final)})"
    s_sft, s_rl = summary["sft"], summary["rl"]
    lines = ["# Verifiable-reward pipeline report", "", f"workdir: `{shown_path(workdir)}`  ",
             f"verifier: `{config.verifier}`", "",
             f"Held-out: {len(prompts)} problems of the {summary['held_out']['split']} split (no problem, nor its "
             f"mirror image, is in train). Greedy: one argmax response per problem. Sampled: {k} responses per "
             f"problem at temperature {config.report_temperature} (the same keys for both policies); pass@k is the "
             f"unbiased estimate from them. Responses of at most {decoding['max_new_tokens']} tokens.", "",
             f"**Accuracy (greedy): SFT {s_sft['accuracy']:.3f} -> {label} {s_rl['accuracy']:.3f} "
             f"({s_rl['accuracy'] - s_sft['accuracy']:+.3f})**", "",
             "| policy | greedy accuracy | sampled accuracy | " + " | ".join(f"pass@{n}" for n in ks)
             + " | length (right / wrong) |",
             "|---|---|---|" + "---|" * len(ks) + "---|"]
    for stage, m in (("SFT", s_sft), (label, s_rl)):
        lines.append(f"| {stage} | {m['accuracy']:.3f} +- {m['accuracy_sem']:.3f} | "
                     f"{m['sampled_accuracy']:.3f} +- {m['sampled_accuracy_sem']:.3f} | "
                     + " | ".join(f"{m[f'pass@{n}']:.3f}" for n in ks)
                     + f" | {m['length_correct']:.1f} / {m['length_incorrect']:.1f} |")
    lines += ["", "(+- one standard error over problems; lengths in tokens, of the sampled responses.)", ""]
    if rows:
        first, last = rows[0], rows[-1]
        lines += [f"{label} training metrics (train prompts, logged means), steps {first['step']} and {last['step']}:", "",
                  "| metric | first | last |", "|---|---|---|"]
        lines += [f"| {m} | {first.get(m, float('nan')):.4f} | {last.get(m, float('nan')):.4f} |" for m in metrics]
        lines.append("")
    lines += [f"## Held-out problems, greedy, before (SFT) and after ({label})", ""]
    for i, prompt in enumerate(prompts[:config.report_table_rows]):
        lines.append(f"**{prompt}**")
        for stage, name in (("sft", "SFT"), (final, label)):
            g = results[stage]["greedy"]
            mark = "right" if g["correct"][i] else "wrong"
            lines.append(f"- {name} ({mark}): {g['samples'][i][1].strip()!r}")
        lines.append("")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"curves: {curves}\nreport: {os.path.join(workdir, 'report.md')}", flush=True)
    return summary
