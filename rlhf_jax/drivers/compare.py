"""The method comparison a researcher runs first: PPO, RLOO, GRPO, the DPO family and best-of-n
on one SFT policy and one preference dataset, judged by one evaluation.

    rlhf-jax compare --config=experiments/reviews/compare.py --workdir=runs/compare

For every method and every value of its KL knob (PPO/RLOO/GRPO: kl_coef; DPO family: beta) one
run of `num_seeds` seeds trained in one program (vmap), in <workdir>/<method>/<knob>=<value>;
finished runs are skipped, interrupted ones resume. Then every seed's final policy is evaluated
the same way (rlhf_jax.models.evaluation: samples on held-out prompts, their sequence KL to the SFT
policy, gold score and reward-model score), results cached per run in eval.json; best-of-n from
the SFT policy (analytic KL) and the SFT policy itself (KL 0) are points on the same chart.

Writes <workdir>/frontier.png (gold score against KL, one curve per method: mean over seeds with
the seeds' standard deviation as error bars), <workdir>/results.jsonl (one row per seed) and
<workdir>/results.md (mean +- std per method and knob, and the best method at each KL budget).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from rlhf_jax.data import builders, loaders
from rlhf_jax.models import evaluation
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import checkpoints, config as config_lib
from rlhf_jax.runtime.plotting import plt  # (plotting selects the Agg backend first)
from rlhf_jax.stages import registry, runs


def method_config(config, name: str, method, value: float):
    """The stage config of one (method, knob value): the method's experiment file with the
    comparison's SFT run, reward run, seeds, knob and extra overrides applied."""
    overrides = [("init_from", config.sft), ("num_seeds", str(config.num_seeds)), (method.knob, repr(value))]
    stage = config_lib.load_config_file(method.config)
    if stage.stage == "ppo":
        overrides.append(("reward_model", config.reward_model))
    elif stage.stage == "dpo":
        overrides.append(("data_dir", os.path.join(config.reward_model, "preferences", "tfds")))
    overrides += [tuple(item.split("=", 1)) for item in method.overrides]
    try:
        return config_lib.load_config(method.config, overrides)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"compare: method {name!r}: {e}") from e


def run_methods(config, workdir: str) -> list[tuple[str, float, str]]:
    """Train every (method, knob value); returns [(method, value, run dir)]."""
    done = []
    for name, method in config.methods.items():
        for value in method.knob_values:
            run_dir = os.path.join(workdir, name, f"{method.knob.split('.')[-1]}={value}")
            if not checkpoints.is_finished(run_dir):  # (the method's config is built, and checked, once it must run)
                registry.run_stage_once(method_config(config, name, method, value), run_dir,
                                        f"{name} {method.knob}={value}", allow_config_change=False)
            done.append((name, float(value), run_dir))
    return done


def _cached(path: str, compute):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def evaluate_all(config, workdir: str, trained) -> list[dict]:
    """One row per (method, knob value, seed), plus SFT and best-of-n rows."""
    ecfg = config.eval
    tokenizer = make_tokenizer(config_lib.read_resolved_config(config.sft).get("tokenizer"))
    _, sft_graphdef, sft_params = runs.load_policy(config.sft)
    source = builders.load_dataset(ecfg.data, config.data_dir)[ecfg.split]
    prompts = loaders.prompt_texts(source, range(min(ecfg.num_prompts, len(source))))
    gold_fn = labelers.load_function(config.gold_function)
    rm_run = runs.load_reward_model(config.reward_model)
    rm_seq_len = int(config_lib.read_resolved_config(config.reward_model).seq_len)
    reward = evaluation.make_reward(rm_run, tokenizer, rm_seq_len)
    evaluate = evaluation.make_policy_evaluator(
        (sft_graphdef, sft_params), tokenizer, prompts, gold_fn=gold_fn, reward=reward,
        max_prompt_len=ecfg.max_prompt_len, max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
        batch_size=ecfg.batch_size, seed=ecfg.seed)

    def scalars(metrics):
        return {k: v for k, v in metrics.items() if k != "samples"}

    rows = [{"method": "sft", "value": 0.0, "seed": 0,
             **_cached(os.path.join(workdir, "sft_eval.json"), lambda: scalars(evaluate(sft_graphdef, sft_params)))}]
    for name, value, run_dir in trained:
        num_seeds = config_lib.read_resolved_config(run_dir).get("num_seeds", 1)

        def per_seed():
            out = []
            for i in range(num_seeds):
                _, graphdef, params = runs.load_policy(run_dir, seed_index=i)
                out.append(scalars(evaluate(graphdef, params)))
            return out

        for i, metrics in enumerate(_cached(os.path.join(run_dir, "eval.json"), per_seed)):
            rows.append({"method": name, "value": value, "seed": i, **metrics})
        print(f"evaluated {run_dir}", file=sys.stderr, flush=True)
    if config.best_of_n.ns:
        best = _cached(os.path.join(workdir, "best_of_n.json"), lambda: evaluation.best_of_n(
            (sft_graphdef, sft_params), tokenizer, prompts, reward=reward, gold_fn=gold_fn, ns=tuple(config.best_of_n.ns),
            max_prompt_len=ecfg.max_prompt_len, max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
            seed=ecfg.seed))
        rows += [{"method": "best_of_n", "value": float(r["n"]), "seed": 0, **r} for r in best]
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, value)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["value"]), []).append(r)
    out = []
    for (method, value), rs in groups.items():
        entry = {"method": method, "value": value, "num_seeds": len(rs)}
        for key in ("kl", "gold", "rm"):
            values = np.asarray([r[key] for r in rs if key in r], np.float64)
            entry[key], entry[key + "_std"] = float(values.mean()), float(values.std())
        out.append(entry)
    return out


def best_at_budget(summary: list[dict], budget: float):
    """The (method, value) with the highest mean gold score among those whose mean KL <= budget."""
    within = [s for s in summary if s["kl"] <= budget]
    return max(within, key=lambda s: s["gold"]) if within else None


def write_outputs(config, workdir: str, rows: list[dict]):
    summary = summarize(rows)
    with open(os.path.join(workdir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    knobs = {name: method.knob for name, method in config.methods.items()}
    knobs.update(sft="-", best_of_n="n")
    lines = ["# Method comparison: gold score against KL to the SFT policy", "",
             f"SFT run `{config.sft}`, reward run `{config.reward_model}`, {config.num_seeds} seeds per setting; "
             f"evaluation: {config.eval.num_prompts} held-out prompts ({config.eval.split} split), one sample each "
             f"at temperature {config.eval.temperature}, at most {config.eval.max_new_tokens} tokens; KL = sampled "
             "sequence KL(policy || SFT) in nats (best-of-n: analytic log n - (n-1)/n). Mean +- std over seeds.", "",
             "| method | knob | value | KL | gold | RM score |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {knobs.get(s['method'], '')} | {s['value']:g} | {s['kl']:.2f} +- "
                     f"{s['kl_std']:.2f} | {s['gold']:.3f} +- {s['gold_std']:.3f} | {s['rm']:.2f} +- {s['rm_std']:.2f} |")
    lines.append("")
    trained = [s for s in summary if s["method"] not in ("sft", "best_of_n")]
    for budget in config.kl_budgets:
        for among, entries in (("", summary), (" among trained policies (best-of-n aside)", trained)):
            best = best_at_budget(entries, budget)
            if best is not None:
                lines.append(f"Highest gold score at KL <= {budget:g}{among}: **{best['method']}** "
                             f"({knobs.get(best['method'])}={best['value']:g}): gold {best['gold']:.3f} +- "
                             f"{best['gold_std']:.3f} at KL {best['kl']:.2f} +- {best['kl_std']:.2f}  ")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_frontier(summary, os.path.join(workdir, "frontier.png"), knobs)
    print("\n".join(lines))
    return summary


def plot_frontier(summary: list[dict], out: str, knobs: dict) -> str:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in dict.fromkeys(s["method"] for s in summary):
        points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["kl"])
        kl = [s["kl"] for s in points]
        gold = [s["gold"] for s in points]
        style = dict(marker="o" if method != "best_of_n" else "s", capsize=2, label=method)
        ax.errorbar(kl, gold, xerr=[s["kl_std"] for s in points], yerr=[s["gold_std"] for s in points], **style)
        for s in points:
            if method not in ("sft",):
                ax.annotate(f"{s['value']:g}", (s["kl"], s["gold"]), fontsize=6, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || SFT), nats per response (sampled; best-of-n analytic)")
    ax.set_ylabel("gold score (VADER) of samples on held-out prompts")
    ax.set_title("gold score vs KL: mean over seeds, error bars = std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_comparison(spec: str, overrides, workdir: str):
    config = config_lib.load_config(spec, overrides)
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_resolved_config(config, workdir, allow_change=True)
    t0 = time.time()
    trained = run_methods(config, workdir)
    rows = evaluate_all(config, workdir, trained)
    write_outputs(config, workdir, rows)
    print(f"compare: {time.time() - t0:.0f}s; {workdir}/frontier.png, results.md", file=sys.stderr, flush=True)
