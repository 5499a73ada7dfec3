"""The one place that maps a run's `stage` (its config's `stage` field) to the module that runs it.

Every stage module has the same small interface, and nothing else is assumed about it:

    train(config, workdir)      run the stage in `workdir` (resuming if it was interrupted),
                                write its hand-off (rlhf_jax.stages.runs) and return the final state
    abstract_state(config)      ShapeDtypeStructs of the train state its checkpoints hold, from
                                the config alone (the Orbax restore target)
    check_config(c)             its config's rules (rlhf_jax.runtime.checks.Checks): composed of
                                the rules written beside the code that reads each field

Stage modules never import each other or this module: a later stage reads an earlier run's
hand-off through `rlhf_jax.stages.runs`, which reads files only. Adding a stage is its file plus
one line in STAGES.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
import time

import jax

from rlhf_jax.models import model as model_lib
from rlhf_jax.runtime import checkpoints, checks, config as config_lib, distributed
from rlhf_jax.stages import runs

STAGES = {
    "snack": "rlhf_jax.stages.snack",
    "pretrain": "rlhf_jax.stages.pretrain",
    "sft": "rlhf_jax.stages.pretrain",
    "reward": "rlhf_jax.stages.reward",
    "ppo": "rlhf_jax.stages.ppo",
    "dpo": "rlhf_jax.stages.dpo",
}
# Fields added after runs were saved (Qwen/Llama 3 model options, chat templates, unfinished
# init_from runs, the rollout's log-prob options): resuming such a run reads their absence as the
# defaults it was trained with, not as a changed config. How a run computes (logits_chunk,
# pad_to_multiple: the same values to float rounding) takes today's default: an old run resumes
# with it.
ADDED_FIELDS = {**{f"model.{key}": value for key, value in model_lib.FAMILY_DEFAULTS.items()},
                "tokenizer.chat_template": False, "init_from_unfinished": False,
                "logprob_check_every": 10, "rollout_dtype": "", "rollout_correction": "none",
                "rollout_correction_cap": 2.0, "pad_to_multiple": 64}
POLICY_STAGES = runs.POLICY_STAGES  # (kept here for code that read it from the registry)
NoPolicy = runs.NoPolicy


def stage_module(stage: str, prefix: str = ""):
    if stage not in STAGES:
        raise config_lib.ConfigError(f"config.{prefix}stage={stage!r}: expected one of {', '.join(map(repr, STAGES))}")
    return importlib.import_module(STAGES[stage])


def validate(config, prefix: str = "") -> None:
    """Raise config.ConfigError naming the first bad value of `config` (the rules of its stage).
    `prefix` names the keys as a composing config has them (the pipeline's 'sft.')."""
    stage_module(config.get("stage"), prefix).check_config(checks.Checks(config, prefix))


def run_stage(config, workdir: str, allow_config_change: bool = False):
    """Check the config, write `<workdir>/config.json` (refusing a changed config on resume),
    train the stage, then mark it finished (DONE) once everything it hands off is on disk.

    Bad input leaves the workdir as it was: the config's values are checked before anything is
    written, a changed config that does not fit the workdir's checkpoint before config.json is
    touched, and what the stage finds wrong once it loads its inputs (data, init_from) before
    its first checkpoint undoes this command's writes: a new workdir is removed, an existing
    one gets its config.json back."""
    validate(config)
    check_memory(config)
    module = stage_module(config.stage)
    if allow_config_change:
        checkpoints.check_workdir_fits(workdir, module.abstract_state(config))
    existed = os.path.isdir(workdir)
    config_path = os.path.join(workdir, "config.json")
    saved_config = open(config_path, "rb").read() if os.path.isfile(config_path) else None
    with checkpoints.workdir_lock(workdir):
        trained_from = checkpoints.latest_step(workdir)
        try:
            # Every process checks a resumed workdir's config; process 0 alone writes it.
            config_lib.write_resolved_config(config, workdir, allow_change=allow_config_change,
                                             write=distributed.is_main_process(), added_fields=ADDED_FIELDS)
            state = module.train(config, workdir)
        except checkpoints.Diverged as e:  # The loop knows the step and metric; name the stage too.
            raise checkpoints.Diverged(f"stage {config.stage} ({workdir}): {e}") from e
        except config_lib.UserError:
            if distributed.is_main_process() and checkpoints.latest_step(workdir) == trained_from:
                _undo(workdir, existed, config_path, saved_config)
            raise
        checkpoints.mark_finished(workdir, f"{config.get('num_steps', '')}")
    return state


def check_memory(config) -> None:
    """Refuse, up front, a model whose train state alone cannot fit: float32 params, their
    gradient and two Adam moments (16 bytes a parameter) per seed, against this machine's memory
    (host RAM on CPU, the device's limit elsewhere). Activations come on top, so this catches the
    hopeless (`--config.model.max_len=100000000`: a 51 GB position table), not the marginal."""
    if "model" not in config or "vocab_size" not in config.model:  # (the snack learner's model is not one)
        return
    members = int(config.get("num_seeds", 1) or 1)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(model_lib.abstract_params(config.model, "lm")[1]))
    needed = 16 * params * members
    device = jax.devices()[0]
    if device.platform == "cpu":
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        available = (device.memory_stats() or {}).get("bytes_limit", 0) * jax.local_device_count()
    if available and needed > available:
        raise config_lib.ConfigError(
            f"config.model: {params / 1e6:,.0f}M parameters x {members} seed(s) need about {needed / 2**30:,.1f} GiB for "
            f"the train state alone (params, gradient, Adam's two moments in float32), more than the "
            f"{available / 2**30:,.1f} GiB this machine has; shrink the model (max_len, d_model, vocab_size, ...)")


def _undo(workdir: str, existed: bool, config_path: str, saved_config: bytes | None) -> None:
    """Put a workdir back as it was before a command that failed before its first checkpoint."""
    if not existed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif saved_config is None:
        if os.path.exists(config_path):
            os.remove(config_path)
    else:
        with open(config_path + ".tmp", "wb") as f:
            f.write(saved_config)
        os.replace(config_path + ".tmp", config_path)


def run_stage_once(config, workdir: str, what: str, allow_config_change: bool = True) -> None:
    """What every driver does per stage: run it unless its workdir is finished (DONE), saying so."""
    if checkpoints.is_finished(workdir):
        print(f"=== {what}: finished earlier, skipped ({workdir})", file=sys.stderr, flush=True)
        return
    print(f"=== {what} -> {workdir}", file=sys.stderr, flush=True)
    t0 = time.time()
    run_stage(config, workdir, allow_config_change=allow_config_change)
    print(f"=== {what}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


def load_run(workdir: str, step: int | None = None):
    """(config, train state) of the last (or given) checkpoint of a run of any stage: for
    inspecting a run's whole state (optimizer included); later stages read the hand-off instead."""
    config = config_lib.read_resolved_config(workdir)
    target = stage_module(config.stage).abstract_state(config)
    return config, checkpoints.load_state(os.path.join(workdir), target, step)
