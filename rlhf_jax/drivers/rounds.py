"""Continual improvement in rounds: sample from the current policy, get labels, retrain, repeat.

    rlhf-jax rounds --config=experiments/reviews/rounds.py --workdir=runs/rounds

"The model can continually be improved in the background by collecting user prompts and
periodically asking them to rate which of two responses is better." Each round:

  1. pairs    sample `pairs.samples_per_prompt` responses from the *current* policy (round 0: the
              SFT policy) to prompts no earlier round used, pair them, and add them to the one
              label store, <workdir>/labels/labels.sqlite (source 'round-<r>');
  2. labels   'simulated': the Bradley-Terry annotator over the gold score answers each pair in the
              store (annotator 'simulated'); 'web': wait until people have labelled the round's
              quota through `rlhf-jax serve --data=<workdir>/labels` (the queue shows these pairs);
  3. shift    the previous round's reward model's accuracy on the new pairs, before training on
              them: how far the policy moved from the data the reward model knew;
  4. reward   export every label so far to <round>/tfds and train a reward model on it, continuing
              from the previous round's (continue_reward; round 0 and False: from SFT);
  5. policy   continue PPO (or DPO) from the current policy; the frozen reference is the SFT
              policy (reference='sft') or the current one (reference='previous');
  6. judge    the new policy on the same held-out prompts as every round: gold score, KL to SFT.

Every step leaves its result on disk (the store, DONE markers of the stages, <round>/round.json),
so a killed run resumes where it stopped. At the end: rounds.md (a table per round) and rounds.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from rlhf_jax.data import builders, loaders
from rlhf_jax.models import evaluation
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import label_store, labelers
from rlhf_jax.runtime import checkpoints, config as config_lib
from rlhf_jax.runtime.plotting import plt  # (plotting selects the Agg backend first)
from rlhf_jax.stages import preferences, registry, runs

STORE_DIR = "labels"
ROUND_FILE = "round.json"
SIMULATED = "simulated"


@dataclasses.dataclass
class RoundResult:
    """One row of the report."""

    round: int
    policy: str  # the run this round trained
    new_pairs: int  # pairs sampled this round (train + validation)
    labelled_pairs: int  # preference records (every round so far) the reward model trained on
    label_gold_agreement: Optional[float]  # this round's labels agree with the gold score
    rm_accuracy_before: Optional[float]  # the previous reward model on this round's pairs (None in round 0)
    rm_accuracy_after: float  # this round's reward model on this round's held-out pairs
    gold: float
    gold_sem: float
    kl: float  # sequence KL of the new policy to the SFT policy (nats)
    kl_sem: float


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, f"round_{r}")


def source_of(r: int) -> str:
    return f"round-{r}"


# ----------------------------------------------------------------------------- the base policy


def base_policy(config, workdir: str) -> str:
    """The SFT run every round is measured against: config.base_policy, or pre-train -> SFT."""
    if config.base_policy:
        return config.base_policy
    pretrain_dir, sft_dir = (os.path.join(workdir, "base", name) for name in ("pretrain", "sft"))
    for name, stage_dir, init_from in (("pretrain", pretrain_dir, ""), ("sft", sft_dir, pretrain_dir)):
        stage = config[name]
        with stage.unlocked():
            stage.model = config.pretrain.model
            if init_from:
                stage.init_from = init_from
        registry.run_stage_once(stage, stage_dir, f"base {name}")
    return sft_dir


# ----------------------------------------------------------------------------- 1. pairs


def fresh_prompts(config, split: str, num: int, r: int) -> list[dict]:
    """Round r's block of `num` prompts of a fixed shuffle of `split`: no two rounds share one."""
    pcfg = config.pairs
    source = builders.load_dataset(pcfg.prompts, config.data_dir)[split]
    order = np.random.default_rng(config.seed).permutation(len(source))
    block = order[r * num:(r + 1) * num]
    if len(block) < num:
        raise config_lib.ConfigError(
            f"rounds: round {r} needs prompts {r * num}..{(r + 1) * num - 1} of the {split!r} split, which has "
            f"{len(source)}; lower pairs.num_prompts / pairs.num_validation_prompts or num_rounds")
    return [{"prompt": p} for p in loaders.prompt_texts(source, [int(i) for i in block])]


def sample_round_pairs(config, policy_dir: str, r: int) -> list[dict]:
    """Round r's pairs from the policy in `policy_dir` (deterministic in seed and round)."""
    pcfg = config.pairs
    run_config = config_lib.read_resolved_config(policy_dir)
    tokenizer = make_tokenizer(run_config.get("tokenizer"))
    _, graphdef, params = runs.load_policy(policy_dir)
    pairs = []
    for split, prompt_split, num in (("train", pcfg.train_split, pcfg.num_prompts),
                                     ("validation", pcfg.validation_split, pcfg.num_validation_prompts)):
        if not num:
            continue
        prompts = fresh_prompts(config, prompt_split, num, r)
        rows = []
        for _, items in preferences.sample_responses(
                graphdef, params, tokenizer, prompts, num_prompts=num, samples_per_prompt=pcfg.samples_per_prompt,
                batch_size=pcfg.batch_size, max_prompt_len=pcfg.max_prompt_len, max_new_tokens=pcfg.max_new_tokens,
                temperature=pcfg.temperature, top_k=pcfg.top_k, top_p=pcfg.top_p,
                seed=config.seed * 1000 + r * 10 + (split == "validation")):
            rows += [{"split": split, **item} for item in items]
        for pair in preferences.make_pairs(rows, pcfg.pairing):
            pairs.append({**pair, "id": f"r{r}-{pair['id']}", "round": r, "policy": policy_dir})
    return pairs


# ----------------------------------------------------------------------------- 2. labels


def label_simulated(config, store: label_store.LabelStore, r: int) -> None:
    """The simulated annotator answers round r's pairs it has not answered (a resumed run goes on)."""
    pcfg = config.pairs
    gold = labelers.load_function(pcfg.gold)
    annotate = labelers.simulated_annotator(gold, pcfg.noise_temperature,
                                            np.random.default_rng(config.seed * 1000 + r))
    answered = {a.pair_id for a in store.answers(SIMULATED)}
    for pair in store.pairs(source_of(r)):
        result = annotate(pair.prompt, pair.response_a, pair.response_b)  # drawn for every pair: same rng stream
        if pair.id in answered:
            continue
        store.answer(pair.id, SIMULATED, "left" if result["choice"] == 0 else "right", "ab",
                     request_id=f"{SIMULATED}-{pair.id}",
                     metadata={k: result[k] for k in ("p_a", "gold_a", "gold_b")})


def wait_for_people(config, store: label_store.LabelStore, r: int, workdir: str) -> None:
    """Block until the round's quota of train pairs is labelled through the web app."""
    num_train = sum(p.split == "train" for p in store.pairs(source_of(r)))
    quota = config.quota or num_train
    while True:
        labelled = sum(rec["metadata"]["split"] == "train" for rec in store.preferences(source_of(r)))
        if labelled >= quota:
            return
        print(f"round {r}: {labelled} of {quota} pairs labelled; waiting for people "
              f"(rlhf-jax serve --data={os.path.join(workdir, STORE_DIR)})", file=sys.stderr, flush=True)
        time.sleep(config.web_poll_seconds)


# ----------------------------------------------------------------------------- 3. and 6. measuring


def reward_accuracy(reward_dir: str, records: list[dict]) -> Optional[float]:
    """Fraction of preference records whose chosen response the reward model scores higher."""
    if not records:
        return None
    run_config = config_lib.read_resolved_config(reward_dir)
    reward = evaluation.make_reward(runs.load_reward_model(reward_dir), make_tokenizer(run_config.get("tokenizer")),
                                    int(run_config.seq_len))
    prompts = [rec["prompt"] for rec in records]
    chosen = np.asarray(reward(prompts, [rec["chosen"] for rec in records]))
    rejected = np.asarray(reward(prompts, [rec["rejected"] for rec in records]))
    return float(np.mean(chosen > rejected))


def held_out_prompts(config) -> list[str]:
    source = builders.load_dataset(config.pairs.prompts, config.data_dir)[config.pairs.validation_split]
    # The last prompts of the split: the rounds' validation pairs take blocks from a shuffle of the
    # whole split, so an overlap is possible but the report's prompts are the same every round.
    n = min(config.eval.num_prompts, len(source))
    return loaders.prompt_texts(source, list(range(len(source) - n, len(source))))


def make_judge(config, sft_dir: str):
    """judge(policy_dir) -> gold, KL to SFT (rlhf_jax.models.evaluation, the pipeline's evaluation)."""
    run_config = config_lib.read_resolved_config(sft_dir)
    tokenizer = make_tokenizer(run_config.get("tokenizer"))
    _, graphdef, params = runs.load_policy(sft_dir)
    evaluate = evaluation.make_policy_evaluator(
        (graphdef, params), tokenizer, held_out_prompts(config), gold_fn=labelers.load_function(config.eval.gold),
        max_prompt_len=config.pairs.max_prompt_len, max_new_tokens=config.eval.max_new_tokens,
        temperature=config.eval.temperature)

    def judge(policy_dir: str) -> dict:
        _, g, p = runs.load_policy(policy_dir)
        return evaluate(g, p)

    return judge


# ----------------------------------------------------------------------------- 4. and 5. training


def wire_round(config, r: int, workdir: str, sft_dir: str, policy_dir: str):
    """(reward config, policy config) of round r, their init / reference / data paths filled in."""
    here = round_dir(workdir, r)
    tfds_dir = os.path.join(here, "tfds")
    model = config_lib.read_resolved_config(sft_dir).model  # every round trains the SFT run's model
    reward = config.reward.copy_and_resolve_references()
    with reward.unlocked():
        reward.model = model
        reward.init_from = sft_dir
        # Continue from the previous round's reward model: it trains on all labels so far either way.
        reward.continue_from = os.path.join(round_dir(workdir, r - 1), "reward") if r > 0 and config.continue_reward else ""
        reward.data = config.pairs.dataset.copy_and_resolve_references()
        reward.data_dir = tfds_dir
        reward.preferences.enabled = False
        # Rewards are normalised on samples of the policy PPO will start from this round.
        reward.preferences.policy = policy_dir
    stage = config.policy_stage
    policy = config[stage].copy_and_resolve_references()
    with policy.unlocked():
        policy.model = model
        policy.init_from = policy_dir
        policy.reference_from = sft_dir if config.reference == "sft" else ""
        if stage == "ppo":
            policy.reward_model = os.path.join(here, "reward")
            policy.reward_function = ""
        else:
            policy.data = config.pairs.dataset.copy_and_resolve_references()
            policy.data_dir = tfds_dir
            policy.preferences.enabled = False
    return reward, policy


def check_config(config) -> None:
    if config.num_rounds < 1:
        raise config_lib.ConfigError(f"num_rounds={config.num_rounds}: expected >= 1")
    if config.policy_stage not in ("ppo", "dpo"):
        raise config_lib.ConfigError(f"policy_stage={config.policy_stage!r}: expected 'ppo' or 'dpo'")
    if config.reference not in ("sft", "previous"):
        raise config_lib.ConfigError(f"reference={config.reference!r}: expected 'sft' or 'previous'")
    if config.labeler not in (SIMULATED, "web"):
        raise config_lib.ConfigError(f"labeler={config.labeler!r}: expected 'simulated' or 'web'")
    if "dataset" not in config.pairs:
        raise config_lib.ConfigError("config.pairs.dataset is missing: the preference dataset each round writes and its "
                                     "stages read (since 2026-12-02 the experiment file sets it: "
                                     "datasets.preferences('preferences'))")
    if config.pairs.num_prompts < 1 or config.pairs.samples_per_prompt < 2:
        raise config_lib.ConfigError("pairs.num_prompts must be >= 1 and pairs.samples_per_prompt >= 2")


# ----------------------------------------------------------------------------- the driver


def run_rounds(spec: str, overrides, workdir: str) -> list[RoundResult]:
    """`rlhf-jax rounds --config=<spec> --workdir=<workdir>`."""
    return run_rounds_from_config(config_lib.load_config(spec, overrides), workdir)


def run_rounds_from_config(config, workdir: str) -> list[RoundResult]:
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_resolved_config(config, workdir, allow_change=True)
    sft_dir = base_policy(config, workdir)
    store = label_store.LabelStore(os.path.join(workdir, STORE_DIR, label_store.STORE_FILE),
                                   answers_per_pair=config.answers_per_pair)
    judge = None
    baseline_path = os.path.join(workdir, "sft_eval.json")
    if not os.path.exists(baseline_path):
        judge = make_judge(config, sft_dir)
        m = judge(sft_dir)
        _write_json(baseline_path, {k: m[k] for k in ("gold", "gold_sem", "kl", "kl_sem")})
    results = []
    policy_dir = sft_dir
    for r in range(config.num_rounds):
        here = round_dir(workdir, r)
        os.makedirs(here, exist_ok=True)
        done_path = os.path.join(here, ROUND_FILE)
        if os.path.exists(done_path):
            with open(done_path) as f:
                result = RoundResult(**json.load(f))
            print(f"=== round {r}: finished earlier", file=sys.stderr, flush=True)
            results.append(result)
            policy_dir = result.policy
            continue
        reward_config, policy_config = wire_round(config, r, workdir, sft_dir, policy_dir)
        registry.validate(reward_config, prefix="reward.")
        registry.validate(policy_config, prefix=f"{config.policy_stage}.")

        # 1. pairs from the current policy (once: the marker says they are all in the store).
        pairs_marker = os.path.join(here, "pairs.done")
        if not os.path.exists(pairs_marker):
            print(f"=== round {r}: sampling pairs from {policy_dir}", file=sys.stderr, flush=True)
            pairs = sample_round_pairs(config, policy_dir, r)
            store.add_pairs(pairs, source=source_of(r))
            _write_json(pairs_marker, {"num_pairs": len(pairs)})
        # 2. labels.
        if config.labeler == SIMULATED:
            label_simulated(config, store, r)
        else:
            wait_for_people(config, store, r, workdir)
        new_records = store.preferences(source_of(r))
        # 3. the distribution shift: the previous reward model on pairs of the moved policy.
        previous_reward = os.path.join(round_dir(workdir, r - 1), "reward") if r > 0 else None
        rm_before = reward_accuracy(previous_reward, new_records) if previous_reward else None
        # 4. the reward model on every label so far.
        reward_dir = os.path.join(here, "reward")
        all_records = store.preferences()
        if not checkpoints.is_finished(reward_dir):
            store.export_preferences(os.path.join(here, "tfds"), records=all_records)
        # (DPO does not use it, but the report's distribution-shift number needs a reward model.)
        registry.run_stage_once(reward_config, reward_dir, f"round {r} reward")
        held_out_new = [rec for rec in new_records if rec["metadata"]["split"] == "validation"]
        rm_after = reward_accuracy(reward_dir, held_out_new or new_records)
        # 5. the policy, continued from the current one.
        next_policy = os.path.join(here, config.policy_stage)
        registry.run_stage_once(policy_config, next_policy, f"round {r} {config.policy_stage}")
        # 6. judged on the held-out prompts.
        judge = judge or make_judge(config, sft_dir)
        m = judge(next_policy)
        gold_fn = labelers.load_function(config.pairs.gold)  # how good this round's labels were
        agree = [gold_fn(rec["prompt"], rec["chosen"]) > gold_fn(rec["prompt"], rec["rejected"])
                 for rec in new_records
                 if gold_fn(rec["prompt"], rec["chosen"]) != gold_fn(rec["prompt"], rec["rejected"])]
        result = RoundResult(round=r, policy=next_policy, new_pairs=len(store.pairs(source_of(r))),
                             labelled_pairs=len(all_records), label_gold_agreement=float(np.mean(agree)) if agree else None,
                             rm_accuracy_before=rm_before, rm_accuracy_after=rm_after if rm_after is not None else float("nan"),
                             gold=m["gold"], gold_sem=m["gold_sem"], kl=m["kl"], kl_sem=m["kl_sem"])
        _write_json(done_path, dataclasses.asdict(result))
        print(f"=== round {r}: gold {result.gold:+.3f}, KL {result.kl:.2f}, reward model accuracy on the new pairs "
              f"before {rm_before} / after {rm_after}", file=sys.stderr, flush=True)
        results.append(result)
        policy_dir = next_policy
    write_report(workdir, results)
    return results


def write_report(workdir: str, results: list[RoundResult]) -> None:
    """rounds.md: one row per round (and the SFT policy); rounds.png: gold, KL and the reward model's
    accuracy on each round's new pairs before / after training on them."""

    with open(os.path.join(workdir, "sft_eval.json")) as f:
        sft = json.load(f)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    lines = ["# Rounds", "", f"workdir: `{workdir}`; held-out gold score and KL to the SFT policy of each round's "
             "policy; the reward model's accuracy on the round's new pairs before (previous round's model) "
             "and after (this round's, held-out pairs) training on them.", "",
             "| round | pairs new / all labelled | labels agree with gold | RM acc. before | RM acc. after | gold | KL |",
             "|---|---|---|---|---|---|---|",
             f"| SFT | - | - | - | - | {sft['gold']:+.3f} +- {sft['gold_sem']:.3f} | {sft['kl']:.2f} |"]
    for res in results:
        lines.append(f"| {res.round} | {res.new_pairs} / {res.labelled_pairs} | {fmt(res.label_gold_agreement)} | "
                     f"{fmt(res.rm_accuracy_before)} | {fmt(res.rm_accuracy_after)} | "
                     f"{res.gold:+.3f} +- {res.gold_sem:.3f} | {res.kl:.2f} +- {res.kl_sem:.2f} |")
    with open(os.path.join(workdir, "rounds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    xs = [-1] + [res.round for res in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].errorbar(xs, [sft["gold"]] + [res.gold for res in results],
                     yerr=[sft["gold_sem"]] + [res.gold_sem for res in results], marker="o")
    axes[0].set_title("held-out gold score")
    axes[1].errorbar(xs, [sft["kl"]] + [res.kl for res in results],
                     yerr=[sft["kl_sem"]] + [res.kl_sem for res in results], marker="o")
    axes[1].set_title("KL to SFT (nats)")
    before = [(res.round, res.rm_accuracy_before) for res in results if res.rm_accuracy_before is not None]
    if before:
        axes[2].plot(*zip(*before), marker="o", label="before (previous RM)")
    axes[2].plot([res.round for res in results], [res.rm_accuracy_after for res in results], marker="s",
                 label="after (this round's RM)")
    axes[2].set_title("RM accuracy on the round's new pairs")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("round (-1 = SFT)")
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "rounds.png"), dpi=100)
    plt.close(fig)
    print(f"report: {os.path.join(workdir, 'rounds.md')}, {os.path.join(workdir, 'rounds.png')}", flush=True)


def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
