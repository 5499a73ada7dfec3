"""Every stage's config checked before anything is written: ranges, choices, divisibility.

    validate(config)                  the rules of config.stage; raises config.ConfigError
    validate(config, prefix="sft.")   the same, with keys named as the pipeline's config has them

A bad value is one line naming the key, the value and what is allowed:

    config.batch_size=-4: expected an integer >= 1

`registry.run_stage` calls `validate` before `config.json` is written, and the pipeline calls it
for every stage before the first one runs, so a typo found after hours of pre-training is found
in the first second instead. A rule only looks at the keys a config has (a stage's config may
lack optional fields), and the rules of a stage are a list of plain functions: add one there.

What needs the files of other runs (does init_from exist, does its model match) is checked where
the run is loaded (rlhf_jax.stages.runs), not here: in the pipeline those runs do not exist yet.
"""

from __future__ import annotations

import math

from rlhf_jax.runtime import config as config_lib
from rlhf_jax.models import lora, model
from rlhf_jax import losses

class _Missing:
    """A key the config does not have: falsy, so `if c.get(key)` reads as 'unset'."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()

# Choices of stage modules we do not import here (a stage module pulls in every other layer).
# tests/test_validation.py checks they equal the modules' own constants.
PPO_LOSSES = ("ppo", "reinforce", "reinforce_baseline", "rloo", "grpo")
PPO_VALUE_MODELS = ("policy", "reward_model", "sft")
PPO_MISSING_EOS = ("keep", "penalty")
DATASET_NAMES = ("reviews", "reviews_sft", "text_folder", "jsonl_sft", "preferences_jsonl",
                 "preferences", "imdb_reviews")


# ----------------------------------------------------------------------------- the checks


class _Checks:
    """The checks of one config; `prefix` is how the keys are named in messages."""

    def __init__(self, config, prefix: str):
        self.config, self.prefix = config, prefix

    def get(self, key: str):
        node = self.config
        for part in key.split("."):
            if node is None or not hasattr(node, "keys") or part not in node:
                return _MISSING
            node = node[part]
        return node

    def fail(self, key: str, value, allowed: str):
        raise config_lib.ConfigError(f"config.{self.prefix}{key}={value!r}: {allowed}")

    def integer(self, key: str, low: int = 1):
        value = self.get(key)
        if value is _MISSING:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(key, value, f"expected an integer >= {low}")

    def number(self, key: str, low: float = 0.0, high: float = math.inf, low_open=False, high_open=False):
        """A finite number in the interval [low, high] (either end open when asked)."""
        value = self.get(key)
        if value is _MISSING:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open or high == math.inf else value <= high)
        if not ok:
            interval = (f"{'(' if low_open else '['}{low:g}, "
                        f"{'inf)' if high == math.inf else f'{high:g}' + (')' if high_open else ']')}")
            self.fail(key, value, f"expected a finite number in {interval}")

    def positive(self, key: str):
        self.number(key, 0.0, low_open=True)

    def choice(self, key: str, choices):
        value = self.get(key)
        if value is not _MISSING and value not in choices:
            self.fail(key, value, f"expected one of {', '.join(map(repr, choices))}")

    def function_path(self, key: str, required: bool = False):
        """'package.module:function', importable and callable."""
        from rlhf_jax.people import labelers

        value = self.get(key)
        if value is _MISSING or (not value and not required):
            return
        try:
            labelers.load_function(value)
        except (ValueError, ImportError, AttributeError, TypeError) as e:
            self.fail(key, value, f"expected an importable 'package.module:function' ({e})")


# ----------------------------------------------------------------------------- rules shared by stages


def run_rules(c: _Checks):
    """The loop's fields (rlhf_jax.runtime.run.train_loop)."""
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "num_seeds"):
        c.integer(key, 1)
    c.integer("eval_every", 0)
    c.positive("progress_every_s")


def optimizer_rules(c: _Checks):
    """rlhf_jax.runtime.optim.make_optimizer's fields."""
    c.choice("optimizer.name", ("sgd", "adam", "adamw"))
    c.positive("optimizer.learning_rate")
    c.choice("optimizer.schedule", ("constant", "linear", "cosine"))
    c.integer("optimizer.warmup_steps", 0)
    c.integer("optimizer.decay_steps", 0)
    c.number("optimizer.b1", 0.0, 1.0, high_open=True)
    c.number("optimizer.b2", 0.0, 1.0, high_open=True)
    c.positive("optimizer.eps")
    c.number("optimizer.weight_decay", 0.0)
    c.number("optimizer.grad_clip_norm", 0.0)
    c.choice("optimizer.on_nonfinite", ("stop", "skip"))
    c.integer("optimizer.max_consecutive_skips", 0)


def mesh_devices(c: _Checks) -> int | None:
    """Check config.mesh against the devices there are; returns how many the mesh spans."""
    import jax

    data, fsdp = c.get("mesh.data"), c.get("mesh.fsdp")
    if data is _MISSING or fsdp is _MISSING:
        return None
    n = jax.device_count()
    for key, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size >= 1):
            c.fail(key, size, "expected -1 (all remaining devices) or an integer >= 1")
    if data == -1 and fsdp == -1:
        c.fail("mesh.fsdp", fsdp, "at most one of mesh.data and mesh.fsdp may be -1")
    if data > 0 and fsdp > 0:
        if data * fsdp > n:
            c.fail("mesh.data", data, f"mesh.data x mesh.fsdp = {data * fsdp} is more than the {n} devices there are")
        return data * fsdp
    key, size = ("mesh.fsdp", fsdp) if data == -1 else ("mesh.data", data)
    if n % size:
        c.fail(key, size, f"expected a divisor of the {n} devices there are (the other axis takes the rest)")
    return n


def batch_split_rules(c: _Checks):
    """The batch is split over every device of the mesh."""
    devices, batch_size = mesh_devices(c), c.get("batch_size")
    if devices and batch_size is not _MISSING and batch_size % devices:
        c.fail("batch_size", batch_size, f"expected a multiple of the {devices} devices of the mesh")


def model_rules(c: _Checks):
    """The decoder-only transformer (rlhf_jax.models.model; configs/models.py)."""
    for key in ("vocab_size", "max_len", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
        c.integer("model." + key, 1)
    d_model, heads, kv_heads = c.get("model.d_model"), c.get("model.num_heads"), c.get("model.num_kv_heads")
    if d_model % heads:
        c.fail("model.num_heads", heads, f"expected a divisor of model.d_model={d_model}")
    if heads % kv_heads:
        c.fail("model.num_kv_heads", kv_heads, f"expected a divisor of model.num_heads={heads}")
    c.choice("model.positions", ("learned", "rope"))
    if c.get("model.positions") == "rope" and (d_model // heads) % 2:
        c.fail("model.num_heads", heads, f"RoPE needs an even head_dim (d_model / num_heads = {d_model // heads})")
    c.choice("model.norm", ("layernorm", "rmsnorm"))
    c.choice("model.mlp", ("gelu", "swiglu"))
    c.choice("model.dtype", ("float32", "bfloat16"))
    c.choice("model.attention_impl", model.ATTENTION_IMPLS)
    c.choice("model.param_dtype", ("float32",))
    c.choice("model.dropout", (0.0,))
    c.positive("model.norm_eps")
    c.positive("model.init_std")
    c.positive("model.rope_theta")
    c.choice("tokenizer.kind", ("byte", "hf"))
    if c.get("tokenizer.kind") == "hf" and not c.get("tokenizer.path"):
        c.fail("tokenizer.path", c.get("tokenizer.path"), "tokenizer.kind='hf' needs the folder holding tokenizer.json")


def sequence_rules(c: _Checks):
    c.integer("seq_len", 2)
    seq_len, max_len = c.get("seq_len"), c.get("model.max_len")
    if seq_len is not _MISSING and max_len is not _MISSING and seq_len > max_len:
        c.fail("seq_len", seq_len, f"expected at most model.max_len={max_len}")


def data_rules(c: _Checks, key: str = "data"):
    """A dataset config (configs/datasets.py)."""
    data = c.get(key)
    if data is _MISSING:
        return
    if data is None or not c.get(key + ".name"):
        c.fail(key, data, f"expected a dataset config (configs/datasets.py) with a name in {DATASET_NAMES}")
    c.choice(key + ".name", DATASET_NAMES)
    c.number(key + ".validation_fraction", 0.0, 1.0, high_open=True)
    if c.get(key + ".name") in ("text_folder", "jsonl_sft", "preferences_jsonl") and not c.get(key + ".path"):
        c.fail(key + ".path", c.get(key + ".path"), f"dataset {c.get(key + '.name')!r} reads a file: set its path")
    if c.get(key + ".name") == "preferences" and not c.get(key + ".records_name"):
        c.fail(key + ".records_name", c.get(key + ".records_name"), "expected the name given to write_preferences")


def lora_rules(c: _Checks):
    """config.lora (configs/lora.py): adapters need params to adapt (init_from / init_from_hf)."""
    c.integer("lora.rank", 0)
    if not c.get("lora.rank"):
        return
    c.positive("lora.alpha")
    targets = c.get("lora.targets")
    names = [t.strip() for t in str(targets).split(",") if t.strip()] if targets is not _MISSING else []
    if targets is not _MISSING and (not names or not set(names) <= set(lora.TARGETS)):
        c.fail("lora.targets", targets, f"expected a comma-separated subset of {','.join(lora.TARGETS)}")
    if c.get("stage") in ("pretrain", "sft") and not (c.get("init_from") or c.get("init_from_hf")):
        c.fail("lora.rank", c.get("lora.rank"), "LoRA adapts existing weights: set init_from or init_from_hf "
               "(or lora.rank=0 to train every param)")
    if c.get("stage") == "ppo" and c.get("loss") == "ppo" and c.get("value_model") != "policy":
        c.fail("value_model", c.get("value_model"), "with LoRA expected 'policy' (a value head on the LoRA policy; "
               "a separate value model would be a second full copy of the weights)")


def init_rules(c: _Checks, required: bool = False):
    if c.get("init_from") and c.get("init_from_hf"):
        c.fail("init_from_hf", c.get("init_from_hf"), "set at most one of init_from and init_from_hf")
    if required and not c.get("init_from"):
        c.fail("init_from", c.get("init_from"), f"expected the workdir of the run this {c.get('stage')} stage starts from")


def sampling_rules(c: _Checks, group: str):
    """Fields of one sampling setup (preferences, normalize, ppo)."""
    g = group + "." if group else ""
    for key in ("batch_size", "max_prompt_len", "max_new_tokens", "num_prompts"):
        c.integer(g + key, 1)
    c.positive(g + "temperature")
    c.integer(g + "top_k", 0)
    c.number(g + "top_p", 0.0, 1.0, low_open=True)


# ----------------------------------------------------------------------------- rules per stage


def language_model_rules(c: _Checks):
    """pretrain and sft (rlhf_jax.stages.pretrain)."""
    run_rules(c), optimizer_rules(c), batch_split_rules(c), model_rules(c), sequence_rules(c)
    data_rules(c)
    init_rules(c)
    lora_rules(c)
    c.integer("eval_batches", 1)
    c.integer("sample_every", 0)
    c.integer("sample_tokens", 1)


def reward_rules(c: _Checks):
    """rlhf_jax.stages.reward (+ rlhf_jax.stages.preferences for config.preferences)."""
    run_rules(c), optimizer_rules(c), batch_split_rules(c), model_rules(c), sequence_rules(c)
    init_rules(c, required=True)
    lora_rules(c)
    if c.get("preferences.enabled"):
        sampling_rules(c, "preferences")
        c.integer("preferences.num_validation_prompts", 0)
        c.integer("preferences.samples_per_prompt", 2)
        c.choice("preferences.pairing", ("all", "disjoint"))
        c.choice("preferences.labeler", ("simulated", "function", "human"))
        c.number("preferences.noise_temperature", 0.0)
        c.integer("preferences.min_labels", 0)
        data_rules(c, "preferences.prompts")
        labeler = c.get("preferences.labeler")
        c.function_path("preferences.gold", required=labeler == "simulated")
        c.function_path("preferences.function", required=labeler == "function")
    else:
        data_rules(c)
    c.number("loss.center_coef", 0.0)
    c.integer("eval_max_pairs", 0)
    c.function_path("eval_gold")
    if c.get("normalize.enabled"):
        sampling_rules(c, "normalize")
        c.integer("normalize.samples_per_prompt", 1)


def ppo_rules(c: _Checks):
    """rlhf_jax.stages.ppo's fields (ppo._check_config adds the checks that combine them)."""
    run_rules(c), optimizer_rules(c), model_rules(c)
    mesh_devices(c)
    sampling_rules(c, "")
    c.choice("loss", PPO_LOSSES)
    c.choice("value_model", PPO_VALUE_MODELS)
    c.choice("missing_eos", PPO_MISSING_EOS)
    c.choice("kl_estimator", losses.KL_KINDS)
    c.integer("samples_per_prompt", 1)
    if c.get("loss") in ("rloo", "grpo"):
        c.integer("samples_per_prompt", 2)
    for key in ("ppo_epochs", "num_minibatches"):
        c.integer(key, 1)
    for key in ("kl_coef", "vf_coef", "entropy_coef", "value_clip"):
        c.number(key, 0.0)
    c.positive("clip_eps")
    c.positive("kl_target")
    c.positive("kl_horizon")
    c.number("gamma", 0.0, 1.0)
    c.number("lam", 0.0, 1.0)
    c.number("baseline_decay", 0.0, 1.0)
    c.integer("sample_every", 0)
    c.integer("num_sample_rows", 0)
    if bool(c.get("reward_model")) == bool(c.get("reward_function")):
        c.fail("reward_function", c.get("reward_function"),
               "set exactly one of reward_model (a reward run) and reward_function")
    c.function_path("reward_function")
    c.function_path("gold_function")
    init_rules(c, required=True)
    lora_rules(c)
    data = c.get("prompts")
    if data is _MISSING or not data:
        data_rules(c)


def dpo_rules(c: _Checks):
    """rlhf_jax.stages.dpo's fields; beta / loss kind / label_smoothing at the top level or in config.loss."""
    run_rules(c), optimizer_rules(c), batch_split_rules(c), model_rules(c), sequence_rules(c)
    init_rules(c, required=True)
    lora_rules(c)
    for group in ("", "loss."):
        c.positive(group + "beta")
        c.number(group + "label_smoothing", 0.0, 0.5, high_open=True)
        c.choice(group + "kind", losses.DPO_KINDS)
    if isinstance(c.get("loss"), str):
        c.choice("loss", losses.DPO_KINDS)
    if not c.get("preferences.enabled"):
        data_rules(c)


def snack_rules(c: _Checks):
    """rlhf_jax.stages.snack: `log_every` updates per jitted call, so it divides the run and checkpoints."""
    run_rules(c), optimizer_rules(c)
    log_every = c.get("log_every")
    for key in ("num_steps", "checkpoint_every"):
        if c.get(key) % log_every:
            c.fail(key, c.get(key), f"expected a multiple of log_every={log_every}")
    rates = c.get("learning_rates")
    for i, rate in enumerate(rates if rates is not _MISSING else ()):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            c.fail("learning_rates", tuple(rates), f"expected finite numbers > 0 (item {i} is {rate!r})")
    c.choice("model.kind", ("linear", "mlp"))
    if c.get("model.kind") == "linear":
        c.choice("model.trainable", ("bias", "all"))
    else:
        c.integer("model.hidden", 1)
    devices = mesh_devices(c)
    num_runs = max(len(rates) if rates is not _MISSING else 0, 1) * c.get("num_seeds")
    if devices and num_runs % devices:
        c.fail("num_seeds", c.get("num_seeds"), f"num_seeds x learning rates = {num_runs} runs cannot be split "
               f"over the {devices} devices of the mesh: expected a multiple of {devices}")


RULES = {
    "pretrain": language_model_rules,
    "sft": language_model_rules,
    "reward": reward_rules,
    "ppo": ppo_rules,
    "dpo": dpo_rules,
    "snack": snack_rules,
}


def validate(config, prefix: str = "") -> None:
    """Raise config.ConfigError naming the first bad value of `config` (rules of its stage)."""
    stage = config.get("stage")
    if stage not in RULES:
        raise config_lib.ConfigError(f"config.{prefix}stage={stage!r}: expected one of {', '.join(map(repr, RULES))}")
    RULES[stage](_Checks(config, prefix))
