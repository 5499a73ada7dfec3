"""Checkpoints and the files that mark a run's state on disk.

    <workdir>/checkpoints/<step>/   Orbax checkpoint of the train state + manifest.json
    <workdir>/damaged_checkpoints/  checkpoints that failed verification on resume (kept)
    <workdir>/DONE                  written last, once everything the stage hands off is on disk

"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.runtime import config as config_lib, distributed

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


def is_finite(a: np.ndarray) -> bool:
    with np.errstate(all="ignore"):  # (random bytes cast with warnings)
        return not np.issubdtype(a.dtype, np.inexact) or bool(np.isfinite(a.astype(np.float64)).all())


def _describe(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "crc32": zlib.crc32(np.ascontiguousarray(a).tobytes()), "finite": is_finite(a)}


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


def restore_checkpoint(manager: ocp.CheckpointManager, target, step: int | None = None, with_extra=False,
                       require_manifest: bool = False):
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
    if manifest is None and require_manifest:  # (written by this version: a missing one was removed)
        raise DamagedCheckpoint(f"{where}: {MANIFEST} is missing, so the arrays cannot be verified; "
                                "run the stage's command again to write it anew")
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
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # (reading creates nothing)
        raise config_lib.CheckpointError(f"{os.path.join(workdir, 'checkpoints')} does not exist: "
                                         "the run has not saved a checkpoint yet")
    manager = checkpoint_manager(workdir)
    try:
        found = restore_checkpoint(manager, target, step)
    finally:
        manager.close()
    if found is None:
        raise config_lib.CheckpointError(f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint: "
                                         "the run has not saved one yet")
    return found[1]


def latest_step(workdir: str) -> int | None:
    """The highest step folder under <workdir>/checkpoints (None: none), read without Orbax."""
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


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


class WorkdirInUse(config_lib.ConfigError):
    """Another process is training in this workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold `<workdir>/.lock` (flock, exclusive) while a run writes there: a second `train` on the
    same workdir is refused, naming the holder's pid, instead of interleaving two curves and
    deleting the other's checkpoints. The kernel drops the lock when the holder dies (kill -9
    included), so no stale lock outlives a run. Taken by process 0 of a multi-process run."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_lib.ConfigError(f"--workdir={workdir} is a file; expected a folder (it is created if missing)")
    if not distributed.is_main_process():
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirInUse(f"{workdir} is in use by process {holder} (another run is training there); "
                               "wait for it, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock)
