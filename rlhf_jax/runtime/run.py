"""The run contract every stage shares: workdir, metrics, checkpoints, resume, progress.

    <workdir>/config.json      resolved config (written by the CLI before the stage starts)
    <workdir>/metrics.jsonl    one JSON object per logged step, always with "step"
    <workdir>/tb/              TensorBoard event files (tensorboardX; no TensorFlow)
    <workdir>/checkpoints/     Orbax checkpoints of the train state

`train_loop` is the one outer Python loop: it restores the last checkpoint that verifies
against its manifest (see "checkpoints" below) if there is one,
calls `step_fn(state, batch, rng) -> (state, metrics)`, a function of its arguments alone (one
jitted pure step, or PPO's jitted rollout and update around host-side scoring), fetches metrics every
`log_every` steps, saves every `checkpoint_every` steps and at the end. Batches are a pure
function of the step (`batch_fn(step)`), and so is the step's rng (`step_rng(rng, step)`): the
data-iterator state is the step number, and a resumed run repeats an uninterrupted one exactly.
`<workdir>/DONE` is written (atomically) by `registry.run_stage` after the stage returns, i.e.
once everything the stage hands off is on disk, not by the loop.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tensorboardX import SummaryWriter

from rlhf_jax.runtime import config as config_lib, distributed
from rlhf_jax.runtime.jsonl import read_jsonl

# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    In a run of several processes only process 0 writes (every process holds the same metrics:
    they are replicated outputs of the global step); on the others every method does nothing."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self._file = self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Lines logged after the checkpoint we resume from describe steps that will run again.
        if os.path.exists(self.path):
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tb")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is None:
            self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        if not self.active:
            return
        if self._tb is None:
            self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
        self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        """Everything logged so far on disk (TensorBoard's writer otherwise waits up to 30 s)."""
        if not self.active:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_python(v):
    v = np.asarray(v) if not isinstance(v, (str, int, float, list, dict)) else v
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def read_metrics(workdir: str) -> list[dict]:
    """All rows of `<workdir>/metrics.jsonl` (a last row cut short by a kill is left out)."""
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


# ----------------------------------------------------------------------------- checkpoints
#
# Orbax does not verify what it reads back: random bytes inside a checkpoint restore as
# +-3e38 and NaN. So every checkpoint gets `<step>/manifest.json`, written once the save has
# finished: per array its shape, dtype and CRC-32 of its bytes (gathered on the host; cheap at
# our model sizes). A restore checks the shapes against the target before Orbax reads anything
# (a config that does not fit is named as such) and the checksums after. A state holding NaN or
# inf is never saved (it would rotate the finite checkpoints away under max_to_keep).

MANIFEST = "manifest.json"


class DamagedCheckpoint(config_lib.CheckpointError):
    """A checkpoint's files are missing, cut short or do not match their manifest."""


class Diverged(config_lib.UserError):
    """The train state holds NaN or inf: the run diverged; its last finite checkpoint is kept."""

    kind = "run diverged"


def checkpoint_manager(workdir: str, max_to_keep: int = 2, subfolder: str = "checkpoints") -> ocp.CheckpointManager:
    """Orbax's manager of `<workdir>/<subfolder>` (the train state's checkpoints, or a hand-off's)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subfolder)), options=options)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _host_array(x) -> np.ndarray:
    """The whole array on this host (gathered from every process when it spans several)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _leaves(tree) -> dict:
    """{'[\'params\'][\'embed\']...': leaf}: the names arrays are checked under."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_finite(a: np.ndarray) -> bool:
    with np.errstate(all="ignore"):  # (random bytes cast with warnings)
        return not np.issubdtype(a.dtype, np.inexact) or bool(np.isfinite(a.astype(np.float64)).all())


def _describe(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "crc32": zlib.crc32(np.ascontiguousarray(a).tobytes()), "finite": _is_finite(a)}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, extra: dict | None = None) -> None:
    """Save `state` at `step` and its manifest; returns when both are on disk.

    Raises Diverged, saving nothing, when the state holds NaN or inf."""
    arrays = {name: _describe(_host_array(leaf)) for name, leaf in _leaves(state).items()}
    bad = [name for name, a in arrays.items() if not a["finite"]]
    if bad:
        kept = manager.latest_step()
        raise Diverged(f"step {step}: the train state holds NaN or inf (first in {bad[0]}, {len(bad)} arrays in all); "
                       f"not checkpointed, {'the checkpoint of step ' + str(kept) if kept is not None else 'no checkpoint'}"
                       " stays the latest. Lower optimizer.learning_rate or clip gradients "
                       "(optimizer.grad_clip_norm), then run again")
    args = {"state": ocp.args.StandardSave(state)}
    if extra is not None:
        args["extra"] = ocp.args.JsonSave(extra)
    try:
        manager.save(step, args=ocp.args.Composite(**args))
        manager.wait_until_finished()  # The manifest describes a finished checkpoint only.
    except Exception as e:  # A full disk, a quota, a vanished mount: Orbax's temporary folder is left
        kept = manager.latest_step()  # unfinished and never becomes a step; earlier ones stay.
        raise config_lib.CheckpointError(
            f"{step_dir(manager, step)}: saving the checkpoint failed ({type(e).__name__}: {e}); "
            f"{'the checkpoint of step ' + str(kept) if kept is not None else 'no checkpoint'} stays the latest "
            "and a rerun resumes from it once there is room") from e
    if jax.process_index() == 0:
        path = os.path.join(step_dir(manager, step), MANIFEST)
        with open(path + ".tmp", "w") as f:
            json.dump({"step": int(step), "arrays": arrays}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    # No process goes on (and could be killed) before the checkpoint it saved is verifiable.
    distributed.barrier(f"manifest {step}")


def read_manifest(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The manifest of a step, or None for a checkpoint written before manifests existed."""
    path = os.path.join(step_dir(manager, step), MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{step_dir(manager, step)}: {MANIFEST} cannot be read ({e})") from None


def check_fits(manager: ocp.CheckpointManager, step: int, target) -> None:
    """Raise CheckpointError when the arrays of `target` (from the config) are not those the
    checkpoint of `step` holds: names, shapes and dtypes, from the manifest alone."""
    manifest = read_manifest(manager, step)
    if manifest is None:
        return
    saved, wanted = manifest["arrays"], _leaves(target)
    where = step_dir(manager, step)
    per_layer = re.compile(r"\['blocks'\]\[\d+\]")  # ['params']['blocks'][0]['attn']...
    unstacked = sorted(name for name in saved if per_layer.search(name))
    if unstacked and not any(per_layer.search(name) for name in wanted):
        raise config_lib.CheckpointError(
            f"{where}: saved with the unstacked layer layout (one array per layer, e.g. {unstacked[0]}) of "
            "rlhf_jax before 2026-11-22; models now stack the layers on a leading axis (blocks/... "
            "[num_layers, ...]). Retrain the run with this version, or load it with the older commit (346bc22)")
    for name in sorted(set(saved) | set(wanted)):
        if name not in wanted:
            raise config_lib.CheckpointError(f"{where}: holds array {name} that the config has no place for: "
                                             "the checkpoint was saved with another config")
        if name not in saved:
            raise config_lib.CheckpointError(f"{where}: has no array {name}, which the config needs: "
                                             "the checkpoint was saved with another config")
        shape, dtype = list(np.shape(wanted[name])), str(np.dtype(wanted[name].dtype))
        if (saved[name]["shape"], saved[name]["dtype"]) != (shape, dtype):
            raise config_lib.CheckpointError(
                f"{where}: array {name} is {saved[name]['dtype']}{saved[name]['shape']} in the checkpoint but "
                f"{dtype}{shape} under the config: the checkpoint was saved with another config")


def check_workdir_fits(workdir: str, target) -> None:
    """check_fits on the latest checkpoint of a workdir (nothing to check when it has none)."""
    if not config_lib.has_checkpoint(workdir):
        return
    manager = checkpoint_manager(workdir)
    try:
        step = manager.latest_step()
        if step is not None:
            check_fits(manager, step, target)
    finally:
        manager.close()


def restore_checkpoint(manager: ocp.CheckpointManager, target, step: int | None = None, with_extra=False):
    """Restore `state` (shaped like `target`, shardings included) from the latest (or given) step,
    verified against its manifest.

    Returns (step, state[, extra]) or None when there is no checkpoint. Raises CheckpointError when
    the checkpoint does not fit `target`, DamagedCheckpoint when it cannot be read or its arrays
    do not match their checksums.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    where = step_dir(manager, step)
    check_fits(manager, step, target)
    abstract = jax.tree.map(_with_sharding, target)
    args = {"state": ocp.args.StandardRestore(abstract)}
    if with_extra:
        args["extra"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # Orbax / TensorStore raise many types for missing or cut files.
        raise DamagedCheckpoint(f"{where}: cannot be read, a file is missing or cut short "
                                f"({_root_cause(e)})") from e
    manifest = read_manifest(manager, step)
    if manifest is None:
        print(f"warning: {where} has no {MANIFEST} (saved before checksums were written): not verified",
              file=sys.stderr, flush=True)
    else:
        for name, leaf in _leaves(restored["state"]).items():
            if _describe(_host_array(leaf))["crc32"] != manifest["arrays"][name]["crc32"]:
                raise DamagedCheckpoint(f"{where}: array {name} does not match its checksum in {MANIFEST}: "
                                        "the checkpoint's files were damaged after it was saved")
    return (step, restored["state"], restored.get("extra")) if with_extra else (step, restored["state"])


def _with_sharding(x):
    """The restore target of one array. A target without a sharding (a hand-off loading another
    run's params from its config alone) is restored replicated on every device there is now: left
    to itself Orbax would use the devices the checkpoint was saved from, which a run on other
    processes or another machine does not have."""
    x = ocp.utils.to_shape_dtype_struct(x)
    if getattr(x, "sharding", None) is None:
        everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere)
    return x


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception (TensorStore's says which file and byte range)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def restore_latest_good(manager: ocp.CheckpointManager, target, workdir: str):
    """Resume: restore the latest checkpoint that verifies. Damaged newer ones are moved to
    `<workdir>/damaged_checkpoints/` (kept for inspection; Orbax would not save over their step
    numbers). Returns (step, state) or None when there are no checkpoints."""
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            found = restore_checkpoint(manager, target, step)
        except DamagedCheckpoint as e:
            print(f"{e}; trying the checkpoint before it", file=sys.stderr, flush=True)
            damaged.append(step)
            continue
        _set_aside(manager, workdir, damaged)
        return found
    if damaged:
        raise DamagedCheckpoint(f"every checkpoint in {manager.directory} (steps {sorted(damaged)}) is damaged; "
                                "delete that folder to train from the start")
    return None


def _set_aside(manager, workdir: str, steps) -> None:
    if not steps:
        return
    if jax.process_index() == 0:
        aside = os.path.join(workdir, "damaged_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            dest = os.path.join(aside, f"{step}.{int(time.time())}")
            os.replace(step_dir(manager, step), dest)
            print(f"moved the damaged checkpoint of step {step} to {dest}", file=sys.stderr, flush=True)
    distributed.barrier("damaged checkpoints set aside")
    manager.reload()


def load_state(workdir: str, target, step: int | None = None):
    """Load the final (or given) train state of a finished run: the hand-off between stages.
    A damaged checkpoint stops the hand-off (no fallback: the next stage would start from
    other params than the run reported)."""
    manager = checkpoint_manager(workdir)
    try:
        found = restore_checkpoint(manager, target, step)
    finally:
        manager.close()
    if found is None:
        raise config_lib.CheckpointError(f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint: "
                                         "the run has not saved one yet")
    return found[1]


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "DONE"))


def mark_finished(workdir: str, note: str = "") -> None:
    """Write DONE, atomically: called once everything the stage hands off is on disk (by
    process 0 alone when there are several)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "DONE")
    with open(path + ".tmp", "w") as f:
        f.write(note + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- progress


class Progress:
    """One terminal line at most every `every_s` seconds: step, steps/s, ETA, headline metrics."""

    def __init__(self, total: int, start: int, every_s: float = 10.0, stream=sys.stderr, headline=()):
        self.total, self.start, self.every_s, self.stream = total, start, every_s, stream
        self.headline = tuple(headline)
        self.t0 = self.last = time.time()

    def update(self, step: int, metrics: dict, force: bool = False) -> None:
        now = time.time()
        if jax.process_index() != 0:  # One progress line per run, not per process.
            return
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        names = [k for k in self.headline if k in metrics] or list(metrics)
        headline = [(k, metrics[k]) for k in names if np.ndim(metrics[k]) == 0 and not k.endswith("_std")]
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in headline[:6])
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  {rate:.1f} steps/s  "
              f"ETA {_fmt_time(eta)}  {shown}", file=self.stream, flush=True)


def _fmt(v):
    v = float(v)
    return f"{v:.4g}"


def _fmt_time(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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
    return [k for k, v in metrics.items() if not _is_finite(np.asarray(v))]


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
    row = _mean_metrics(kept) if kept else {}
    if skipped_before is not None:
        row["nonfinite/skipped_updates"] = int(skipped_before)
    return row, skipped_before


def seeds_of(config) -> list[int]:
    """The seeds of runs trained together (`num_seeds` > 1): seed, seed + 1, ..."""
    return [config.seed + i for i in range(config.get("num_seeds", 1))]


def seed_summary(metrics):
    """Per-seed metrics {name: [S]} -> {name: mean over seeds, name_std: spread over seeds}: what
    runs of several seeds trained in one program log."""
    out = {}
    for name, values in metrics.items():
        out[name], out[name + "_std"] = values.mean(), values.std()
    return out


class _SigtermAfterStep:
    """Within the block, SIGTERM only sets `requested`: the loop stops after the step in flight,
    its `finally` closes the metric and TensorBoard writers, and on leaving the block the process
    ends by SIGTERM as before (callers see the usual exit status). Raising from the handler
    instead could interrupt a writer or Orbax while it holds a lock, and the cleanup then waited
    on that lock for ever (seen: a test hung in futex_wait)."""

    def __enter__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                self.requested = True
            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, kind, value, tb):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return False


def _mean_metrics(rows: list[dict]) -> dict:
    """Average each metric over the steps since the last log (NaN-free rows assumed)."""
    out = {}
    for k in rows[0]:
        vals = np.stack([np.asarray(r[k], dtype=np.float64) for r in rows])
        out[k] = vals.mean(axis=0)
    return out


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_loop_config(c):
    """The loop's fields (rlhf_jax.runtime.run.train_loop)."""
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "num_seeds"):
        c.integer(key, 1)
    c.integer("eval_every", 0)
    c.positive("progress_every_s")
