"""The loop every stage shares (with `metrics` and `checkpoints`, the run contract): workdir,
metrics, checkpoints, resume, progress.

    <workdir>/config.json      resolved config (written by the CLI before the stage starts)
    <workdir>/metrics.jsonl    one JSON object per logged step, always with "step"
    <workdir>/tb/              TensorBoard event files (tensorboardX; no TensorFlow)
    <workdir>/checkpoints/     Orbax checkpoints of the train state

`train_loop` is the one outer Python loop: it restores the last checkpoint that verifies
against its manifest (rlhf_jax.runtime.checkpoints) if there is one,
calls `step_fn(state, batch, rng) -> (state, metrics)`, a function of its arguments alone (one
jitted pure step, or PPO's jitted rollout and update around host-side scoring), fetches metrics every
`log_every` steps, saves every `checkpoint_every` steps and at the end. Batches are a pure
function of the step (`batch_fn(step)`), and so is the step's rng (`step_rng(rng, step)`): the
data-iterator state is the step number, and a resumed run repeats an uninterrupted one exactly.
`<workdir>/DONE` is written (atomically) by `registry.run_stage` after the stage returns, i.e.
once everything the stage hands off is on disk, not by the loop.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import jax
import numpy as np

from rlhf_jax.runtime import distributed
from rlhf_jax.runtime.checkpoints import Diverged, checkpoint_manager, is_finite, restore_latest_good, save_checkpoint
from rlhf_jax.runtime.metrics import MetricsWriter, Progress, mean_metrics

# ----------------------------------------------------------------------------- the loop

# Fault injection for the resume tests: die like `kill -9` after this step (on every process,
# or only on process RLHF_JAX_FAULT_PROCESS).
_FAULT_AFTER_STEP = int(os.environ.get("RLHF_JAX_FAULT_AFTER_STEP", "-1"))
_FAULT_PROCESS = int(os.environ.get("RLHF_JAX_FAULT_PROCESS", "-1"))


def step_rng(rng, step: int):
    """The rng of one step: fold_in(rng, step), per key when `rng` is an array of keys (one per
    seed of runs trained together: each gets what its own single run would)."""
    if rng.ndim == 0:
        return jax.random.fold_in(rng, step)
    return jax.vmap(jax.random.fold_in, (0, None))(rng, step)


def train_loop(*, workdir: str, state, step_fn, batch_fn, num_steps: int, rng, log_every: int,
               checkpoint_every: int, steps_per_call: int = 1, eval_fn=None, eval_every: int = 0,
               log_fn=None, progress_every_s: float = 10.0, headline=()):
    """Run `step_fn` from the last checkpoint (or `state`) to `num_steps`; return the final state.

    step_fn(state, batch, rng) -> (state, metrics): a function of its arguments alone (jitted, or
        jitted parts around host work); advances `steps_per_call` steps.
    batch_fn(step) -> batch (already placed on the mesh) or None.
    rng: a key, or an array of keys (seeds trained in one program); see `step_rng`.
    eval_fn(state, step) -> metrics dict, run every `eval_every` steps and at the end.
    log_fn(state, step, writer): optional extra logging (sample tables) at each log step.
    headline: metric names shown first on the progress line (default: the first six).
    `state` doubles as the restore target, so its shardings are those of the restored state.

    Non-finite guard: a step whose metrics (loss, grad_norm, any other) hold NaN or inf stops
    the run with Diverged naming the step and metric, after writing that step's row (marked
    "nonfinite"); no checkpoint is saved after it. With `optimizer.on_nonfinite='skip'` the
    optimizer keeps the params on such steps (optim.skip_nonfinite): they are left out of the
    logged means and counted in `nonfinite/skipped_updates`.
    SIGTERM (what schedulers send before pre-emption): the step in flight finishes, a
    checkpoint of it is saved, and the process ends by SIGTERM; every process stops after the
    same step.
    """
    manager = checkpoint_manager(workdir)
    start = 0
    try:
        found = restore_latest_good(manager, state, workdir)
    except BaseException:
        manager.close()
        raise
    if found is not None:
        start, state = found
        if distributed.is_main_process():
            print(f"resuming {workdir} from step {start}", file=sys.stderr, flush=True)
    writer = MetricsWriter(workdir, resume_step=start)
    progress = Progress(num_steps, start, progress_every_s, headline=headline)
    pending = []  # (step, metrics, skipped updates so far) of the steps since the last log
    skipped = jax.device_get(skipped_updates(state))
    step = start
    with _SigtermAfterStep() as sigterm:  # outermost: the writers below are closed first
        try:
            while step < num_steps:
                batch = batch_fn(step) if batch_fn is not None else None
                state, metrics = step_fn(state, batch, step_rng(rng, step))
                step += steps_per_call
                pending.append((step, metrics, skipped_updates(state)))
                last = step >= num_steps
                # Every process must stop after the same step (the checkpoint is collective).
                stop = distributed.any_process(sigterm.requested)
                checkpoint_now = step % checkpoint_every == 0 or last or stop
                # Checkpoint steps close a logging window too, so a resumed run logs what an
                # uninterrupted one would.
                if step % log_every == 0 or checkpoint_now:
                    row, skipped = _window_row(jax.device_get(pending), skipped, writer, manager)
                    pending = []
                    if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
                        evaluated = eval_fn(state, step)
                        _check_finite(step, evaluated, {**row, **evaluated}, writer, manager)
                        row.update(evaluated)
                    writer.write(step, row)
                    if log_fn is not None:
                        log_fn(state, step, writer)
                    progress.update(step, row, force=last)
                if checkpoint_now:
                    save_checkpoint(manager, step, state)
                    writer.flush()  # The curves on disk reach the checkpoint a resume starts from.
                if step == _FAULT_AFTER_STEP and _FAULT_PROCESS in (-1, jax.process_index()):
                    manager.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop:
                    sigterm.requested = True  # (also where the SIGTERM reached another process)
                    break
            manager.wait_until_finished()
        finally:
            writer.close()
            manager.close()
    # DONE is written by registry.run_stage once the stage's other outputs are on disk too.
    return state


def skipped_updates(state):
    """How many updates optim.skip_nonfinite has skipped so far (summed over seeds), or None
    when the optimizer does not skip (optimizer.on_nonfinite='stop'). Found by its fields
    (optim imports this module, not the reverse)."""
    is_guard = lambda x: hasattr(x, "skipped_updates") and hasattr(x, "inner_state")
    guards = [x for x in jax.tree.leaves(state, is_leaf=is_guard) if is_guard(x)]
    if not guards:
        return None
    return sum(x.skipped_updates.sum() for x in guards)


def _nonfinite(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if not is_finite(np.asarray(v))]


def _check_finite(step, metrics, row, writer, manager) -> None:
    """Raise Diverged when a metric of `step` is NaN or inf, after logging the row (marked)."""
    bad = _nonfinite(metrics)
    if not bad:
        return
    writer.write(step, {**row, "nonfinite": bad})
    writer.flush()
    kept = manager.latest_step()
    raise Diverged(
        f"step {step}: metric {bad[0]} is {np.asarray(metrics[bad[0]]).tolist()} (non-finite: {bad}); the run stops "
        f"and {'the checkpoint of step ' + str(kept) if kept is not None else 'no checkpoint'} stays the latest. "
        "Lower optimizer.learning_rate or clip gradients (optimizer.grad_clip_norm), or set "
        "optimizer.on_nonfinite='skip' to skip such updates")


def _window_row(window, skipped_before, writer, manager):
    """The logged row of the steps since the last log: each metric's mean over them. A step
    whose metrics are non-finite stops the run (`_check_finite`) unless its update was skipped
    (the skip count grew): then it is left out of the means. Returns (row, skip count)."""
    kept = []
    for step, metrics, skipped in window:
        was_skipped = skipped is not None and skipped > skipped_before
        skipped_before = skipped
        if not was_skipped:
            _check_finite(step, metrics, metrics, writer, manager)
            kept.append(metrics)
    row = mean_metrics(kept) if kept else {}
    if skipped_before is not None:
        row["nonfinite/skipped_updates"] = int(skipped_before)
    return row, skipped_before


def seeds_of(config) -> list[int]:
    """The seeds of runs trained together (`num_seeds` > 1): seed, seed + 1, ..."""
    return [config.seed + i for i in range(config.get("num_seeds", 1))]




class _SigtermAfterStep:
    """Within the block, SIGTERM and Ctrl-C (SIGINT) only set `requested`: the loop stops after
    the step in flight and checkpoints it, its `finally` closes the metric and TensorBoard
    writers, and on leaving the block the process ends by SIGTERM as before (callers see the
    usual exit status), or after a Ctrl-C raises KeyboardInterrupt (the CLI exits 130 with one
    line). Raising from the handler instead could interrupt a writer or Orbax while it holds a
    lock, and the cleanup then waited on that lock for ever (seen: a test hung in futex_wait); a
    second Ctrl-C is taken to mean "now" and does raise."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested, self.signum, self.previous = False, None, {}
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if signum == signal.SIGINT and self.signum == signal.SIGINT:
                    raise KeyboardInterrupt
                self.requested, self.signum = True, signum
            self.previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        return self

    def __exit__(self, kind, value, tb):
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        if self.requested and self.signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if self.requested and kind is None:
            raise KeyboardInterrupt
        return False




# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_loop_config(c):
    """The loop's fields (rlhf_jax.runtime.run.train_loop)."""
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "num_seeds"):
        c.integer(key, 1)
    c.integer("eval_every", 0)
    c.positive("progress_every_s")


# Until 2026-12-02 this module also held the metrics and checkpoint code: old names still resolve.
_MOVED = {"metrics": ("MetricsWriter", "read_metrics", "seed_summary", "Progress"),
          "checkpoints": ("MANIFEST", "DamagedCheckpoint", "Diverged", "checkpoint_manager", "step_dir",
                          "save_checkpoint", "read_manifest", "check_fits", "check_workdir_fits",
                          "restore_checkpoint", "restore_latest_good", "load_state", "is_finished", "mark_finished")}


def __getattr__(name):
    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(f"rlhf_jax.runtime.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
