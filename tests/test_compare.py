"""Run comparison: report files from two hand-made summaries, numbers checked by hand."""
import csv
import itertools
import json
import os

import matplotlib.figure
import numpy as np
import pytest

from nnssl.cli.compare import main as compare_main
from nnssl.errors import NnsslError
from nnssl.evaluation.compare import Run, compare_runs
from nnssl.evaluation.report_figure import build_figure, report_style, wrap_label

NAN = float("nan")


def case(metrics):
    return {"reference_file": "r", "prediction_file": "p",
            "metrics": {k: dict(zip(("Dice", "HD95", "ASSD"), v)) for k, v in metrics.items()}}


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture
def runs(tmp_path):
    # Run A (nnssl summary, described by nnssl_run.json), values (Dice, HD95, ASSD):
    #   case 1: class 1 (0.8, 4.0, 1.0), class 2 (0.6, NaN, NaN)
    #   case 2: class 1 (0.6, 2.0, 0.5), class 2 (0.4, 6.0, 2.0)
    # -> class 1: Dice 0.7 ± 0.1, HD95 3.0 ± 1.0, ASSD 0.75 ± 0.25
    #    class 2: Dice 0.5 ± 0.1, HD95 6.0 ± 0.0 (1 NaN), ASSD 2.0 ± 0.0 (1 NaN)
    #    mean: Dice 0.6 (foreground_mean) ± std(per-case means 0.7, 0.5) = 0.1;
    #          HD95 4.5 (foreground_mean) ± std(per-case means 4.0, 4.0) = 0.0
    a = tmp_path / "a"
    write(str(a / "summary.json"), {
        "metric_per_case": [case({"1": (0.8, 4.0, 1.0), "2": (0.6, NAN, NAN)}),
                            case({"1": (0.6, 2.0, 0.5), "2": (0.4, 6.0, 2.0)})],
        "mean": {"1": {"Dice": 0.7}, "2": {"Dice": 0.5}},
        "foreground_mean": {"Dice": 0.6, "HD95": 4.5, "ASSD": 1.375}})
    write(str(a / "nnssl_run.json"), {"label": "scratch", "architecture": "plainconvunet", "method": "none",
                                      "pretraining_data": "none"})
    # Run B: a stock nnU-Net summary (Dice only) inside a result folder with its dataset.json.
    #   case 1: class 1 0.9, class 2 0.7; case 2: class 1 0.7, class 2 NaN (absent in both)
    # -> class 1: 0.8 ± 0.1; class 2: 0.7 ± 0.0 (1 NaN); mean 0.75 ± std(0.8, 0.7) = 0.05
    res = tmp_path / "results" / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    write(str(res / "dataset.json"), {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"})
    b = res / "fold_0" / "validation" / "summary.json"
    write(str(b), {"metric_per_case": [{"metrics": {"1": {"Dice": 0.9}, "2": {"Dice": 0.7}}},
                                       {"metrics": {"1": {"Dice": 0.7}, "2": {"Dice": NAN}}}],
                   "mean": {"1": {"Dice": 0.8}, "2": {"Dice": 0.7}}, "foreground_mean": {"Dice": 0.75}})
    return str(a), str(b)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_files_and_numbers(runs, tmp_path, capsys):
    a, b = runs
    prefix = str(tmp_path / "out" / "report")
    with pytest.raises(SystemExit) as e:
        compare_main([a, b, "-o", prefix])
    assert e.value.code == 0
    label_b = "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation"
    rows = read_csv(prefix + ".csv")
    assert [(r["run"], r["class"]) for r in rows] == [("scratch", "1"), ("scratch", "2"), ("scratch", "mean"),
                                                      (label_b, "1"), (label_b, "2"), (label_b, "mean")]
    expected = {  # (run, class): (Dice mean, std, n_nan, HD95 mean, std, n_nan)
        ("scratch", "1"): (0.7, 0.1, 0, 3.0, 1.0, 0),
        ("scratch", "2"): (0.5, 0.1, 0, 6.0, 0.0, 1),
        ("scratch", "mean"): (0.6, 0.1, 0, 4.5, 0.0, 1),
        (label_b, "1"): (0.8, 0.1, 0, NAN, NAN, 2),
        (label_b, "2"): (0.7, 0.0, 1, NAN, NAN, 2),
        (label_b, "mean"): (0.75, 0.05, 1, NAN, NAN, 4),
    }
    for r in rows:
        got = (float(r["Dice_mean"]), float(r["Dice_std"]), int(r["Dice_n_nan"]),
               float(r["HD95_mean"]), float(r["HD95_std"]), int(r["HD95_n_nan"]))
        assert got == pytest.approx(expected[(r["run"], r["class"])], nan_ok=True), (r["run"], r["class"])
    assert float(rows[0]["ASSD_mean"]) == pytest.approx(0.75) and float(rows[0]["ASSD_std"]) == pytest.approx(0.25)
    assert rows[0]["architecture"] == "plainconvunet" and rows[3]["method"] == "unknown"
    assert rows[3]["class_name"] == "liver" and rows[0]["class_name"] == ""

    md = open(prefix + ".md", encoding="utf-8").read()
    assert "| scratch | plainconvunet | none | none | 2 | 0.600 ± 0.100 | 4.50 ± 0.00 (1 undef.) |" in md
    assert f"| {label_b} | unknown | unknown | unknown | 2 | 0.750 ± 0.050 | n/a | n/a |" in md
    assert "| run | 1 liver | 2 spleen |" in md and "| scratch | 0.700 ± 0.100 | 0.500 ± 0.100 |" in md
    assert "| scratch | plainconvunet" in capsys.readouterr().out
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(prefix + ".svg", encoding="utf-8") as f:
        assert "<svg" in f.read(2000)
    assert sorted(os.listdir(tmp_path / "out")) == ["report.csv", "report.md", "report.png", "report.svg"]


def test_rows_follow_argument_order_and_labels_stay_distinct(runs, tmp_path):
    a, b = runs
    out = compare_runs([b, a, a], str(tmp_path / "r.md"))
    assert out["csv"] == str(tmp_path / "r.csv")
    order = [r["run"] for r in read_csv(out["csv"]) if r["class"] == "mean"]
    assert order == ["nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation", "scratch", "scratch (2)"]


def test_bad_inputs_name_the_path(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NnsslError, match="has no summary.json"):
        compare_runs([str(empty)], str(tmp_path / "r"))
    broken = tmp_path / "broken" / "summary.json"
    write(str(broken), {"mean": {}})
    with pytest.raises(NnsslError, match="no 'metric_per_case'"):
        compare_runs([str(broken)], str(tmp_path / "r"))
    with pytest.raises(SystemExit) as e:
        compare_main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.md")


# --- the figure ---

CLASS_NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
               "left adrenal gland"]
LABELS = ["scratch", "volume_fusion (in-task)", "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation"]


def fake_runs(n_runs, n_classes):
    """Runs with distinct values (the figure is checked for layout, not numbers) and 20-epoch curves."""
    runs = []
    for i in range(n_runs):
        def stats(j, scale):
            return ((0.05 + 0.9 * ((i * 7 + j * 3) % 10) / 10) * scale, 0.05 * scale, 0)
        classes = {str(j + 1): {"Dice": stats(j, 1), "HD95": stats(j, 30), "ASSD": stats(j, 8)} for j in range(n_classes)}
        mean = {m: stats(0, s) for m, s in (("Dice", 1), ("HD95", 30), ("ASSD", 8))}
        it = list(range(50, 1050, 50))
        curves = {"iteration": it, "mean_fg_dice": [x / 1100 for x in it], "ema_fg_dice": [x / 1200 for x in it],
                  "train_losses": [1 / (1 + x / 300) for x in it], "val_losses": [1.2 / (1 + x / 300) for x in it]}
        runs.append(Run(label=f"{LABELS[i % 3]} {i}", architecture="a", method="m", pretraining_data="p",
                        summary_file="s", n_cases=2, classes=classes, mean=mean,
                        names={str(j + 1): CLASS_NAMES[j] for j in range(n_classes)}, curves=curves))
    return runs


def drawn_texts(fig):
    """Every text matplotlib draws: titles, axis labels, annotations, legends, and the tick labels inside the
    view limits (tick objects outside them exist but are not drawn)."""
    texts = []
    for ax in fig.axes:
        texts += [*ax.texts, ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        for axis, (lo, hi), i in ((ax.xaxis, ax.get_xlim(), 0), (ax.yaxis, ax.get_ylim(), 1)):
            lo, hi = min(lo, hi), max(lo, hi)
            texts += [t for t in axis.get_ticklabels() if lo - 1e-9 <= t.get_position()[i] <= hi + 1e-9]
        if ax.get_legend():
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    for legend in fig.legends:
        texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def text_polygon(t, renderer):
    """Corners [4, 2] (pixels) of a text's own, possibly rotated, rectangle: the rotated rectangle has the
    centre of its axis-aligned extent; its sides are the extent of the same text unrotated."""
    box = t.get_window_extent(renderer)
    angle = t.get_rotation()
    t.set_rotation(0)
    flat = t.get_window_extent(renderer)
    t.set_rotation(angle)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [(flat.width - 2) / 2, (flat.height - 2) / 2]
    return half @ rot.T + [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]


def polygons_intersect(p, q):
    """Separating-axis test of two convex quadrilaterals."""
    for poly in (p, q):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            normal = np.array([-edge[1], edge[0]])
            if (p @ normal).max() <= (q @ normal).min() or (q @ normal).max() <= (p @ normal).min():
                return False
    return True


def overlapping_texts(fig):
    """Pairs of drawn texts whose rectangles (shrunk by 1 px) intersect, and texts outside the figure."""
    renderer = fig.canvas.get_renderer()
    texts = drawn_texts(fig)
    page = fig.bbox
    outside = [t.get_text() for t in texts if (b := t.get_window_extent(renderer)).x0 < page.x0 - 1
               or b.y0 < page.y0 - 1 or b.x1 > page.x1 + 1 or b.y1 > page.y1 + 1]
    polys = [(t.get_text(), text_polygon(t, renderer)) for t in texts]
    pairs = [(a, b) for (a, pa), (b, pb) in itertools.combinations(polys, 2) if polygons_intersect(pa, pb)]
    return pairs, outside


@pytest.mark.parametrize("n_runs", [1, 3, 10])
@pytest.mark.parametrize("n_classes", [2, 13])
def test_figure_text_does_not_overlap(n_runs, n_classes):
    runs = fake_runs(n_runs, n_classes)
    classes = [str(j + 1) for j in range(n_classes)]
    fig = build_figure(runs, classes, [f"{k} {CLASS_NAMES[int(k) - 1]}" for k in classes])
    with report_style():  # as when saved: tick labels are made at draw time from the style then in force
        pairs, outside = overlapping_texts(fig)
        texts = {t.get_text() for t in drawn_texts(fig)}
    assert not pairs and not outside, (pairs[:5], outside[:5])
    assert "13 left adrenal gland" in texts or n_classes == 2
    # mean ± std beside every bar (run 0: Dice 0.050 ± 0.050, HD95 1.50 ± 1.50)
    assert "0.050 ± 0.050" in texts and "1.50 ± 1.50" in texts
    # one colour per run, the same in the bars, the heat-map labels and the curves
    axes = fig.axes
    bar_colours = [tuple(p.get_facecolor()) for p in axes[0].patches[:n_runs]]
    curve_colours = [tuple(matplotlib.colors.to_rgba(ln.get_color())) for ln in axes[-2].lines[1::2]]
    assert bar_colours == curve_colours and len(set(bar_colours)) == n_runs


def test_long_labels_wrap_at_separators():
    assert wrap_label("nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation", 30) == \
        "nnUNetTrainer__nnUNetPlans__\n3d_fullres/fold_0/validation"
    assert wrap_label("short") == "short"


def test_figures_are_written_atomically(runs, tmp_path, monkeypatch):
    a, _ = runs
    real = matplotlib.figure.Figure.savefig

    def broken(self, fname, **kw):  # writes half a file, then fails like a full disk
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        compare_runs([a], str(tmp_path / "out" / "r"))
    assert sorted(os.listdir(tmp_path / "out")) == ["r.csv", "r.md"]  # no r.png, no temporary file
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    out = compare_runs([a], str(tmp_path / "out" / "r"))
    assert sorted(os.listdir(tmp_path / "out")) == ["r.csv", "r.md", "r.png", "r.svg"]
    assert out["runs"][0].curves is None  # a bare summary folder has no training beside it
    assert np.isfinite(out["runs"][0].mean["Dice"][0])


def test_figure_style_ignores_global_changes(monkeypatch):
    """nnU-Net's progress plot calls seaborn's set() (grey axes, font scale 2.5) in the same process."""
    monkeypatch.setitem(matplotlib.rcParams, "axes.facecolor", "red")
    monkeypatch.setitem(matplotlib.rcParams, "legend.title_fontsize", 40)
    fig = build_figure(fake_runs(2, 2), ["1", "2"], ["1 spleen", "2 right kidney"])
    assert matplotlib.colors.to_hex(fig.axes[0].get_facecolor()) == "#ffffff"
    assert fig.legends[0].get_title().get_fontsize() == 11
