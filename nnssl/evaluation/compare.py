"""Side-by-side comparison of evaluated runs (e.g. training from scratch vs. each pretraining).

Each run is a folder holding a ``summary.json`` (from ``nnssl_evaluate``; a stock nnU-Net
summary works too, with Dice/IoU only) or the path of that file. An optional
``nnssl_run.json`` beside it describes the run::

    {"label": "...", "architecture": "...", "method": "...", "pretraining_data": "..."}

Without it the label is derived from the folder (for nnU-Net result folders the
``Trainer__Plans__config`` part and below, e.g.
``nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation``) and the other fields are
"unknown". Class names come from the nearest ``dataset.json`` in the folder or up to three
levels above it (nnU-Net result and prediction folders carry one). Learning curves
(:func:`nnssl.evaluation.curves.learning_curves`) come from the training's fold folder: the
``fold_dir`` of ``nnssl_run.json``, else the nearest folder (this one or up to three levels
above) holding an nnU-Net ``checkpoint_final.pth`` or ``training_log_*.txt``; a run without
one is drawn without curves. The figure is described in :mod:`nnssl.evaluation.report_figure`.

Numbers: per class, mean ± population std over cases, NaN cases skipped and counted; the
"mean" row is nnU-Net's ``foreground_mean`` value where the summary has it (else the
nan-aware mean of the class means) ± the std over cases of the per-case foreground mean —
the same definitions :mod:`nnssl.evaluation.evaluate` writes. Rows keep the order in which
the runs were given.
"""
import csv
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError
from nnssl.evaluation.evaluate import case_statistics, label_names, per_case_foreground_mean
from nnssl.io import atomic_path, check_writable

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
    curves: Optional[dict] = None  # learning_curves() of the training, if found


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
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
               summary_file=summary_file, n_cases=n_cases, classes=classes, mean=mean, names=names,
               curves=_curves(folder, info.get("fold_dir")))


def _curves(folder: str, fold_dir: Optional[str]) -> Optional[dict]:
    """Learning curves of the run's training (see the module docstring), or None."""
    from nnssl.evaluation.curves import learning_curves

    candidates = [os.path.join(folder, fold_dir)] if fold_dir else [  # a relative fold_dir: from the run folder
        a for a in _ancestors(folder)
        if os.path.isfile(os.path.join(a, "checkpoint_final.pth")) or glob.glob(os.path.join(a, "training_log_*.txt"))]
    if not candidates:
        return None
    try:
        return learning_curves(candidates[0])
    except NnsslError as e:  # a report without one run's curves beats no report
        print(f"nnssl_compare: no learning curves for {folder}: {e}", file=sys.stderr)
        return None


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
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in runs:
                rows = [(k, r.names.get(k, ""), r.classes[k]) for k in _all_classes([r])]
                rows.append(("mean", "foreground mean", r.mean))
                for key, name, stats in rows:
                    cells = [c for m in METRICS for c in (repr(stats[m][0]), repr(stats[m][1]), stats[m][2])]
                    w.writerow([r.label, r.architecture, r.method, r.pretraining_data, r.summary_file, key, name,
                                r.n_cases, *cells])


def _write_figures(runs: Sequence[Run], prefix: str) -> None:
    """``PREFIX.png`` and ``PREFIX.svg`` (see :mod:`nnssl.evaluation.report_figure`)."""
    from nnssl.evaluation.report_figure import build_figure, write_figure

    classes = _all_classes(runs)
    fig = build_figure(runs, classes, [_class_title(runs, k) for k in classes])
    write_figure(fig, prefix + ".png")
    write_figure(fig, prefix + ".svg")


def _unique_labels(runs: List[Run]) -> None:
    """Make repeated labels distinct ("x", "x (2)") so table rows can be told apart."""
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} ({seen[r.label]})"


def compare_runs(result_folders: Sequence[str], output_prefix: str) -> dict:
    """Write ``PREFIX.md``, ``PREFIX.csv``, ``PREFIX.png`` and ``PREFIX.svg`` comparing the runs; return
    paths and markdown.

    output_prefix: a path without extension (a trailing .md/.csv/.png/.svg is dropped).
    """
    check_writable(os.path.dirname(os.path.abspath(output_prefix)), "The folder of the report (-o)")
    if not result_folders:
        raise NnsslError("No result folders given; pass one or more folders that hold a summary.json.")
    runs = [load_run(p) for p in result_folders]
    _unique_labels(runs)
    prefix = re.sub(r"\.(md|csv|png|svg)$", "", os.path.abspath(output_prefix))
    markdown = markdown_report(runs)
    with atomic_path(prefix + ".md") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("# nnssl comparison\n\n" + markdown)
    _write_csv(runs, prefix + ".csv")
    _write_figures(runs, prefix)
    return {"markdown": markdown, "md": prefix + ".md", "csv": prefix + ".csv", "png": prefix + ".png",
            "svg": prefix + ".svg", "runs": runs}
