"""Training log, ``progress.png`` and the pretext mosaic PNG (matplotlib, Agg backend).

Only rank 0 writes; the log is appended line by line (a crash loses at most the last line),
PNGs are written atomically.
"""
import os
import sys
import textwrap
import time
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import matplotlib.style

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from nnssl.io import atomic_path  # noqa: E402

LOG_NAME = "training_log.txt"
PLOT_NAME = "progress.png"


class ProgressLog:
    """Text log ``training_log.txt`` + ``progress.png`` in ``folder``; silent when not ``enabled`` (rank > 0).

    The plot is redrawn at most every ``plot_interval`` seconds (drawing costs ~1 s, more than a
    short epoch) and always for the last epoch (``final=True``).
    """

    def __init__(self, folder: str, enabled: bool = True, plot_interval: float = 60.0):
        self.folder, self.enabled, self.plot_interval = folder, enabled, plot_interval
        self._last_plot = None

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {message}"
        print(line, file=sys.stderr)
        with open(os.path.join(self.folder, LOG_NAME), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def epoch(self, record: Dict, history: List[Dict], final: bool = False, schedule=None) -> None:
        """record: {epoch, iteration, lr, epoch_time, data_wait, data_wait_fraction, losses: {term: mean}};
        ``schedule`` (an :class:`~nnssl.training.schedules.LRSchedule`) draws the whole planned lr curve."""
        terms = ", ".join(f"{k} {v:.5g}" for k, v in record["losses"].items())
        self.log(f"epoch {record['epoch']} (iteration {record['iteration']}): {terms}; lr {record['lr']:.4g}; "
                 f"epoch time {record['epoch_time']:.2f} s; data wait {record['data_wait']:.2f} s "
                 f"({100 * record['data_wait_fraction']:.1f}%)")
        now = time.monotonic()
        if self.enabled and (final or self._last_plot is None or now - self._last_plot >= self.plot_interval):
            plot_progress(history, os.path.join(self.folder, PLOT_NAME), schedule)
            self._last_plot = now


# progress.png draws at most this many points of the planned lr curve (a 400k-step curve in full
# costs seconds); the decay points of a step schedule are always among them.
MAX_CURVE_POINTS = 2000


def planned_lr_curve(schedule) -> Tuple[np.ndarray, np.ndarray]:
    """(iterations, lr) of the planned schedule over the whole run, subsampled to about
    :data:`MAX_CURVE_POINTS` points plus both sides of every lr jump (warm-up end, step decays)."""
    total = int(schedule.total_iterations)
    its = set(np.linspace(0, total - 1, min(total, MAX_CURVE_POINTS)).round().astype(int).tolist())
    if schedule.warmup_iterations:
        its.update((schedule.warmup_iterations - 1, schedule.warmup_iterations))
    if schedule.kind == "step":
        for b in range(schedule.step_iterations, total, schedule.step_iterations):
            its.update((b - 1, b))
    x = np.array(sorted(i for i in its if 0 <= i < total))
    return x, np.array([schedule.lr(int(i)) for i in x])


def _spans_a_decade(values: Sequence[float]) -> bool:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return v.size > 1 and v.min() > 0 and v.max() / v.min() > 10


def plot_progress(history: List[Dict], path: str, schedule=None) -> None:
    """Write :func:`progress_figure` to ``path`` (atomically)."""
    _save(progress_figure(history, schedule), path)


def progress_figure(history: List[Dict], schedule=None):
    """Three panels over the iteration axis: loss terms (epoch means; log scale when they span more
    than a decade), the lr (the planned curve of the whole run when ``schedule`` is given, and the
    applied values), and each epoch's time split into computing and waiting for data."""
    with matplotlib.style.context("default"):  # whatever another plot (e.g. seaborn's set) changed globally
        return _progress_figure(history, schedule)


def _progress_figure(history: List[Dict], schedule):
    its = np.array([h["iteration"] for h in history])
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    ax_loss, ax_lr, ax_time = axes
    all_losses = []
    for i, term in enumerate(history[-1]["losses"]):
        values = [h["losses"].get(term, np.nan) for h in history]
        all_losses += values
        ax_loss.plot(its, values, label=term, color=f"C{i % 10}", lw=2.2 if term == "loss" else 1.2,
                     marker="o" if len(its) < 30 else None, ms=3)
    if _spans_a_decade(all_losses):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (epoch mean)")
    ax_loss.legend(loc="best", fontsize=9, ncol=min(4, len(history[-1]["losses"])))
    ax_loss.set_title(f"pretraining progress: iteration {int(its[-1])}"
                      + (f" of {schedule.total_iterations}" if schedule is not None else ""), fontsize=11)
    if schedule is not None:
        x, lr = planned_lr_curve(schedule)
        ax_lr.plot(x, lr, color="0.55", lw=1.5, label="planned", drawstyle="steps-post")
        ax_lr.set_xlim(0, schedule.total_iterations)
    ax_lr.plot(its - 1, [h["lr"] for h in history], "o", color="k", ms=3, label="applied (last step of each epoch)")
    ax_lr.set_ylim(bottom=0)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.legend(loc="upper right", fontsize=9)
    starts = np.concatenate([[0], its[:-1]])
    widths = np.maximum(its - starts, 1)
    wait = np.array([h["data_wait"] for h in history])
    compute = np.maximum(np.array([h["epoch_time"] for h in history]) - wait, 0)
    ax_time.bar(starts, compute, width=widths, align="edge", color="tab:blue", label="computing", edgecolor="none")
    ax_time.bar(starts, wait, bottom=compute, width=widths, align="edge", color="tab:red", label="waiting for data",
                edgecolor="none")
    share = 100 * wait.sum() / max(float(np.sum([h["epoch_time"] for h in history])), 1e-12)
    ax_time.set_title(f"data wait: {share:.0f}% of the time (last epoch "
                      f"{100 * history[-1]['data_wait_fraction']:.0f}%)", fontsize=10)
    ax_time.set_ylabel("epoch time [s]")
    ax_time.legend(loc="upper right", fontsize=9)
    ax_time.set_xlabel("iteration")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    return fig


def save_pretext_mosaic(panels: Sequence[Tuple[str, np.ndarray]], path: str,
                        spacing: Optional[Sequence[float]] = None, title: str = "") -> None:
    """One row per (title, volume [D, H, W]): the middle axial slice (along D) and the middle coronal slice (along H).

    ``spacing`` (D, H, W) sets the coronal aspect ratio so anisotropic volumes are not squashed.
    """
    fig, axes = plt.subplots(len(panels), 2, figsize=(7, 3.2 * len(panels)), squeeze=False)
    aspect = float(spacing[0]) / float(spacing[2]) if spacing is not None else 1.0
    for row, (name, vol) in enumerate(panels):
        vol = np.asarray(vol, dtype=np.float32)
        if vol.ndim != 3:
            raise ValueError(f"preview volume '{name}' must be [D, H, W], got shape {vol.shape}")
        for col, (view, img, asp) in enumerate((("axial", vol[vol.shape[0] // 2], 1.0),
                                                ("coronal", vol[:, vol.shape[1] // 2, :], aspect))):
            ax = axes[row, col]
            im = ax.imshow(img, cmap="gray", aspect=asp, interpolation="nearest")
            ax.set_title(f"{name} ({view})", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
