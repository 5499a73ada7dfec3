"""The reward model: the SFT model with its unembedding replaced by a scalar head, trained on
pairwise preferences with the Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected [- margin]).

    rlhf-jax train --config=experiments/reviews/reward.py --workdir=runs/reviews/reward

The stage (config.stage == 'reward'):
  1. preferences: with config.preferences.enabled, sample / pair / label into
     <workdir>/preferences (rlhf_jax.stages.preferences.make_preferences, idempotent); else read
     config.data (e.g. `preferences_jsonl` for an imported file);
  2. params: those of the SFT run config.init_from, unembedding -> scalar head
     (model.replace_head_with_scalar: a pytree operation, the trunk is copied as is);
  3. train: pure jitted train_step(state, batch, rng), state {'params', 'opt_state'} sharded by
     the mesh like every supervised step (optim.make_train_step); metrics loss, accuracy, margin_mean, reward_mean,
     reward_std, grad_norm;
  4. eval on held-out pairs (the 'validation' split): eval/accuracy against the labels,
     eval/gold_accuracy against the gold score's ordering, eval/loss, and eval/spearman, the rank
     correlation between reward and gold score (VADER of the response) over held-out responses;
  5. normalisation (config.normalize.enabled): score the SFT policy's samples on prompts and store
     (mean, std) in <workdir>/reward_normalization.json, so (r - mean) / std has mean 0 / std 1
     on them (the samples and their rewards go to normalization_samples.jsonl).

The reward is the scalar head's output at the LAST REAL token of prompt + response + EOS, the
position max{t : attention_mask[t] = 1} (= mask.sum(-1) - 1 for right padding); positions come
from the mask, so left-padded prompts score like unpadded ones.

Later stages load a finished reward run with `rlhf_jax.stages.runs.load_reward_model(workdir)` ->
(model_config, graphdef, params, {'mean', 'std'}) and score with
`model.reward_scores(graphdef, params, tokens [B, T], attention_mask [B, T]) -> [B]` (raw, jittable).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import jax
import numpy as np

from rlhf_jax import losses
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import evaluation, lora, model as model_lib, sampling
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib, distributed, mesh as mesh_lib, run as run_lib
from rlhf_jax.runtime.optim import check_optimizer_config, make_optimizer, make_train_step
from rlhf_jax.stages import preferences, runs

NORMALIZATION_FILE = runs.NORMALIZATION_FILE
NORMALIZATION_SAMPLES_FILE = "normalization_samples.jsonl"


# ----------------------------------------------------------------------------- the step


def preference_loss(params, graphdef, batch, use_margin: bool, center_coef: float):
    """Bradley-Terry loss of a batch dict(chosen_tokens, chosen_mask, rejected_tokens,
    rejected_mask [B, T], margin [B]) -> (loss, metrics)."""
    r_chosen = model_lib.reward_scores(graphdef, params, batch["chosen_tokens"], batch["chosen_mask"])
    r_rejected = model_lib.reward_scores(graphdef, params, batch["rejected_tokens"], batch["rejected_mask"])
    margin = batch["margin"] if use_margin else None
    return losses.bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)


def make_bradley_terry_step(graphdef, optimizer, mesh, state_shardings, loss_config, lora_config=None, base=None):
    """jit(train_step)(state, batch, rng) -> (state, metrics): the supervised step with the BT loss.
    With LoRA the state's params are {'lora', 'scalar_head'} and `base` the frozen trunk."""
    use_margin, center_coef = bool(loss_config.use_margin), float(loss_config.center_coef)
    return make_train_step(
        lambda params, batch, base=None: preference_loss(lora.combine(params, base, lora_config), graphdef, batch,
                                                         use_margin, center_coef),
        optimizer, mesh, state_shardings, frozen=base)


# ----------------------------------------------------------------------------- evaluation


def rank_correlation(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks, ties given their average rank."""
    def ranks(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def make_eval_fn(score, pairs: list[dict], gold_fn):
    """eval_fn(state, step) on held-out pairs [{'prompt', 'chosen', 'rejected'}]."""
    prompts = [p["prompt"] for p in pairs]
    # Unique held-out responses (a response can appear in several pairs) and their gold scores.
    texts = sorted({(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")})
    gold = np.asarray([gold_fn(p, r) for p, r in texts])
    gold_of = dict(zip(texts, gold))
    gold_diff = np.asarray([gold_of[(p["prompt"], p["chosen"])] - gold_of[(p["prompt"], p["rejected"])]
                            for p in pairs])

    def eval_fn(state, step):
        params = mesh_lib.host_copy(state["params"])  # (each process scores every pair itself)
        r_chosen = score(params, prompts, [p["chosen"] for p in pairs])
        r_rejected = score(params, prompts, [p["rejected"] for p in pairs])
        diff = r_chosen - r_rejected
        rewards = score(params, [p for p, _ in texts], [r for _, r in texts])
        decided = gold_diff != 0
        return {"eval/accuracy": float(np.mean(diff > 0)),
                "eval/loss": float(np.mean(np.logaddexp(0.0, -diff))),
                "eval/gold_accuracy": float(np.mean((diff[decided] > 0) == (gold_diff[decided] > 0)))
                if decided.any() else 0.0,
                "eval/spearman": rank_correlation(rewards, gold),
                "eval/num_pairs": len(pairs)}

    return eval_fn


# ----------------------------------------------------------------------------- normalisation


def fit_normalization(scores) -> dict:
    """{'mean', 'std'} of raw rewards (population std), so (r - mean) / std has mean 0, std 1."""
    scores = np.asarray(scores, np.float64)
    return {"mean": float(scores.mean()), "std": float(max(scores.std(), 1e-8))}


def normalize(scores, normalization: dict):
    return (scores - normalization["mean"]) / normalization["std"]


def normalize_on_policy_samples(config, workdir, score, params, tokenizer) -> dict:
    """Sample the SFT policy on config.normalize prompts, fit (mean, std) of their rewards, and
    write reward_normalization.json (+ the samples). Returns the normalization dict."""
    ncfg = config.normalize
    policy_dir = config.preferences.policy or config.init_from
    _, policy_graphdef, policy_params = runs.load_policy(policy_dir)
    source = builders.load_dataset(config.preferences.prompts, config.data_dir)[ncfg.split]
    prompts, responses = [], []
    for _, items in preferences.sample_responses(
            policy_graphdef, policy_params, tokenizer, source, num_prompts=ncfg.num_prompts,
            samples_per_prompt=ncfg.samples_per_prompt, batch_size=ncfg.batch_size,
            max_prompt_len=ncfg.max_prompt_len, max_new_tokens=ncfg.max_new_tokens,
            temperature=ncfg.temperature, seed=ncfg.seed):
        for item in items:
            prompts += [item["prompt"]] * len(item["responses"])
            responses += item["responses"]
    raw = score(params, prompts, responses)
    normalization = {**fit_normalization(raw), "num_samples": len(raw), "policy": policy_dir,
                     "split": ncfg.split,
                     "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if not distributed.is_main_process():  # Every process sampled and scored the same rows; 0 writes.
        return normalization
    with open(os.path.join(workdir, NORMALIZATION_SAMPLES_FILE), "w", encoding="utf-8") as f:
        for p, r, s in zip(prompts, responses, raw):
            f.write(json.dumps({"prompt": p, "response": r, "reward": float(s)}, ensure_ascii=False) + "\n")
    path = os.path.join(workdir, NORMALIZATION_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(normalization, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"reward normalization: mean {normalization['mean']:.4g} std {normalization['std']:.4g} "
          f"over {len(raw)} policy samples", file=sys.stderr, flush=True)
    return normalization


# ----------------------------------------------------------------------------- the stage


def init_reward_params(config):
    """The SFT run's params with a fresh scalar head, or with `continue_from` an earlier reward run's
    params (head included: rounds retrain on more labels without starting over).
    Returns (model_config, graphdef, params)."""
    if config.get("continue_from"):
        model_config, graphdef, params, _ = runs.load_reward_model(config.continue_from)
        changed = config_lib.differing_keys(model_config, config.model)
        if changed:
            raise config_lib.ConfigError(f"reward: config.model differs from the model of {config.continue_from} "
                                         f"(continue_from) in {changed}")
        return model_config, graphdef, params
    model_config, graphdef, params = runs.load_matching_policy(config.init_from, config.model, "reward",
                                                                config.get("init_from_unfinished", False))
    graphdef, params = model_lib.replace_head_with_scalar(graphdef, params, model_config, seed=config.seed)
    return model_config, graphdef, params


def train(config, workdir: str):
    mesh = mesh_lib.make_mesh(config.mesh)
    model_config, graphdef, params = init_reward_params(config)
    tokenizer = make_tokenizer(config.tokenizer, model_config.vocab_size)
    data = preferences.preference_data(config, workdir)
    train_batches = loaders.preference_batches(data["train"], tokenizer, config.seq_len, config.batch_size,
                                               config.seed, pad_to_multiple=config.get("pad_to_multiple", 0))
    optimizer = make_optimizer(config.optimizer)
    lora_config = config.get("lora")
    trainable, base = lora.split(params, lora_config, config.seed, heads=("scalar_head",))
    if base is not None:
        base = mesh_lib.shard_state(base, mesh)[0]
    state, shardings = mesh_lib.shard_state({"params": trainable, "opt_state": optimizer.init(trainable)}, mesh)
    step_fn = make_bradley_terry_step(graphdef, optimizer, mesh, shardings, config.loss, lora_config, base)
    merged = jax.jit(lambda trainable, base: lora.combine(trainable, base, lora_config))
    score_merged = evaluation.make_scorer(graphdef, tokenizer, config.seq_len)
    # Eval scores with the full params: with LoRA a merged, transient copy.
    score = score_merged if base is None else (lambda params, *texts: score_merged(merged(params, base), *texts))

    eval_fn = None
    if "validation" in data and len(data["validation"]):
        held_out = loaders.read_all(data["validation"])
        if config.eval_max_pairs:
            held_out = held_out[:config.eval_max_pairs]
        eval_fn = make_eval_fn(score, held_out, labelers.load_function(config.eval_gold))

    state = run_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, rng=jax.random.key(config.seed),
        batch_fn=lambda step: mesh_lib.shard_batch(train_batches[step], mesh),
        num_steps=config.num_steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        eval_fn=eval_fn, eval_every=config.eval_every, progress_every_s=config.get("progress_every_s", 10.0),
        headline=("loss", "accuracy", "eval/accuracy", "eval/spearman"))

    distributed.barrier("reward: trained")  # (every process decides from the same files)
    normalization = None
    if config.normalize.enabled:
        path = os.path.join(workdir, NORMALIZATION_FILE)
        if os.path.exists(path):  # (fitted before an interruption: the samples are not drawn twice)
            with open(path) as f:
                normalization = json.load(f)
        else:
            normalization = normalize_on_policy_samples(config, workdir, score, state["params"], tokenizer)
    adapters = state["params"] if base is not None else None  # (PPO can hold these on its own trunk)
    full = state["params"] if base is None else merged(state["params"], base)
    runs.write_reward_model(workdir, config, full, normalization, adapters=adapters)
    return state


# ----------------------------------------------------------------------------- the checkpointed state (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of the checkpointed {'params', 'opt_state'} (head 'scalar')."""
    return runs.supervised_abstract_state(config, "scalar")[1]


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_config(c):
    """The reward stage's fields (and config.preferences when it makes its own pairs)."""
    run_lib.check_loop_config(c), check_optimizer_config(c), mesh_lib.check_batch_split(c)
    model_lib.check_model_config(c), model_lib.check_sequence_config(c)
    runs.check_init_from(c, required=True)
    lora.check_lora_config(c)
    preferences.check_preferences_config(c)
    c.number("loss.center_coef", 0.0)
    c.integer("eval_max_pairs", 0)
    c.function_path("eval_gold")
    if c.get("normalize.enabled"):
        sampling.check_sampling_config(c, "normalize")
        c.integer("normalize.samples_per_prompt", 1)
