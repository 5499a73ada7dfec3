"""The fields every language-model stage reads (run length, logging, data location, mesh).

Experiment files start from `language_model_stage(...)` and fill in model, data, optimizer.
"""

import ml_collections

from configs import lora, mesh, models, optimizers


def language_model_stage(stage, *, num_steps, batch_size=16, seq_len=256, learning_rate=1e-3):
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.model = models.tiny()
    # kind 'byte' or 'hf' (path: folder with tokenizer.json); chat_template=True (hf only): prompts
    # go through the tokenizer's chat template as one user message (instruction-tuned checkpoints).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="byte", path="", chat_template=False))
    c.lora = lora.off()  # --config.lora.rank=8: train adapters only (rlhf_jax/lora.py)
    c.init_from = ""  # Workdir of an earlier run whose params start this one.
    c.init_from_unfinished = False  # True: init_from may be an unfinished run (its last checkpoint), said when it starts.
    c.init_from_hf = ""  # Or a local Hugging Face folder (config.json + *.safetensors).
    c.data = None  # Filled by the experiment (configs/datasets.py).
    c.data_dir = "~/.cache/rlhf_jax/datasets"
    c.batch_size = batch_size
    c.seq_len = seq_len
    if stage == "sft":  # (pre-training packs full windows)
        c.pad_to_multiple = 64  # rows padded to the batch's longest, rounded up to a multiple (0: to seq_len)
    c.num_steps = num_steps
    c.optimizer = optimizers.adamw(learning_rate, weight_decay=0.01, schedule="cosine",
                                   warmup_steps=max(num_steps // 20, 1), decay_steps=num_steps)
    c.log_every = 10
    c.eval_every = max(num_steps // 5, 1)
    c.eval_batches = 8
    c.checkpoint_every = max(num_steps // 4, 1)
    c.progress_every_s = 10.0
    c.sample_every = 0
    c.sample_prompts = ()
    c.sample_tokens = 96
    c.mesh = mesh.data_parallel()
    c.plot_metrics = ("loss", "eval/loss")
    return c
