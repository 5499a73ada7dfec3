"""The reward-model stage's fields, and how its preference pairs are made.

    reward_stage(...)            every field rlhf_jax.stages.reward.train reads
    preference_generation(...)   config.preferences: sample K responses per prompt from the SFT
                                 policy, pair them, label them (rlhf_jax.stages.preferences)

With `preferences.enabled`, the stage first writes its own preferences into
`<workdir>/preferences`; otherwise it reads `config.data` (any preference dataset config:
`preferences_jsonl` for an imported JSONL file, `preferences` for records written earlier).
"""

import ml_collections

from configs import datasets, lora, mesh, models, optimizers


def preference_generation(*, num_prompts=128, num_validation_prompts=32, samples_per_prompt=4,
                          pairing="all", labeler="simulated", noise_temperature=0.1,
                          temperature=1.0, max_new_tokens=96):
    """Fields of config.preferences.

    enabled                 generate preferences before training (else read config.data)
    policy                  workdir of the run to sample ('' = config.init_from, the SFT run)
    prompts                 prompt dataset config (field 'prompt'); default reviews_sft
    train_split             prompt split for training pairs
    validation_split        prompt split for held-out pairs ('' = no held-out pairs)
    num_prompts             prompts for training pairs
    num_validation_prompts  prompts for held-out pairs
    samples_per_prompt      K responses sampled per prompt
    pairing                 'all' (K(K-1)/2 pairs per prompt) or 'disjoint' (K/2 pairs)
    temperature, top_k, top_p, max_prompt_len, max_new_tokens   sampling
    batch_size              prompts per sampling call (each call samples batch_size * K rows)
    labeler                 'simulated' | 'function' | 'human'
    noise_temperature       simulated: P(a) = sigmoid((gold(a) - gold(b)) / noise_temperature)
    gold                    simulated: gold score fn(prompt, response) by import path
    function                function: score fn(prompt, response) by import path
    min_labels              human: train once this many pairs are answered (0 = all of them)
    seed                    sampling and annotator noise
    """
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.policy = ""
    c.prompts = datasets.reviews_sft()
    c.train_split = "train"
    c.validation_split = "validation"
    c.num_prompts = num_prompts
    c.num_validation_prompts = num_validation_prompts
    c.samples_per_prompt = samples_per_prompt
    c.pairing = pairing
    c.temperature = float(temperature)
    c.top_k = 0
    c.top_p = 1.0
    c.max_prompt_len = 64
    c.max_new_tokens = max_new_tokens
    c.batch_size = 32
    c.labeler = labeler
    c.noise_temperature = float(noise_temperature)
    c.gold = "rlhf_jax.people.labelers:vader_gold_score"
    c.function = ""
    c.min_labels = 0
    c.seed = 0
    return c


def reward_stage(*, num_steps, batch_size=16, seq_len=256, learning_rate=1e-4):
    """Every field of the reward stage (config.stage == 'reward').

    init_from            the SFT run whose params start the reward model (unembedding -> scalar)
    continue_from        '' or an earlier reward run: start from its params, head included
                         (`rlhf-jax rounds` retrains each round's model on all labels so far)
    model                must equal the SFT run's model config (checked)
    data                 preference dataset read when preferences.enabled is False
    loss.use_margin      subtract the dataset's per-pair margin inside the sigmoid (Llama 2)
    loss.center_coef     center_coef * mean((r_chosen + r_rejected)^2) (reward centering)
    eval_gold            gold score fn for the held-out rank correlation (eval/spearman)
    eval_max_pairs       held-out pairs scored at each eval (0 = all)
    normalize            after training: fit (mean, std) of rewards on samples of the SFT policy
                         (preferences.policy or init_from) to num_prompts prompts of
                         preferences.prompts[split], samples_per_prompt each
    """
    c = ml_collections.ConfigDict()
    c.stage = "reward"
    c.seed = 0
    c.model = models.tiny()
    # kind 'byte' or 'hf' (path: folder with tokenizer.json); chat_template=True (hf only): prompts
    # go through the tokenizer's chat template as one user message (instruction-tuned checkpoints).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path="", chat_template=False))
    c.lora = lora.off()  # --config.lora.rank=8: train adapters only (rlhf_jax/lora.py)
    c.init_from = ""
    c.init_from_unfinished = False  # True: init_from may be an unfinished run (its last checkpoint), said when it starts.
    c.continue_from = ""  # a reward run to continue from (its params and head) instead of SFT + a new head
    c.data = datasets.preferences("")
    c.data_dir = "~/.cache/rlhf_jax/datasets"
    c.preferences = preference_generation()
    c.batch_size = batch_size
    c.seq_len = seq_len
    c.pad_to_multiple = 64  # rows padded to the batch's longest, rounded up to a multiple (0: to seq_len)
    c.num_steps = num_steps
    c.optimizer = optimizers.adamw(learning_rate, weight_decay=0.0, schedule="cosine",
                                   warmup_steps=max(num_steps // 20, 1), decay_steps=num_steps)
    c.loss = ml_collections.ConfigDict(dict(use_margin=False, center_coef=0.0))
    c.log_every = 10
    c.eval_every = max(num_steps // 5, 1)
    c.eval_gold = "rlhf_jax.people.labelers:vader_gold_score"
    c.eval_max_pairs = 0
    c.checkpoint_every = max(num_steps // 4, 1)
    c.progress_every_s = 10.0
    c.normalize = ml_collections.ConfigDict(dict(
        enabled=True, split="validation", num_prompts=64, samples_per_prompt=2, temperature=1.0,
        max_prompt_len=64, max_new_tokens=96, batch_size=32, seed=1))
    c.mesh = mesh.data_parallel()
    c.plot_metrics = ("loss", "accuracy", "eval/accuracy", "eval/spearman")
    return c
