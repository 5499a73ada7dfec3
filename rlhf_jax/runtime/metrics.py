"""What a run logs: `<workdir>/metrics.jsonl` (one JSON object per logged step, always with
"step"), TensorBoard events in `<workdir>/tb/`, and one progress line on the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from rlhf_jax.runtime.jsonl import read_jsonl


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
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"), appended=True)


def seed_summary(metrics):
    """Per-seed metrics {name: [S]} -> {name: mean over seeds, name_std: spread over seeds}: what
    runs of several seeds trained in one program log."""
    out = {}
    for name, values in metrics.items():
        out[name], out[name + "_std"] = values.mean(), values.std()
    return out


def mean_metrics(rows: list[dict]) -> dict:
    """Average each metric over the steps since the last log that have it (a held-out evaluation
    runs at some steps only; NaN-free rows assumed)."""
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        out[k] = np.stack([np.asarray(r[k], dtype=np.float64) for r in rows if k in r]).mean(axis=0)
    return out


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
