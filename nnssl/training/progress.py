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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
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
        with open(os.path.join(self.folder, LOG_NAME), "a") as f:
            f.write(line + "\n")

    def epoch(self, record: Dict, history: List[Dict], final: bool = False) -> None:
        """record: {epoch, iteration, lr, epoch_time, data_wait, data_wait_fraction, losses: {term: mean}}."""
        terms = ", ".join(f"{k} {v:.5g}" for k, v in record["losses"].items())
        self.log(f"epoch {record['epoch']} (iteration {record['iteration']}): {terms}; lr {record['lr']:.4g}; "
                 f"epoch time {record['epoch_time']:.2f} s; data wait {record['data_wait']:.2f} s "
                 f"({100 * record['data_wait_fraction']:.1f}%)")
        now = time.monotonic()
        if self.enabled and (final or self._last_plot is None or now - self._last_plot >= self.plot_interval):
            plot_progress(history, os.path.join(self.folder, PLOT_NAME))
            self._last_plot = now


def plot_progress(history: List[Dict], path: str) -> None:
    """Loss terms, lr, epoch time and data-wait fraction per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for term in history[-1]["losses"]:
        axes[0].plot(epochs, [h["losses"].get(term, np.nan) for h in history], label=term,
                     lw=2.5 if term == "loss" else 1.2)
    axes[0].set_ylabel("loss (epoch mean)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(epochs, [h["lr"] for h in history], color="k")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, [h["epoch_time"] for h in history], color="tab:blue", label="epoch time [s]")
    twin = axes[2].twinx()
    twin.plot(epochs, [h["data_wait_fraction"] for h in history], color="tab:red", label="data wait fraction")
    twin.set_ylim(0, 1)
    axes[2].set_ylabel("epoch time [s]")
    twin.set_ylabel("data wait fraction")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    _save(fig, path)


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
