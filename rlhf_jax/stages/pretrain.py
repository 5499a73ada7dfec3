"""Pre-training and supervised fine-tuning of the decoder-only language model.

Both stages minimise next-token cross-entropy (`lm_head.next_token_loss`: `losses.next_token_loss`
computed in chunks of tokens, never holding [B, T, V] logits); they differ only in
their batches:
  - stage 'pretrain': packed windows of text, every token a target;
  - stage 'sft':      prompt + response + EOS, the loss on response tokens (and EOS) only, and
                      the parameters initialised from a pre-training run (`init_from`).

The train state is {'params': nnx.State, 'opt_state': optax state}; `train_step` is pure and
jitted with the state sharded by the mesh (replicated, or FSDP-split) and the batch split over
every device. Later stages load its params through `rlhf_jax.stages.runs.load_policy`.

With LoRA (`lora.rank` > 0; a run that starts from other params: init_from / init_from_hf) the
state's params are the adapters only; the base is the starting params, read by the step and
reloaded from init_from at hand-off (`policy_params` merges them).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from rlhf_jax.data import builders, loaders
from rlhf_jax.models import hf_import, lm_head, lora, model as model_lib, sampling
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.runtime import distributed, mesh as mesh_lib, run as run_lib
from rlhf_jax.runtime.optim import check_optimizer_config, make_optimizer, make_train_step
from rlhf_jax.stages import runs

# ----------------------------------------------------------------------------- state


# A finished random-init 'SFT run' for tests and benchmarks (lives with the hand-off it writes).
save_random_run = runs.save_random_run


def init_params_for(config):
    """Random init, or an earlier run's params (`init_from`), or a Hugging Face folder
    (`init_from_hf`). Returns (model_config, graphdef, params)."""
    if config.init_from:
        return runs.load_matching_policy(config.init_from, config.model, config.stage,
                                          config.get("init_from_unfinished", False))
    if config.init_from_hf:
        model_config, params = hf_import.load_hf_checkpoint(config.init_from_hf)
        graphdef, _ = model_lib.abstract_params(model_config)
        return model_config, graphdef, params
    graphdef, params = model_lib.init_params(config.model, "lm", config.seed)
    return config.model, graphdef, params


# ----------------------------------------------------------------------------- the step


def language_model_loss(params, graphdef, batch):
    """Next-token cross-entropy of a batch dict(tokens, positions, attention_mask, loss_mask)."""
    outputs, _ = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["attention_mask"],
                                 logits=False)
    return lm_head.next_token_loss(outputs["hidden"], outputs["unembedding"], batch["tokens"], batch["loss_mask"],
                                   model_lib.logits_chunk(graphdef, params))


def make_eval_fn(graphdef, mesh, batches, num_batches: int, unigram_loss: float, policy_of=lambda s: s["params"]):
    """Mean validation loss over the first `num_batches` (unshuffled) batches, and perplexity.
    policy_of(state) -> the params the model runs with (LoRA merged)."""
    loss_fn = jax.jit(lambda params, batch: language_model_loss(params, graphdef, batch)[1])

    def eval_fn(state, step):
        total, tokens, params = 0.0, 0.0, policy_of(state)
        for i in range(min(num_batches, len(batches))):
            m = jax.device_get(loss_fn(params, mesh_lib.shard_batch(batches[i], mesh)))
            total += float(m["loss"]) * float(m["num_tokens"])
            tokens += float(m["num_tokens"])
        loss = total / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)), "eval/unigram_loss": unigram_loss}

    return eval_fn


# ----------------------------------------------------------------------------- the stage


def batches_for(config, source, tokenizer, shuffle=True, seed=None):
    seed = config.seed if seed is None else seed
    if config.stage == "pretrain":  # (packed windows: every row is full)
        return loaders.pretrain_batches(source, tokenizer, config.seq_len, config.batch_size, seed, shuffle=shuffle)
    return loaders.sft_batches(source, tokenizer, config.seq_len, config.batch_size, seed, shuffle=shuffle,
                               pad_to_multiple=config.get("pad_to_multiple", 0))


def train(config, workdir: str):
    mesh = mesh_lib.make_mesh(config.mesh)
    model_config, graphdef, params = init_params_for(config)
    tokenizer = make_tokenizer(config.tokenizer, model_config.vocab_size)
    data = builders.load_dataset(config.data, config.data_dir)
    train_batches = batches_for(config, data["train"], tokenizer)
    eval_batches = batches_for(config, data["validation"], tokenizer, shuffle=False)
    optimizer = make_optimizer(config.optimizer)
    lora_config = config.get("lora")
    trainable, base = lora.split(params, lora_config, config.seed)
    if base is not None:
        base = mesh_lib.shard_state(base, mesh)[0]
    state, shardings = mesh_lib.shard_state({"params": trainable, "opt_state": optimizer.init(trainable)}, mesh)
    step_fn = make_train_step(
        lambda params, batch, base=None: language_model_loss(lora.combine(params, base, lora_config), graphdef, batch),
        optimizer, mesh, shardings, frozen=base)
    merged = jax.jit(lambda trainable, base: lora.combine(trainable, base, lora_config))
    # The params eval and samples run with: with LoRA a merged, transient copy.
    policy_of = (lambda state: state["params"]) if base is None else (lambda state: merged(state["params"], base))
    eval_fn = make_eval_fn(graphdef, mesh, eval_batches, config.eval_batches,
                           loaders.unigram_entropy(data["validation"], tokenizer), policy_of)
    prompts = [p for p in config.sample_prompts]

    def log_samples(state, step, writer):
        if prompts and config.sample_every and (step % config.sample_every == 0 or step == config.num_steps):
            params = mesh_lib.host_copy(policy_of(state))  # (gathered by every process; process 0 samples)
            if not distributed.is_main_process():
                return
            texts = sampling.generate_texts(graphdef, params, tokenizer, prompts, max_new_tokens=config.sample_tokens,
                                   greedy=True, rng=jax.random.key(0))
            table = "\n".join(f"{p!r} -> {t!r}" for p, t in zip(prompts, texts))
            writer.write_text(step, "samples", table)
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(f"--- step {step}\n{table}\n")

    state = run_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, rng=jax.random.key(config.seed),
        batch_fn=lambda step: mesh_lib.shard_batch(train_batches[step], mesh),
        num_steps=config.num_steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        eval_fn=eval_fn, eval_every=config.eval_every, log_fn=log_samples,
        progress_every_s=config.get("progress_every_s", 10.0),
        headline=("loss", "accuracy", "eval/loss", "grad_norm"))
    runs.write_policy(workdir, config, policy_of(state))  # merged: later stages never see the LoRA split
    return state


# ----------------------------------------------------------------------------- the checkpointed state (registry interface)


def abstract_state(config):
    """ShapeDtypeStructs of the checkpointed {'params', 'opt_state'}, from the config alone."""
    return runs.supervised_abstract_state(config, "lm")[1]


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_config(c):
    """pretrain and sft: every field train() reads."""
    run_lib.check_loop_config(c), check_optimizer_config(c), mesh_lib.check_batch_split(c)
    model_lib.check_model_config(c), model_lib.check_sequence_config(c)
    builders.check_dataset_config(c)
    runs.check_init_from(c)
    lora.check_lora_config(c)
    if c.get("lora.rank") and not (c.get("init_from") or c.get("init_from_hf")):
        c.fail("lora.rank", c.get("lora.rank"), "LoRA adapts existing weights: set init_from or init_from_hf "
               "(or lora.rank=0 to train every param)")
    c.integer("eval_batches", 1)
    c.integer("sample_every", 0)
    c.integer("sample_tokens", 1)
