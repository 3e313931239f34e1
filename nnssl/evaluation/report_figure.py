"""The comparison figure (``REPORT.png`` and ``REPORT.svg``) of :mod:`nnssl.evaluation.compare`.

One colour per run (matplotlib's tab10, in the order the runs were given) in every panel, and
one legend of those colours above the panels:

- mean Dice over the foreground classes per run, horizontal bars with the std over cases as
  error bars and "mean ± std" beside each bar;
- HD95 and ASSD (mm) per run, the same way (ASSD hatched); "n/a" where undefined;
- Dice per class as a heat map (runs x classes; the mean in every cell, ± std up to 8 classes),
  class names below;
- when any run has learning curves (:func:`nnssl.evaluation.curves.learning_curves` of its
  fold folder): validation pseudo Dice, and train (solid) / validation (dashed) loss, against
  training iterations.

Sizes grow with the number of runs and classes (tested for 1-10 runs, 1-20 classes) so that
no two labels overlap; long run labels are wrapped at their ``/`` and ``__`` separators.
"""
import contextlib
import math
import re
import textwrap
from typing import List, Optional, Sequence

import matplotlib
import matplotlib.colors
import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from nnssl.io import atomic_path

FONT = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
        "legend.fontsize": 9}
LABEL_WIDTH = 30  # characters per line of a run label
NAN_TEXT = "n/a"
MAX_MARKED_EPOCHS = 30  # learning curves with at most this many epochs get a marker per epoch
MAX_CLASSES_WITH_STD = 8  # heat-map cells are wide enough for "mean ± std" up to this many classes


@contextlib.contextmanager
def report_style():
    """matplotlib's default style plus :data:`FONT`, whatever the process changed globally before
    (nnU-Net's progress plot calls seaborn's ``set``, which restyles every later figure)."""
    with matplotlib.style.context("default"), matplotlib.rc_context(FONT):
        yield


def run_colours(n: int) -> List[str]:
    """tab10 as fixed hex colours (``"C0"`` strings would follow whatever colour cycle is set globally)."""
    tab10 = matplotlib.colormaps["tab10"]
    return [matplotlib.colors.to_hex(tab10(i % 10)) for i in range(n)]


def wrap_label(label: str, width: int = LABEL_WIDTH) -> str:
    """Break a long label after its path/field separators (``/``, ``__``), else by words/characters."""
    if len(label) <= width:
        return label
    pieces = [p for p in re.split(r"(?<=/)|(?<=__)", label) if p]
    lines, line = [], ""
    for p in pieces:
        if line and len(line) + len(p) > width:
            lines.append(line)
            line = ""
        line += p
    lines.append(line)
    return "\n".join(sub for ln in lines for sub in textwrap.wrap(ln, width, break_on_hyphens=False) or [""])


def _nz(v: float) -> float:
    return 0.0 if not np.isfinite(v) else float(v)


def _hbars(ax, values, stds, colours, digits: int, xmax: float, offset=0.0, height=0.7, hatch=None, unit=""):
    """Horizontal bars at y = index + offset with error bars and 'mean ± std' to their right."""
    y = np.arange(len(values)) + offset
    ax.barh(y, [_nz(v) for v in values], xerr=[_nz(s) for s in stds], height=height, color=colours,
            hatch=hatch, edgecolor="white" if hatch else None, capsize=3, error_kw={"lw": 1, "ecolor": "0.25"})
    for yi, v, s in zip(y, values, stds):
        text = NAN_TEXT if not np.isfinite(v) else f"{v:.{digits}f} ± {_nz(s):.{digits}f}{unit}"
        ax.text(_nz(v) + _nz(s) + 0.015 * xmax, yi, text, va="center", ha="left", fontsize=8.5)


def _run_axis(ax, labels: Sequence[str], colours: Sequence[str], show: bool) -> None:
    ax.set_yticks(np.arange(len(labels)), labels if show else [""] * len(labels))
    if show:
        for tick, c in zip(ax.get_yticklabels(), colours):
            tick.set_color(c)
            tick.set_fontweight("bold")
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first run on top


def _panel_means(ax, runs, labels, colours) -> None:
    means = [r.mean["Dice"][0] for r in runs]
    stds = [r.mean["Dice"][1] for r in runs]
    _hbars(ax, means, stds, colours, 3, 1.0)
    ax.set_xlim(0, 1.45)  # room for the numbers right of a bar near 1
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_title("mean Dice over classes (± std over cases)")
    ax.set_xlabel("Dice")
    _run_axis(ax, labels, colours, True)


def _panel_distances(ax, runs, labels, colours) -> None:
    hd = [(r.mean["HD95"][0], r.mean["HD95"][1]) for r in runs]
    assd = [(r.mean["ASSD"][0], r.mean["ASSD"][1]) for r in runs]
    finite = [m + _nz(s) for m, s in hd + assd if np.isfinite(m)]
    xmax = max(finite) if finite else 1.0
    _hbars(ax, [m for m, _ in hd], [s for _, s in hd], colours, 2, xmax, offset=-0.2, height=0.38)
    _hbars(ax, [m for m, _ in assd], [s for _, s in assd], colours, 2, xmax, offset=0.2, height=0.38, hatch="///")
    ax.set_xlim(0, xmax * 1.7 if xmax > 0 else 1.0)
    ax.set_title("HD95 (plain) and ASSD (hatched), mm")
    ax.set_xlabel("distance [mm], lower is better")
    _run_axis(ax, labels, colours, False)


def _panel_heatmap(fig, ax, runs, labels, colours, classes, class_titles) -> None:
    nan = (np.nan, np.nan, 0)
    stats = [[r.classes[k]["Dice"] if k in r.classes else nan for k in classes] for r in runs]
    values = np.array([[s[0] for s in row] for row in stats])
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    with_std = len(classes) <= MAX_CLASSES_WITH_STD
    for i, row in enumerate(stats):
        for j, (v, std, _) in enumerate(row):
            text = NAN_TEXT if np.isnan(v) else f"{v:.2f} ± {_nz(std):.2f}" if with_std else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if np.isfinite(v) and v > 0.6 else "white")
    ax.set_xticks(np.arange(len(classes)), class_titles, rotation=40 if len(classes) > 4 else 0,
                  ha="right" if len(classes) > 4 else "center", rotation_mode="anchor")
    _run_axis(ax, labels, colours, True)
    ax.set_title("Dice per class (mean over cases)")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="Dice")


def _panel_curves(ax_dice, ax_loss, runs, colours) -> None:
    drawn = False
    for r, c in zip(runs, colours):
        cv = r.curves
        if not cv:
            continue
        it = np.asarray(cv["iteration"])
        marker = "o" if len(it) <= MAX_MARKED_EPOCHS else None  # a few epochs: show where the values are
        ax_dice.plot(it, cv["mean_fg_dice"], color=c, lw=0.8, alpha=0.45, marker=marker, ms=3)
        ax_dice.plot(it, cv["ema_fg_dice"], color=c, lw=2)
        ax_loss.plot(it, cv["train_losses"], color=c, lw=1.6, ls="-", marker=marker, ms=3)
        ax_loss.plot(it, cv["val_losses"], color=c, lw=1.6, ls="--", marker=marker, ms=3)
        drawn = True
    ax_dice.set_title("validation pseudo Dice (thick: moving average)")
    ax_dice.set_ylabel("pseudo Dice")
    ax_loss.set_title("training loss (solid) and validation loss (dashed)")
    ax_loss.set_ylabel("loss")
    for ax in (ax_dice, ax_loss):
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    if not drawn:
        for ax in (ax_dice, ax_loss):
            ax.text(0.5, 0.5, "no learning curves found", transform=ax.transAxes, ha="center", va="center")


def build_figure(runs, classes: Sequence[str], class_titles: Sequence[str]):
    """The report figure (a matplotlib Figure on an Agg canvas, pyplot untouched)."""
    n, k = len(runs), max(1, len(classes))
    labels = [wrap_label(r.label) for r in runs]
    lines_per_label = max(lab.count("\n") + 1 for lab in labels)
    row_h = 0.28 * max(1, lines_per_label * 0.75)  # inches per run in the bar and heat-map panels
    longest_class = max((len(t) for t in class_titles), default=1)
    bars_h = 1.4 + row_h * n * (1.4 if n > 1 else 2.2)
    heat_h = 0.9 + row_h * n * 1.0 + (0.075 * min(longest_class, 40) if k > 4 else 0.3)
    has_curves = any(r.curves for r in runs)
    curves_h = 3.2 if has_curves else 0.0
    width = max(12.0, 2.6 + 0.55 * k + 0.09 * LABEL_WIDTH)
    # legend columns: as many as fit the width (about 0.075 inch per character at 9 pt, plus the patch)
    longest_line = max(len(line) for lab in labels for line in lab.split("\n"))
    ncol = max(1, min(n, 5, int(width // (0.075 * longest_line + 0.6))))
    legend_h = 0.3 + 0.18 * lines_per_label * math.ceil(n / ncol)
    heights = [bars_h, heat_h] + ([curves_h] if has_curves else [])
    with report_style():
        fig = Figure(figsize=(width, sum(heights) + legend_h + 0.4), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
        colours = run_colours(n)
        _panel_means(fig.add_subplot(grid[0, 0]), runs, labels, colours)
        _panel_distances(fig.add_subplot(grid[0, 1]), runs, labels, colours)
        _panel_heatmap(fig, fig.add_subplot(grid[1, :]), runs, labels, colours, classes, class_titles)
        if has_curves:
            _panel_curves(fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1]), runs, colours)
        fig.legend(handles=[Patch(color=c, label=lab) for lab, c in zip(labels, colours)], loc="outside upper center",
                   ncol=ncol, frameon=False, title=f"{n} run{'s' if n > 1 else ''} (one colour each)",
                   title_fontsize=FONT["axes.titlesize"])
        fig.canvas.draw()  # lay out now, under the font settings
    return fig


def write_figure(fig, path: str, fmt: Optional[str] = None) -> None:
    """Save atomically (the format from ``fmt`` or the extension: png at 110 dpi, svg vector)."""
    with atomic_path(path) as tmp, report_style():
        fig.savefig(tmp, dpi=110, format=fmt or path.rsplit(".", 1)[-1])
