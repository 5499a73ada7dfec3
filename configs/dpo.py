"""The DPO stage's fields (config.stage == 'dpo'): preference optimisation without RL.

    seed, num_seeds     num_seeds > 1 trains seeds seed, seed+1, ... in one program (vmap); a
                        DPO seed changes the order of the pairs (the policy starts from the SFT
                        params either way); metrics are the mean over seeds and `<name>_std`
    init_from           the SFT run: the policy starts from it and the frozen reference is it
    reference_from      a different run for the frozen reference ('' = init_from)
    model               must equal init_from's model
    data, data_dir      the preference dataset, read when preferences.enabled is False: e.g. the
                        reward stage's own pairs, data=datasets.preferences('preferences') with
                        data_dir='<reward run>/preferences/tfds' (same pairs, labels and splits)
    preferences         as the reward stage's (configs/reward.py): sample, pair and label into
                        <workdir>/preferences first (the pipeline without a reward model)
    loss.kind           'sigmoid' (DPO) | 'robust' | 'ipo' | 'hinge' | 'simpo' (losses.dpo_loss)
    loss.beta           the KL knob: larger beta keeps the policy closer to the reference
    loss.label_smoothing  sigmoid: conservative DPO; robust: the assumed label-flip rate
    loss.simpo_gamma    SimPO's target margin
    precompute_ref_logps  reference log-probs of every pair computed once before training (an
                        epoch then costs one policy forward/backward per pair), else per batch
    batch_size, seq_len pairs per step; prompt + response + EOS rows of seq_len tokens
    eval_every          held-out pair accuracy (eval/rewards/accuracies, eval/loss) and samples on
                        held-out prompts: eval/gold (gold_function), eval/kl (to the SFT policy,
                        rlhf_jax.models.evaluation), every eval_every steps and at the end
    eval_prompts        prompt dataset (+ its data_dir) + split + count for those samples
"""

import ml_collections

from configs import datasets, lora, mesh, models, optimizers
from configs.reward import preference_generation


def dpo_stage(*, num_steps=200, batch_size=16, seq_len=192, learning_rate=1e-5, kind="sigmoid", beta=0.1):
    c = ml_collections.ConfigDict()
    c.stage = "dpo"
    c.seed = 0
    c.num_seeds = 1
    c.model = models.tiny()
    # kind 'byte' or 'hf' (path: folder with tokenizer.json); chat_template=True (hf only): prompts
    # go through the tokenizer's chat template as one user message (instruction-tuned checkpoints).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path="", chat_template=False))
    c.lora = lora.off()  # --config.lora.rank=8: train adapters only (rlhf_jax/lora.py)
    c.init_from = ""
    c.init_from_unfinished = False  # True: init_from may be an unfinished run (its last checkpoint), said when it starts.
    c.reference_from = ""  # '' = init_from; another policy run: the frozen reference
    c.data = datasets.preferences("preferences")
    c.data_dir = "~/.cache/rlhf_jax/datasets"
    c.preferences = preference_generation()
    c.preferences.enabled = False
    c.loss = ml_collections.ConfigDict(dict(kind=kind, beta=float(beta), label_smoothing=0.0, simpo_gamma=0.5))
    c.precompute_ref_logps = True
    c.batch_size = batch_size
    c.seq_len = seq_len
    c.pad_to_multiple = 64  # rows padded to the batch's longest, rounded up to a multiple (0: to seq_len)
    c.num_steps = num_steps
    c.optimizer = optimizers.adam(learning_rate, grad_clip_norm=1.0, schedule="linear",
                                  warmup_steps=max(num_steps // 10, 1), decay_steps=num_steps)
    c.log_every = 10
    c.eval_every = max(num_steps // 4, 1)
    c.eval_max_pairs = 256
    c.eval_prompts = ml_collections.ConfigDict(dict(data=datasets.reviews_sft(), data_dir="~/.cache/rlhf_jax/datasets",
                                                   split="validation", num=64,
                                                   max_prompt_len=64, max_new_tokens=96, temperature=1.0))
    c.gold_function = "rlhf_jax.people.labelers:vader_gold_score"
    c.checkpoint_every = max(num_steps // 4, 1)
    c.progress_every_s = 10.0
    c.mesh = mesh.data_parallel()
    c.plot_metrics = ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/gold", "eval/kl")
    return c
