"""Curves from one or many workdirs' metrics.jsonl, written as PNG.

A metric logged with a `<name>_std` companion (a run holding several seeds) is drawn as its
mean with a +-1 std band. With `group_mean=True` the given workdirs are treated as seeds of one
experiment: their curves are averaged (on common steps) and the band is their spread.
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax.runtime import config as config_lib  # noqa: E402
from rlhf_jax.runtime.run import read_metrics  # noqa: E402


def metric_series(workdir: str, metric: str):
    """(steps, values, stds or None) of one metric; rows without it are skipped."""
    rows = [r for r in read_metrics(workdir) if isinstance(r.get(metric), (int, float))]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    values = np.array([r[metric] for r in rows], dtype=float)
    std = [r.get(metric + "_std") for r in rows]
    stds = np.array(std, dtype=float) if all(isinstance(s, (int, float)) for s in std) else None
    return steps, values, stds


def plot_runs(workdirs, metrics, out: str, group_mean: bool = False, labels=None, strict: bool = True) -> str:
    """One panel per metric, one curve per run (or their mean and spread); saved to `out`.
    A metric no run logged is an error when asked for by name (`strict`, `rlhf-jax plot`), and a
    warning written on its panel after a sweep has trained (the runs are not lost to a plot)."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m]
    labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        series = [(label, metric_series(w, metric)) for label, w in zip(labels, workdirs)]
        missing = [label for label, s in series if s is None]
        series = [(label, s) for label, s in series if s is not None]
        if not series:
            if strict:
                raise config_lib.ConfigError(f"--metric={metric!r} is in none of {list(workdirs)}' metrics.jsonl")
            print(f"warning: plot metric {metric!r} is logged by none of the runs; its panel is empty",
                  file=sys.stderr)
            ax.text(0.5, 0.5, f"{metric!r}\nis logged by none of the runs", ha="center", va="center",
                    transform=ax.transAxes, color="tab:red")
            ax.set_title(metric)
            continue
        if missing:
            print(f"note: {metric!r} not logged in {missing}")
        if group_mean and len(series) > 1:
            common = sorted(set.intersection(*[set(s[0].tolist()) for _, s in series]))
            stacked = np.stack([np.interp(common, s[0], s[1]) for _, s in series])
            mean, spread = stacked.mean(0), stacked.std(0)
            ax.plot(common, mean, label=f"mean of {len(series)} runs")
            ax.fill_between(common, mean - spread, mean + spread, alpha=0.25)
        else:
            for label, (steps, values, stds) in series:
                (line,) = ax.plot(steps, values, label=label)
                if stds is not None:
                    ax.fill_between(steps, values - stds, values + stds, alpha=0.2, color=line.get_color())
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
