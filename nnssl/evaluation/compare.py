"""Side-by-side comparison of evaluated runs (e.g. training from scratch vs. each pretraining).

Each run is a folder holding a ``summary.json`` (from ``nnssl_evaluate``; a stock nnU-Net
summary works too, with Dice/IoU only) or the path of that file. An optional
``nnssl_run.json`` beside it describes the run::

    {"label": "...", "architecture": "...", "method": "...", "pretraining_data": "..."}

Without it the label is derived from the folder (for nnU-Net result folders the
``Trainer__Plans__config`` part and below, e.g.
``nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation``) and the other fields are
"unknown". Class names come from the nearest ``dataset.json`` in the folder or up to three
levels above it (nnU-Net result and prediction folders carry one).

Numbers: per class, mean ± population std over cases, NaN cases skipped and counted; the
"mean" row is nnU-Net's ``foreground_mean`` value where the summary has it (else the
nan-aware mean of the class means) ± the std over cases of the per-case foreground mean —
the same definitions :mod:`nnssl.evaluation.evaluate` writes. Rows keep the order in which
the runs were given.
"""
import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError
from nnssl.evaluation.evaluate import case_statistics, label_names, per_case_foreground_mean
from nnssl.io import atomic_path

METRICS = ("Dice", "HD95", "ASSD")
RUN_FIELDS = ("architecture", "method", "pretraining_data")
_RESULT_FOLDER_RE = re.compile(r"^[^_].*__.+__.+$")  # Trainer__Plans__configuration
_LOOK_UP_LEVELS = 3

Stats = Tuple[float, float, int]  # (mean, std, n_nan)


@dataclass
class Run:
    label: str
    architecture: str
    method: str
    pretraining_data: str
    summary_file: str
    n_cases: int
    classes: Dict[str, Dict[str, Stats]] = field(default_factory=dict)  # class key -> metric -> stats
    mean: Dict[str, Stats] = field(default_factory=dict)  # metric -> stats over foreground classes
    names: Dict[str, str] = field(default_factory=dict)  # class key -> class name


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NnsslError(f"Cannot read the {what} '{path}' ({e}); fix or regenerate it.")


def _ancestors(folder: str) -> List[str]:
    out = [folder]
    for _ in range(_LOOK_UP_LEVELS):
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            break
        out.append(parent)
    return out


def _derived_label(folder: str) -> str:
    for a in _ancestors(folder):
        if _RESULT_FOLDER_RE.match(os.path.basename(a)):
            return os.path.relpath(folder, os.path.dirname(a))
    return os.path.basename(folder)


def _run_stats(summary: dict, summary_file: str):
    if not isinstance(summary.get("metric_per_case"), list) or not summary["metric_per_case"]:
        raise NnsslError(f"'{summary_file}' has no 'metric_per_case' entries; it is not an nnU-Net/nnssl "
                         f"summary.json. Create it with nnssl_evaluate.")
    cases = summary["metric_per_case"]
    keys = sorted({k for c in cases for k in c["metrics"] if k != "0"}, key=_class_order)
    classes = {k: {m: case_statistics(c["metrics"].get(k, {}).get(m, np.nan) for c in cases) for m in METRICS}
               for k in keys}
    fg = summary.get("foreground_mean", {})
    mean = {}
    for m in METRICS:
        value = fg.get(m, case_statistics(classes[k][m][0] for k in keys)[0])
        _, std, _ = case_statistics(per_case_foreground_mean(cases, m))
        mean[m] = (float(value), std, sum(classes[k][m][2] for k in keys))
    return len(cases), classes, mean


def _class_order(key: str):
    """Labels numerically, then regions ("(1, 2)") after them."""
    nums = [int(n) for n in re.findall(r"-?\d+", key)]
    return (key.startswith("("), nums)


def load_run(path: str) -> Run:
    """Read one run: ``path`` is a folder with summary.json, or the summary.json itself."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        folder, summary_file = path, os.path.join(path, "summary.json")
        if not os.path.isfile(summary_file):
            raise NnsslError(f"'{path}' has no summary.json. Evaluate the predictions first "
                             f"(nnssl_evaluate -ref LABELS -pred {path} -d DATASET) or pass the summary.json path.")
    elif os.path.isfile(path) and path.endswith(".json"):
        folder, summary_file = os.path.dirname(path), path
    else:
        raise NnsslError(f"'{path}' is neither a result folder nor a summary.json file; pass one of these.")
    n_cases, classes, mean = _run_stats(_read_json(summary_file, "summary"), summary_file)
    info_file = os.path.join(folder, "nnssl_run.json")
    info = _read_json(info_file, "run description") if os.path.isfile(info_file) else {}
    names = {}
    for a in _ancestors(folder):
        if os.path.isfile(os.path.join(a, "dataset.json")):
            names = label_names(_read_json(os.path.join(a, "dataset.json"), "dataset.json"))
            break
    return Run(label=str(info.get("label") or _derived_label(folder)),
               **{f: str(info.get(f) or "unknown") for f in RUN_FIELDS},
               summary_file=summary_file, n_cases=n_cases, classes=classes, mean=mean, names=names)


def _fmt(stats: Stats, digits: int, show_nan: bool = False) -> str:
    mean, std, n_nan = stats
    if np.isnan(mean):
        return "n/a"
    s = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return s + (f" ({n_nan} undef.)" if show_nan and n_nan else "")


def _all_classes(runs: Sequence[Run]) -> List[str]:
    return sorted({k for r in runs for k in r.classes}, key=_class_order)


def _class_title(runs: Sequence[Run], key: str) -> str:
    name = next((r.names[key] for r in runs if key in r.names), "")
    return f"{key} {name}".strip()


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a cell would split the table row


def markdown_report(runs: Sequence[Run]) -> str:
    head = ["run", "architecture", "method", "pretraining data", "cases", "Dice", "HD95 [mm]", "ASSD [mm]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [*map(_md, (r.label, r.architecture, r.method, r.pretraining_data)), str(r.n_cases),
                 _fmt(r.mean["Dice"], 3), _fmt(r.mean["HD95"], 2, True), _fmt(r.mean["ASSD"], 2, True)]
        lines.append("| " + " | ".join(cells) + " |")
    classes = _all_classes(runs)
    per_class = ["| run | " + " | ".join(_md(_class_title(runs, k)) for k in classes) + " |",
                 "|" + "---|" * (len(classes) + 1)]
    for r in runs:
        cells = [_fmt(r.classes[k]["Dice"], 3) if k in r.classes else "n/a" for k in classes]
        per_class.append(f"| {_md(r.label)} | " + " | ".join(cells) + " |")
    return "\n".join(["Mean over foreground classes (mean ± std over cases):", "", *lines, "",
                      "Dice per class (mean ± std over cases):", "", *per_class]) + "\n"


def _write_csv(runs: Sequence[Run], path: str) -> None:
    cols = ["run", *RUN_FIELDS, "summary_file", "class", "class_name", "n_cases"]
    cols += [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n_nan")]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in runs:
                rows = [(k, r.names.get(k, ""), r.classes[k]) for k in _all_classes([r])]
                rows.append(("mean", "foreground mean", r.mean))
                for key, name, stats in rows:
                    cells = [c for m in METRICS for c in (repr(stats[m][0]), repr(stats[m][1]), stats[m][2])]
                    w.writerow([r.label, r.architecture, r.method, r.pretraining_data, r.summary_file, key, name,
                                r.n_cases, *cells])


def _write_png(runs: Sequence[Run], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = _all_classes(runs)
    fig = Figure(figsize=(min(30.0, 5 + 0.4 * len(runs) + 0.3 * len(classes) * len(runs)), 4.5))
    FigureCanvasAgg(fig)  # the Agg canvas without touching pyplot's global backend
    ax_mean, ax_cls = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(1, len(classes)) / 2]})
    x = np.arange(len(runs))
    colours = [f"C{i % 10}" for i in range(len(runs))]

    def nz(v):  # NaN bars/error bars are drawn as zero; the tables show "n/a"
        return 0.0 if np.isnan(v) else v

    ax_mean.bar(x, [nz(r.mean["Dice"][0]) for r in runs], yerr=[nz(r.mean["Dice"][1]) for r in runs],
                color=colours, capsize=4)
    ax_mean.set_xticks(x, [r.label for r in runs], rotation=30, ha="right", fontsize=7)
    ax_mean.set_title("mean Dice (± std over cases)")
    width = 0.8 / max(1, len(runs))
    cx = np.arange(len(classes))
    for i, r in enumerate(runs):
        stats = [r.classes.get(k, {"Dice": (np.nan, np.nan, 0)})["Dice"] for k in classes]
        ax_cls.bar(cx + (i - (len(runs) - 1) / 2) * width, [nz(s[0]) for s in stats],
                   yerr=[nz(s[1]) for s in stats], width=width, color=colours[i], capsize=2, label=r.label)
    ax_cls.set_xticks(cx, [_class_title(runs, k) for k in classes], rotation=30, ha="right", fontsize=7)
    ax_cls.set_title("Dice per class")
    ax_cls.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(3, len(runs)))
    for ax in (ax_mean, ax_cls):
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("Dice")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def _unique_labels(runs: List[Run]) -> None:
    """Make repeated labels distinct ("x", "x (2)") so table rows can be told apart."""
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} ({seen[r.label]})"


def compare_runs(result_folders: Sequence[str], output_prefix: str) -> dict:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` comparing the runs; return paths and markdown.

    output_prefix: a path without extension (a trailing .md/.csv/.png is dropped).
    """
    if not result_folders:
        raise NnsslError("No result folders given; pass one or more folders that hold a summary.json.")
    runs = [load_run(p) for p in result_folders]
    _unique_labels(runs)
    prefix = re.sub(r"\.(md|csv|png)$", "", os.path.abspath(output_prefix))
    markdown = markdown_report(runs)
    with atomic_path(prefix + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write("# nnssl comparison\n\n" + markdown)
    _write_csv(runs, prefix + ".csv")
    _write_png(runs, prefix + ".png")
    return {"markdown": markdown, "md": prefix + ".md", "csv": prefix + ".csv", "png": prefix + ".png",
            "runs": runs}
