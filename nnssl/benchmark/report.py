"""Tables and figure of ``nnssl_benchmark_ssl``: results.csv (per run), results.md and results.png (summaries).

Summaries group the runs by (architecture, label budget n, start, budget mode); a pretrained
group is paired seed by seed with the scratch runs of the same (architecture, n) (same training
cases, same seeded augmentation and initialization of the non-transferred layers), see
:func:`nnssl.benchmark.stats.paired_stats`: once with the scratch runs of the same fine-tuning
length (budget "same") and, with ``--equal_budget``, once with the scratch runs as long as
pretraining + fine-tuning (budget "equal"). The verdicts of one results.md are one family:
Holm's correction runs over every comparison in it (:func:`nnssl.benchmark.stats.holm`).
"""
import csv
import io
import os
from typing import Dict, List, Optional

import numpy as np

from nnssl.benchmark.settings import SCRATCH
from nnssl.benchmark.stats import ALPHA, MIN_SEEDS, holm, paired_stats, seeds_needed, verdict
from nnssl.io import atomic_path

CSV_FIELDS = ("architecture", "start", "budget", "n", "seed", "pretrain_iterations", "finetune_iterations",
              "test_dice", "iterations_to_threshold", "train_seconds", "load_average")


def summarize(results: List[dict]) -> List[dict]:
    """One row per (architecture, n, start, budget) with the paired statistics against scratch.

    Pretrained rows get ``p_holm`` (Holm-adjusted over every comparison with at least
    MIN_SEEDS pairs) and ``verdict`` from it; ``verdict_uncorrected`` is paired_stats' own."""
    scratch = {(r["architecture"], r["n"], r["seed"], r["budget"]): r for r in results if r["start"] == SCRATCH}
    budgets = sorted({r["budget"] for r in results if r["start"] == SCRATCH}, reverse=True)  # "same" first
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        if r["start"] == SCRATCH:
            groups.setdefault((r["architecture"], r["n"], False, r["start"], r["budget"]), []).append(r)
        else:  # a pretrained group is listed once per scratch budget it is compared with
            for b in budgets:
                groups.setdefault((r["architecture"], r["n"], True, r["start"], b), []).append(r)
    rows = []
    for (arch, n, _, start, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][4] != "same",
                                                                                  kv[0][3])):
        rs = sorted(rs, key=lambda r: r["seed"])
        pairs = [(r, scratch[(arch, n, r["seed"], budget)]) for r in rs if (arch, n, r["seed"], budget) in scratch]
        dice = [r["test_dice"] for r in rs]
        row = {"architecture": arch, "n": n, "start": start, "budget": budget, "seeds": [r["seed"] for r in rs],
               "pretrain_iterations": rs[0]["pretrain_iterations"], "finetune_iterations": rs[0]["finetune_iterations"],
               "dice_mean": float(np.mean(dice)), "dice_std": float(np.std(dice, ddof=1)) if len(dice) > 1 else 0.0,
               "dice_range": float(np.max(dice) - np.min(dice)), "to_threshold": [r["iterations_to_threshold"] for r in rs]}
        if start != SCRATCH and pairs:
            row.update(paired_stats([p["test_dice"] for p, _ in pairs], [q["test_dice"] for _, q in pairs]))
            # one paired difference has no spread yet: no number of seeds can be derived from it
            row["seeds_needed"] = seeds_needed(row["diff_mean"], row["diff_std"]) if row["k"] >= 2 else None
            row["scratch_iterations"] = pairs[0][1]["finetune_iterations"]
        rows.append(row)
    family = [r for r in rows if "p" in r and r["k"] >= MIN_SEEDS]
    for r, adjusted in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = adjusted
    for r in rows:
        if "p" in r:
            r["verdict_uncorrected"] = r["verdict"]
            r["verdict"] = verdict(r["diff_mean"], r.get("p_holm", 1.0), r["k"])
    return rows


def threshold_cell(values: List[Optional[int]], total: int) -> str:
    """'mean (k/K reached)' over the runs that reached the threshold, '> total (0/K)' when none did."""
    reached = [v for v in values if v is not None]
    if not reached:
        return f"> {total} (0/{len(values)})"
    return f"{np.mean(reached):.0f} ({len(reached)}/{len(values)})"


def markdown(s, rows: List[dict]) -> str:
    family = sum("p_holm" in r for r in rows)
    pretraining = (f"one pretraining run per seed (--pretrain_per_seed, seed s for the runs of seed s): the spread "
                   f"over seeds includes the pretraining's" if s.pretrain_per_seed else
                   f"one pretraining run per (method, data), seed {s.seeds[0]}, shared by every seed: the verdicts "
                   f"hold for that pretraining run (the spread over seeds is fine-tuning noise only; "
                   f"--pretrain_per_seed pretrains once per seed)")
    lines = ["# nnssl_benchmark_ssl: does pretraining help?\n",
             f"Dataset: {s.dataset or 'synthetic BTCV-like phantoms ' + 'x'.join(map(str, s.shape))}; "
             f"architectures {', '.join(s.architectures)} (preset {s.preset}); fine-tuning trainer {s.trainer}, "
             f"{s.finetune_iterations} iterations ({s.iterations_per_epoch} per epoch, {s.val_iterations} validation "
             f"batches per epoch); pretraining {s.pretrain_iterations} iterations (batch {s.pretrain_batch_size}); "
             f"seeds {', '.join(map(str, s.seeds))}.\n",
             f"**What a verdict is conditional on**: {pretraining}; the {s.test_cases} test cases (test Dice = "
             f"nnU-Net's foreground mean Dice over these {s.test_cases} cases, the same for every run: the "
             f"statistics do not include the sampling of test cases); {s.val_cases} validation cases.\n",
             f"**Statistics**: test Dice mean ± std over seeds (ddof 1). Δ = paired difference "
             f"pretrained − scratch "
             f"(same seed = same training cases, augmentation and initialization of the layers not transferred): "
             f"mean and 95 % confidence interval (paired t test, t distribution with k − 1 degrees of freedom). "
             f"Verdict 'helps'/'hurts' when the Holm-adjusted p is below {ALPHA} over all {family} comparisons "
             f"of this file (Holm's correction: the chance of any false verdict in this table is at most "
             f"{ALPHA * 100:g} %), else 'within noise'; fewer than {MIN_SEEDS} seeds: 'too few seeds', never a "
             f"verdict. "
             f"'seeds needed': seeds with which a paired t test (α = {ALPHA}, two-sided, not corrected for the "
             f"other comparisons) finds a true difference of the observed mean Δ at the observed spread with 80 % "
             f"probability ('—': mean Δ = 0, or more than 10000). 'to val ≥ {s.threshold}': fine-tuning "
             f"iterations until the per-epoch validation pseudo Dice first reaches {s.threshold} (mean over the "
             f"seeds that reached it). Budget 'equal': compared with scratch runs of pretraining + fine-tuning "
             f"iterations (the same total number of iterations, LWI Table VII).\n",
             "| architecture | n labeled | start | budget (pretrain + fine-tune it.) | test Dice | Δ vs scratch "
             "[95 % CI] | p (Holm) | verdict | seeds needed | range of scratch test Dice over seeds "
             f"| to val ≥ {s.threshold:g} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = f"{r['budget']} ({r['pretrain_iterations']} + {r['finetune_iterations']}"
        budget += f" vs 0 + {r['scratch_iterations']})" if "scratch_iterations" in r else ")"
        delta = p_cell = needed = ""
        if "diff_mean" in r:
            lo, hi = r["ci95"]
            delta = f"{r['diff_mean']:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else "")
            p_cell = f"{r['p_holm']:.3f}" if "p_holm" in r else "—"
            needed = "—" if r["seeds_needed"] is None else str(r["seeds_needed"])
        spread = f"{r['dice_range']:.3f}" if r["start"] == SCRATCH else ""
        lines.append(f"| {r['architecture']} | {r['n']} | {r['start']} | {budget} | {r['dice_mean']:.3f} ± "
                     f"{r['dice_std']:.3f} | {delta} | {p_cell} | {r.get('verdict', '')} | {needed} | {spread} | "
                     f"{threshold_cell(r['to_threshold'], r['finetune_iterations'])} |")
    return "\n".join(lines) + "\n"


def write_csv(results: List[dict], path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(results, key=lambda r: (r["architecture"], r["n"], r["start"], r["budget"], r["seed"])):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(buf.getvalue())


def write_png(rows: List[dict], results: List[dict], path: str) -> None:
    """Left: test Dice per label budget and start (mean ± std). Then, per label budget: the mean
    validation curve of every start. Drawn in the report style (nnU-Net's progress plot restyles
    matplotlib globally, which the benchmark's fine-tuning runs have just called)."""
    import matplotlib
    from matplotlib.figure import Figure

    from nnssl.evaluation.report_figure import report_style, write_figure

    # each set of runs once: the scratch runs of every length, the pretrained runs (listed per budget in rows)
    starts = sorted({(r["start"], r["budget"]) for r in rows if r["start"] == SCRATCH or r["budget"] == "same"},
                    key=lambda x: (x[0] != SCRATCH, x))
    ns = sorted({r["n"] for r in rows})
    tab10 = matplotlib.colormaps["tab10"]
    colors = {st: tab10(i % 10) for i, st in enumerate(starts)}
    with report_style():
        fig = Figure(figsize=(6.5 + 4.5 * len(ns), 4.8), layout="constrained")
        ax, *curve_axes = fig.subplots(1, 1 + len(ns), width_ratios=[6.5] + [4.5] * len(ns))
        width = 0.8 / max(1, len(starts))
        for i, st in enumerate(starts):
            vals = [next((r for r in rows if (r["start"], r["budget"]) == st and r["n"] == n), None) for n in ns]
            xs = [j + i * width for j, v in enumerate(vals) if v is not None]
            ys = [v["dice_mean"] for v in vals if v is not None]
            es = [v["dice_std"] for v in vals if v is not None]
            first = next((v for v in vals if v is not None), None)
            label = st[0] + (f" ({first['finetune_iterations'] if first else ''} it., equal budget)"
                             if st[1] == "equal" else "")
            ax.bar(xs, ys, width, yerr=es, capsize=3, color=colors[st], label=label)
            for x, y in zip(xs, ys):
                ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
            for ax2, n in zip(curve_axes, ns):
                runs = [r for r in results if (r["start"], r["budget"]) == st and r["n"] == n and r["val_dice"]]
                if runs:
                    k = min(len(r["val_dice"]) for r in runs)
                    per_epoch = runs[0]["finetune_iterations"] // len(runs[0]["val_dice"])
                    ax2.plot([(e + 1) * per_epoch for e in range(k)],
                             np.nanmean([r["val_dice"][:k] for r in runs], axis=0), color=colors[st], label=label)
        ax.set_xticks([j + width * (len(starts) - 1) / 2 for j in range(len(ns))], [f"n = {n}" for n in ns])
        ax.set_ylabel("test mean Dice (mean ± std over seeds)")
        ax.set_title("test Dice per label budget")
        ax.legend(fontsize=8)
        for ax2, n in zip(curve_axes, ns):
            ax2.set_xlabel("fine-tuning iteration")
            ax2.set_ylabel("validation pseudo Dice (mean over seeds)")
            ax2.set_title(f"validation curves, n = {n}")
            ax2.grid(alpha=0.3)
        write_figure(fig, path, fmt="png")


def write_reports(s, results: List[dict], out_dir: str, figure: bool = True) -> dict:
    rows = summarize(results)
    md = markdown(s, rows)
    with atomic_path(os.path.join(out_dir, "results.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(md)
    write_csv(results, os.path.join(out_dir, "results.csv"))
    if figure:
        write_png(rows, results, os.path.join(out_dir, "results.png"))
    return {"rows": rows, "markdown": md, "out_dir": out_dir}
