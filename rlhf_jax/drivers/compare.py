"""The method comparison a researcher runs first: PPO, RLOO, GRPO, the DPO family and best-of-n
on one SFT policy and one preference dataset, judged by one evaluation; or, with `config.curves`,
an ablation judged by the curves the runs log (the GRPO family on a verifiable task).

    rlhf-jax compare --config=experiments/reviews/compare.py --workdir=runs/compare
    rlhf-jax compare --config=experiments/arithmetic/ablate.py --workdir=runs/ablate

Ablation (`config.curves` set): every method is one run of `num_seeds` seeds (a method's `knob`
may be '' for a single setting, in <workdir>/<method>), logging held-out accuracy as it trains
(the RL stage's eval_every). Writes <workdir>/curves.png (each of config.curves against step, one
line per method, mean +- a band of one std over seeds), <workdir>/ablation.md and .json (a table
of each curve's value at the start and at the end per method, and each of `config.contrasts`:
a published observation, checked by the change of one metric under two methods).

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
from rlhf_jax.runtime import checkpoints, config as config_lib, metrics as metrics_lib, plotting
from rlhf_jax.runtime.plotting import plt  # (plotting selects the Agg backend first)
from rlhf_jax.stages import registry, runs


def method_config(config, name: str, method, value: float):
    """The stage config of one (method, knob value): the method's experiment file with the
    comparison's SFT run, reward run, seeds, knob and extra overrides applied."""
    overrides = [("init_from", config.sft), ("num_seeds", str(config.num_seeds))]
    if method.knob:
        overrides.append((method.knob, repr(value)))
    stage = config_lib.load_config_file(method.config)
    if stage.stage == "ppo" and config.reward_model:
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
        for value in (method.knob_values if method.knob else (0.0,)):
            run_dir = os.path.join(workdir, name, f"{method.knob.split('.')[-1]}={value}") if method.knob \
                else os.path.join(workdir, name)
            if not checkpoints.is_finished(run_dir):  # (the method's config is built, and checked, once it must run)
                start, resumed = time.time(), os.path.isdir(os.path.join(run_dir, "checkpoints"))
                registry.run_stage_once(method_config(config, name, method, value), run_dir,
                                        f"{name} {method.knob}={value}" if method.knob else name,
                                        allow_config_change=False)
                config_lib.write_json_atomic(os.path.join(run_dir, "train_time.json"),
                                             {"seconds": time.time() - start, "resumed": resumed})
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


# ----------------------------------------------------------------------------- the ablation: curves


def _at(rows: list[dict], metric: str, where: str, window: int) -> tuple[float, float] | None:
    """(mean, std over seeds) of `metric` averaged over its first or last logged values: `window`
    of them, but at most a quarter of them (a held-out evaluation logged 7 times is compared
    first value against last, not over windows that overlap)."""
    have = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not have:
        return None
    window = min(window, max(1, len(have) // 4))
    have = have[:window] if where == "start" else have[-window:]
    mean = float(np.mean([r[metric] for r in have]))
    std = float(np.mean([r.get(metric + "_std", 0.0) for r in have]))
    return mean, std


def summarize_curves(config, trained) -> dict:
    """{method: {metric: {'start': (mean, std), 'end': (mean, std)}, 'seconds': training time}}."""
    out = {}
    for name, _, run_dir in trained:
        rows = metrics_lib.read_metrics(run_dir)
        entry = {m: {"start": _at(rows, m, "start", config.window), "end": _at(rows, m, "end", config.window)}
                 for m in config.curves}
        timing = os.path.join(run_dir, "train_time.json")
        entry["seconds"] = json.load(open(timing))["seconds"] if os.path.exists(timing) else None
        entry["steps"] = rows[-1]["step"] + 1 if rows else 0
        out[name] = entry
    return out


def contrast_lines(config, summary: dict) -> list[str]:
    """One paragraph per config.contrasts entry (baseline, treatment, metric, claim): the change of
    `metric` from the start to the end of training under each method, and the verdict: the claim
    (the treatment's change below the baseline's) is consistent with this run when the gap
    exceeds the seeds' spread (the two end values' std, added in quadrature), contradicted when
    it is as large the other way, and undecided in between."""
    lines = []
    for baseline, treatment, metric, claim in config.contrasts:
        if baseline not in summary or treatment not in summary:
            continue
        changes = {}
        for name in (baseline, treatment):
            start, end = summary[name][metric]["start"], summary[name][metric]["end"]
            changes[name] = None if start is None or end is None else (end[0] - start[0], start, end)
        if None in changes.values():
            lines += [f"- {claim}: not measurable here ({metric} missing in a run).", ""]
            continue
        described = "; ".join(f"{name}: {c[1][0]:.3g} -> {c[2][0]:.3g} (change {c[0]:+.3g}, end +- {c[2][1]:.2g} "
                              "over seeds)" for name, c in changes.items())
        gap = changes[baseline][0] - changes[treatment][0]  # > 0: as claimed
        spread = float(np.hypot(changes[baseline][2][1], changes[treatment][2][1]))
        verdict = ("consistent with" if gap > spread else "contradicted by" if -gap > spread
                   else "not decided by")
        lines += [f"- {claim}", f"  `{metric}`, start vs end: {described}. "
                  f"The {treatment} change is {abs(gap):.3g} {'below' if gap > 0 else 'above'} the {baseline} one, "
                  f"against a seed spread of {spread:.2g}: the claim is **{verdict}** this run.", ""]
    return lines


def write_curves(config, workdir: str, trained) -> dict:
    summary = summarize_curves(config, trained)
    names = [name for name, _, _ in trained]
    plotting.plot_runs([run_dir for _, _, run_dir in trained], list(config.curves),
                       os.path.join(workdir, "curves.png"), labels=names)
    lines = ["# Ablation", "", f"SFT run `{config.sft}`, {config.num_seeds} seeds per method (mean +- std over "
             f"seeds); start / end = the mean of the first / last {config.window} logged values of each metric "
             "(at most a quarter of them: a metric logged 7 times, first against last).", ""]
    head = [m for m in config.curves]
    lines += ["| method | " + " | ".join(f"{m} start -> end" for m in head) + " | steps | train s |",
              "|---|" + "---|" * (len(head) + 2)]
    fmt = lambda v: "-" if v is None else f"{v[0]:.3g} +- {v[1]:.2g}"
    for name in names:
        s = summary[name]
        cells = [f"{fmt(s[m]['start'])} -> {fmt(s[m]['end'])}" for m in head]
        seconds = "-" if s["seconds"] is None else f"{s['seconds']:.0f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['steps']} | {seconds} |")
    lines += ["", "## Published observations, checked", ""] + contrast_lines(config, summary)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    config_lib.write_json_atomic(os.path.join(workdir, "ablation.json"), summary)
    print("\n".join(lines))
    return summary


def run_comparison(spec: str, overrides, workdir: str):
    config = config_lib.load_config(spec, overrides)
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_resolved_config(config, workdir, allow_change=True)
    t0 = time.time()
    trained = run_methods(config, workdir)
    if config.get("curves"):
        write_curves(config, workdir, trained)
        outputs = "curves.png, ablation.md"
    else:
        rows = evaluate_all(config, workdir, trained)
        write_outputs(config, workdir, rows)
        outputs = "frontier.png, results.md"
    print(f"compare: {time.time() - t0:.0f}s; {workdir}/{outputs}", file=sys.stderr, flush=True)
