"""The run contract every stage shares: workdir, metrics, checkpoints, resume, progress.

    <workdir>/config.json      resolved config (written by the CLI before the stage starts)
    <workdir>/metrics.jsonl    one JSON object per logged step, always with "step"
    <workdir>/tb/              TensorBoard event files (tensorboardX; no TensorFlow)
    <workdir>/checkpoints/     Orbax checkpoints of the train state

`train_loop` is the one outer Python loop: it restores the last checkpoint if there is one,
calls a jitted pure `step_fn(state, batch, rng) -> (state, metrics)`, fetches metrics every
`log_every` steps, saves every `checkpoint_every` steps and at the end. Batches are a pure
function of the step (`batch_fn(step)`), and so is the step's rng (`step_rng(rng, step)`): the
data-iterator state is the step number, and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, resume_step: int = 0):
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
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
        self._tb.add_text(tag, text, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_python(v):
    v = np.asarray(v) if not isinstance(v, (str, int, float, list, dict)) else v
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def read_metrics(workdir: str) -> list[dict]:
    """All rows of `<workdir>/metrics.jsonl`; a torn last line (killed mid-write) is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, extra: dict | None = None) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if extra is not None:
        args["extra"] = ocp.args.JsonSave(extra)
    manager.save(step, args=ocp.args.Composite(**args))


def restore_checkpoint(manager: ocp.CheckpointManager, target, step: int | None = None, with_extra=False):
    """Restore `state` (shaped like `target`, shardings included) from the latest (or given) step.

    Returns (step, state[, extra]) or None when there is no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    args = {"state": ocp.args.StandardRestore(abstract)}
    if with_extra:
        args["extra"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return (step, restored["state"], restored.get("extra")) if with_extra else (step, restored["state"])


def load_state(workdir: str, target, step: int | None = None):
    """Load the final (or given) train state of a finished run: the hand-off between stages."""
    manager = checkpoint_manager(workdir)
    found = restore_checkpoint(manager, target, step)
    manager.close()
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    return found[1]


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "DONE"))


# ----------------------------------------------------------------------------- progress


class Progress:
    """One terminal line at most every `every_s` seconds: step, steps/s, ETA, headline metrics."""

    def __init__(self, total: int, start: int, every_s: float = 10.0, stream=sys.stderr, headline=()):
        self.total, self.start, self.every_s, self.stream = total, start, every_s, stream
        self.headline = tuple(headline)
        self.t0 = self.last = time.time()

    def update(self, step: int, metrics: dict, force: bool = False) -> None:
        now = time.time()
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

_FAULT_AFTER_STEP = int(os.environ.get("RLHF_JAX_FAULT_AFTER_STEP", "-1"))


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

    step_fn(state, batch, rng) -> (state, metrics): jitted and pure; advances `steps_per_call` steps.
    batch_fn(step) -> batch (already placed on the mesh) or None.
    rng: a key, or an array of keys (seeds trained in one program); see `step_rng`.
    eval_fn(state, step) -> metrics dict, run every `eval_every` steps and at the end.
    log_fn(state, step, writer): optional extra logging (sample tables) at each log step.
    headline: metric names shown first on the progress line (default: the first six).
    `state` doubles as the restore target, so its shardings are those of the restored state.
    """
    manager = checkpoint_manager(workdir)
    start = 0
    found = restore_checkpoint(manager, state)
    if found is not None:
        start, state = found
        print(f"resuming {workdir} from step {start}", file=sys.stderr, flush=True)
    writer = MetricsWriter(workdir, resume_step=start)
    progress = Progress(num_steps, start, progress_every_s, headline=headline)
    pending = []
    step = start
    try:
        while step < num_steps:
            batch = batch_fn(step) if batch_fn is not None else None
            state, metrics = step_fn(state, batch, step_rng(rng, step))
            step += steps_per_call
            pending.append(metrics)
            last = step >= num_steps
            checkpoint_now = step % checkpoint_every == 0 or last
            # Checkpoint steps close a logging window too, so a resumed run logs what an
            # uninterrupted one would.
            if step % log_every == 0 or checkpoint_now:
                row = _mean_metrics(jax.device_get(pending))
                pending = []
                if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
                    row.update(eval_fn(state, step))
                writer.write(step, row)
                if log_fn is not None:
                    log_fn(state, step, writer)
                progress.update(step, row, force=last)
            if checkpoint_now:
                save_checkpoint(manager, step, state)
            if step == _FAULT_AFTER_STEP:  # Fault injection for the resume tests: die like `kill -9`.
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
        manager.wait_until_finished()
    finally:
        writer.close()
        manager.close()
    with open(os.path.join(workdir, "DONE"), "w") as f:
        f.write(f"{num_steps}\n")
    return state


def seed_summary(metrics):
    """Per-seed metrics {name: [S]} -> {name: mean over seeds, name_std: spread over seeds}: what
    runs of several seeds trained in one program log."""
    out = {}
    for name, values in metrics.items():
        out[name], out[name + "_std"] = values.mean(), values.std()
    return out


def _mean_metrics(rows: list[dict]) -> dict:
    """Average each metric over the steps since the last log (NaN-free rows assumed)."""
    out = {}
    for k in rows[0]:
        vals = np.stack([np.asarray(r[k], dtype=np.float64) for r in rows])
        out[k] = vals.mean(axis=0)
    return out
