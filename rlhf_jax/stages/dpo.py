"""Preference optimisation without RL: DPO and its variants, on the reward stage's pairs.

    rlhf-jax train --config=experiments/reviews/dpo.py --workdir=runs/reviews/dpo

No reward model, no sampling during training: the SFT policy is trained directly on the pairs
(prompt, chosen, rejected) to raise the log-ratio of the chosen response against a frozen
reference (the SFT params), with a loss chosen by name (`losses.dpo_loss`: sigmoid = DPO,
robust, ipo, hinge, simpo). For the pair's summed response log-probs pi_c, pi_r under the policy
and ref_c, ref_r under the reference, DPO minimises

    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

so beta is the KL knob: the optimum of the KL-regularised objective with coefficient beta.

One step (pure, jitted, sharded like every supervised step: optim.make_train_step):
    chosen and rejected rows [B, T] go through ONE forward pass as a [2B, T] batch;
    sequence log-probs of their response tokens (model.sequence_logprobs) -> dpo_loss.
The reference log-probs come in the batch: computed for every pair once before training
(`precompute_ref_logps`, the default: an epoch then costs one policy forward/backward per pair)
or per batch on the host side of the loop.

Train state {'params', 'opt_state'} (a leading seed axis with num_seeds > 1: the step is
vmapped, each seed reads the pairs in its own order). With LoRA (`lora.rank` > 0) the params are
the adapters and the reference is the base they are added to: the SFT weights are held once. Metrics: loss and `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`
(TRL's names); every eval_every steps the same on held-out pairs (eval/...), and eval/gold,
eval/kl of samples on held-out prompts (rlhf_jax.models.evaluation, one evaluation for every method).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import evaluation, lora, model as model_lib
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import mesh as mesh_lib, metrics as metrics_lib, run as run_lib
from rlhf_jax.runtime.optim import check_optimizer_config, make_optimizer, make_train_step
from rlhf_jax.stages import preferences, runs

# ----------------------------------------------------------------------------- the loss


def pair_logprobs(graphdef, params, batch):
    """Summed response log-probs of both sides in one forward pass: (chosen [B], rejected [B])."""
    cat = lambda name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)
    logps = model_lib.sequence_logprobs(graphdef, params, cat("tokens"), cat("mask"), cat("loss_mask"))
    b = batch["chosen_tokens"].shape[0]
    return logps[:b], logps[b:]


def pair_loss(params, graphdef, batch, loss_config):
    """losses.dpo_loss of a batch: dict of preference_batches' arrays + ref_chosen_logps,
    ref_rejected_logps [B]. Returns (loss, metrics)."""
    chosen, rejected = pair_logprobs(graphdef, params, batch)
    return losses.dpo_loss(
        chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], kind=loss_config.kind,
        beta=loss_config.beta, label_smoothing=loss_config.label_smoothing,
        chosen_lengths=jnp.sum(batch["chosen_loss_mask"], axis=1),
        rejected_lengths=jnp.sum(batch["rejected_loss_mask"], axis=1), simpo_gamma=loss_config.simpo_gamma)


# ----------------------------------------------------------------------------- reference log-probs


def all_pair_batches(source, tokenizer, seq_len: int, batch_size: int, pad_to_multiple: int = 0) -> list:
    """Every pair of a source, in stored order, as fixed-size batches (the last one padded by
    repeating the first pair; `n` says how many rows are real): [(batch, n)]."""
    examples = loaders.read_all(source)
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        padded = chunk + [examples[0]] * (batch_size - len(chunk))
        out.append((loaders.preference_batches(padded, tokenizer, seq_len, batch_size, 0, shuffle=False,
                                                pad_to_multiple=pad_to_multiple)[0], len(chunk)))
    return out


def logprobs_of_all_pairs(logprob_fn, params, pair_batches) -> np.ndarray:
    """[N, 2] (chosen, rejected) summed response log-probs of every pair of all_pair_batches."""
    out = []
    for batch, n in pair_batches:
        chosen, rejected = mesh_lib.host_copy(logprob_fn(params, batch))  # (whole, on every process)
        out.append(np.stack([chosen, rejected], axis=1)[:n])
    return np.concatenate(out) if out else np.zeros([0, 2], np.float32)


# ----------------------------------------------------------------------------- evaluation


def make_eval_fn(config, graphdef, ref_params, tokenizer, held_out, held_out_ref, logprob_fn, policy_of):
    """eval_fn(state, step): dpo_loss metrics on held-out pairs and the shared policy evaluation
    (gold score and KL to the SFT policy of samples on held-out prompts), per seed.
    policy_of(one seed's trained params) -> the params the model runs with (LoRA merged)."""
    ecfg = config.eval_prompts
    prompts = loaders.prompt_texts(*_prompt_split(config))
    gold_fn = labelers.load_function(config.gold_function) if config.gold_function else None
    evaluate = evaluation.make_policy_evaluator(
        (graphdef, ref_params), tokenizer, prompts, gold_fn=gold_fn, max_prompt_len=ecfg.max_prompt_len,
        max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, seed=config.seed)
    loss_fn = jax.jit(lambda logps, ref: losses.dpo_loss(
        logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], kind=config.loss.kind, beta=config.loss.beta,
        label_smoothing=config.loss.label_smoothing, chosen_lengths=held_out["lengths"][:, 0],
        rejected_lengths=held_out["lengths"][:, 1], simpo_gamma=config.loss.simpo_gamma)[1])

    def eval_one(params):
        params, metrics = policy_of(params), {}
        if held_out["batches"]:
            logps = logprobs_of_all_pairs(logprob_fn, params, held_out["batches"])
            metrics = {f"eval/{k}": v for k, v in mesh_lib.host_copy(loss_fn(logps, held_out_ref)).items()}
        policy = evaluate(graphdef, params)
        metrics.update({f"eval/{k}": policy[k] for k in ("kl", "gold", "length") if k in policy})
        return metrics

    def eval_fn(state, step):
        if config.num_seeds == 1:
            return eval_one(state["params"])
        per_seed = [eval_one(jax.tree.map(lambda x: x[i], state["params"])) for i in range(config.num_seeds)]
        return metrics_lib.seed_summary({k: np.asarray([m[k] for m in per_seed]) for k in per_seed[0]})

    return eval_fn


def _prompt_split(config):
    """(source, indices) of the held-out prompts the samples are drawn on."""
    ecfg = config.eval_prompts
    source = builders.load_dataset(ecfg.data, ecfg.data_dir)[ecfg.split]
    return source, range(min(ecfg.num, len(source)))


# ----------------------------------------------------------------------------- the stage


def train(config, workdir: str):
    mesh = mesh_lib.make_mesh(config.mesh)
    model_config, graphdef, init_params = runs.load_matching_policy(config.init_from, config.model, "dpo",
                                                                    config.get("init_from_unfinished", False))
    ref_params = runs.load_reference(config, init_params, "dpo")
    tokenizer = make_tokenizer(config.tokenizer, model_config.vocab_size)
    data = preferences.preference_data(config, workdir)
    optimizer = make_optimizer(config.optimizer)
    num_seeds = config.num_seeds

    lora_config = config.get("lora")
    per_seed = []
    for seed in run_lib.seeds_of(config):
        trainable = lora.split(init_params, lora_config, seed)[0]  # init_from's params, or adapters on them
        per_seed.append({"params": trainable, "opt_state": optimizer.init(trainable)})
    state = per_seed[0] if num_seeds == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed)
    state = jax.tree.map(jnp.array, state)  # own copy: the step donates it, the reference stays
    shardings = mesh_lib.param_shardings(mesh, per_seed[0])
    if num_seeds > 1:
        shardings = mesh_lib.stacked(shardings)
    state = jax.device_put(state, shardings)
    ref_params = jax.device_put(ref_params, mesh_lib.param_shardings(mesh, ref_params))
    base = ref_params if lora.enabled(lora_config) else None  # the reference is the base: one copy
    step_fn = make_train_step(
        lambda params, batch, base=None: pair_loss(lora.combine(params, base, lora_config), graphdef, batch,
                                                   config.loss),
        optimizer, mesh, shardings, num_seeds, frozen=base)
    merged = jax.jit(lambda trainable, base: lora.combine(trainable, base, lora_config))
    policy_of = (lambda params: params) if base is None else (lambda params: merged(params, base))

    # Reference log-probs: once for every pair (train and held-out), or per batch.
    pad = config.get("pad_to_multiple", 0)
    logprob_fn = jax.jit(lambda params, batch: pair_logprobs(graphdef, params, batch))
    uses_ref = config.loss.kind != "simpo"  # SimPO is reference-free
    train_ref = None
    if config.precompute_ref_logps and uses_ref:
        train_ref = logprobs_of_all_pairs(
            logprob_fn, ref_params, all_pair_batches(data["train"], tokenizer, config.seq_len, config.batch_size,
                                                    pad))
    train_batches = [loaders.preference_batches(data["train"], tokenizer, config.seq_len, config.batch_size, seed,
                                                pad_to_multiple=pad)
                     for seed in run_lib.seeds_of(config)]

    def with_ref(batch):
        if not uses_ref:
            zeros = np.zeros(batch["index"].shape, np.float32)
            return dict(batch, ref_chosen_logps=zeros, ref_rejected_logps=zeros)
        if train_ref is not None:
            ref = train_ref[batch["index"]]
        else:
            ref = np.stack(mesh_lib.host_copy(logprob_fn(ref_params, batch)), axis=1)
        return dict(batch, ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])

    def batch_fn(step):
        per_seed = [with_ref(batches[step]) for batches in train_batches]
        if num_seeds == 1:
            return mesh_lib.shard_batch(per_seed[0], mesh)
        width = max(b["chosen_tokens"].shape[1] for b in per_seed)
        per_seed = [loaders.widen(b, width, tokenizer.pad_id) for b in per_seed]
        sharding = mesh_lib.stacked(mesh_lib.batch_sharding(mesh))
        return {k: mesh_lib.put_global(np.stack([b[k] for b in per_seed]), sharding)
                for k in per_seed[0]}

    eval_fn = None
    if config.eval_every:
        # The held-out pairs are tokenized once; every eval reuses the batches.
        held_out = {"batches": [], "lengths": np.zeros([0, 2])}
        held_out_ref = np.zeros([0, 2], np.float32)
        if "validation" in data and len(data["validation"]):
            examples = loaders.read_all(data["validation"])[:config.eval_max_pairs or None]
            batches = all_pair_batches(examples, tokenizer, config.seq_len, config.batch_size, pad)
            lengths = np.concatenate([np.stack([b["chosen_loss_mask"].sum(1), b["rejected_loss_mask"].sum(1)], 1)[:n]
                                      for b, n in batches])
            held_out = {"batches": batches, "lengths": lengths}
            held_out_ref = logprobs_of_all_pairs(logprob_fn, ref_params, batches)
        eval_fn = make_eval_fn(config, graphdef, ref_params, tokenizer, held_out, held_out_ref, logprob_fn,
                               policy_of)

    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(run_lib.seeds_of(config)))
    state = run_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, batch_fn=batch_fn, num_steps=config.num_steps,
        rng=seed_keys if num_seeds > 1 else seed_keys[0], log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_fn=eval_fn, eval_every=config.eval_every,
        progress_every_s=config.get("progress_every_s", 10.0),
        headline=("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies", "eval/gold",
                  "eval/kl"))
    policy = state["params"]
    if base is not None:  # the hand-off is merged: adapters folded into the reference (their base)
        policy = jax.vmap(merged, (0, None))(policy, base) if num_seeds > 1 else merged(policy, base)
    runs.write_policy(workdir, config, policy, members=num_seeds)
    return state


# ----------------------------------------------------------------------------- the checkpointed state (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of the checkpointed {'params', 'opt_state'} (a leading seed axis with
    num_seeds > 1; LoRA: the adapters' only)."""
    state = runs.supervised_abstract_state(config, "lm")[1]
    seeds = config.get("num_seeds", 1)
    lead = (seeds,) if seeds > 1 else ()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), x.dtype), state)


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_config(c):
    """DPO's fields; beta / loss kind / label_smoothing at the top level or in config.loss."""
    run_lib.check_loop_config(c), check_optimizer_config(c), mesh_lib.check_batch_split(c)
    model_lib.check_model_config(c), model_lib.check_sequence_config(c)
    runs.check_init_from(c, required=True)
    lora.check_lora_config(c)
    for group in ("", "loss."):
        c.positive(group + "beta")
        c.number(group + "label_smoothing", 0.0, 0.5, high_open=True)
        c.choice(group + "kind", losses.DPO_KINDS)
    if isinstance(c.get("loss"), str):
        c.choice("loss", losses.DPO_KINDS)
    if not c.get("preferences.enabled"):
        builders.check_dataset_config(c)
