"""The one place that maps a run's `stage` (its config's `stage` field) to the module that runs it.

Every stage module has the same small interface, and nothing else is assumed about it:

    train(config, workdir)            run the stage in `workdir` (resuming if it was interrupted);
                                      returns the final train state
    abstract_state(config)            ShapeDtypeStructs of the train state its checkpoints hold,
                                      from the config alone (the Orbax restore target)
    policy_params(config, state)      (graphdef, params) of the stage's language-model policy
                                      (head 'lm') in a restored state; stages without one
                                      raise NoPolicy

Stage modules never import each other: a stage that starts from another run's policy or
reward model loads it through `rlhf_jax.stages.runs`, which finds the run's module here. Adding a stage
is its file plus one line in STAGES.
"""

from __future__ import annotations

import importlib

from rlhf_jax.runtime import config as config_lib

STAGES = {
    "snack": "rlhf_jax.stages.snack",
    "pretrain": "rlhf_jax.stages.pretrain",
    "sft": "rlhf_jax.stages.pretrain",
    "reward": "rlhf_jax.stages.reward",
    "ppo": "rlhf_jax.stages.ppo",
    "dpo": "rlhf_jax.stages.dpo",
}

# Stages whose runs hold a language-model policy (what `rlhf-jax sample` and the evaluation read).
POLICY_STAGES = ("pretrain", "sft", "ppo", "dpo")


class NoPolicy(config_lib.ConfigError):
    """The run is of a stage that has no language-model policy (a reward model, the snack learner)."""


def stage_module(stage: str):
    if stage not in STAGES:
        raise config_lib.ConfigError(f"config.stage={stage!r}: expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[stage])


def run_stage(config, workdir: str, allow_config_change: bool = False):
    """Check the config, write `<workdir>/config.json` (refusing a changed config on resume),
    train the stage, then mark it finished (DONE) once everything it hands off is on disk.

    Nothing is written before the checks pass: a bad value, or a changed config that does not
    fit the workdir's checkpoint, leaves the workdir as it was."""
    from rlhf_jax.runtime import distributed
    from rlhf_jax.runtime import run as run_lib
    from rlhf_jax.runtime import validation

    validation.validate(config)
    module = stage_module(config.stage)
    if allow_config_change:
        run_lib.check_workdir_fits(workdir, module.abstract_state(config))
    # Every process checks a resumed workdir's config; process 0 alone writes it.
    config_lib.write_resolved_config(config, workdir, allow_change=allow_config_change,
                                     write=distributed.is_main_process())
    try:
        state = module.train(config, workdir)
    except run_lib.Diverged as e:  # The loop knows the step and metric; name the stage too.
        raise run_lib.Diverged(f"stage {config.stage} ({workdir}): {e}") from e
    run_lib.mark_finished(workdir, f"{config.get('num_steps', '')}")
    return state
