"""How many validation batches per epoch (``nnssl_benchmark_ssl --val_iterations``) the validation curve needs.

"Iterations to threshold" is the first epoch whose validation pseudo Dice reaches ``--threshold``.
nnU-Net's pseudo Dice of an epoch pools true/false positives/negatives over that epoch's
``--val_iterations`` random validation batches (patches of the validation cases), so with few
batches the curve jitters from patch sampling alone and the first crossing moves with it.

This script trains one scratch fine-tuning run at the benchmark's scale (its data, split, trainer
and default budget; label budget ``--n``, seed ``--seed``) with ``--batches`` validation batches
per epoch and records, per epoch, every batch's true/false positives/negatives
(``validation_step``'s ``tp_hard``/``fp_hard``/``fn_hard``). The batches of an epoch are
independent draws of the same network, so splitting them into disjoint groups of V gives
``batches / V`` curves that a run with ``--val_iterations V`` could have produced. Per V it
prints: the sampling noise of the per-epoch pseudo Dice (std over the groups, mean over epochs),
the spread (max − min over the groups) of the iterations at which the curve first reaches
``--threshold``, and the cost of validation relative to the epoch's training iterations (timed).
It also prints the curve of nnU-Net's EMA pseudo Dice (0.9 · old + 0.1 · new) with V = 1.

Writes ``--out``/val_batches.json after every epoch (every batch's counts, the timings); ``--analyse`` prints
the table from it (also while the run goes on).
Run: ``python benchmarks/bench_val_iterations.py --out /tmp/valnoise``
"""
import argparse
import contextlib
import io
import json
import os
import time

import numpy as np

from nnssl.io import atomic_path


def pseudo_dice(tp, fp, fn) -> float:
    """nnU-Net's mean_fg_dice: per-class 2tp / (2tp + fp + fn) over pooled counts, nanmean over classes."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(2 * tp / (2 * tp + fp + fn)))


def first_crossing(curve, iterations_per_epoch, threshold):
    for e, d in enumerate(curve):
        if np.isfinite(d) and d >= threshold:
            return (e + 1) * iterations_per_epoch
    return None


def analyse(batches, iterations_per_epoch, threshold, group_sizes):
    """batches: [epoch][batch] = (tp, fp, fn) arrays (C,). Returns one dict per V."""
    counts = np.asarray(batches, float)  # (E, B, 3, C)
    n_epochs, n_batches = counts.shape[:2]
    rows = []
    for v in group_sizes:
        g = n_batches // v
        if g < 2:
            continue
        grouped = counts[:, :g * v].reshape(n_epochs, g, v, 3, -1).sum(2)  # (E, g, 3, C)
        curves = np.array([[pseudo_dice(*grouped[e, j]) for e in range(n_epochs)] for j in range(g)])  # (g, E)
        per_epoch = np.nanstd(curves, axis=0, ddof=1)  # (E,) sampling noise of the epoch's pseudo Dice
        noise = float(np.nanmean(per_epoch))
        cross = [first_crossing(c, iterations_per_epoch, threshold) for c in curves]
        reached = [c for c in cross if c is not None]
        rows.append({"V": v, "groups": g, "noise_std": noise, "noise_per_epoch": per_epoch.tolist(), "crossings": cross,
                     "crossing_range": (max(reached) - min(reached)) if reached else None,
                     "reached": f"{len(reached)}/{g}"})
    pooled = [pseudo_dice(*counts[e].sum(0)) for e in range(n_epochs)]
    return rows, pooled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--analyse", action="store_true", help="only print the table of --out/val_batches.json")
    p.add_argument("--batches", type=int, default=16, help="validation batches recorded per epoch")
    p.add_argument("--n", type=int, default=1, help="label budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations (default: the benchmark's)")
    p.add_argument("--threshold", type=float, default=None)
    a = p.parse_args(argv)
    if a.analyse:
        return report(os.path.join(os.path.abspath(a.out), "val_batches.json"))
    import torch
    from nnssl.benchmark.data import prepare_data
    from nnssl.benchmark.runs import seed_everything
    from nnssl.benchmark.settings import CONFIG, BenchmarkSettings
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer

    torch.set_num_threads(int(os.environ.get("NNSSL_BENCH_THREADS", "2")))
    s = BenchmarkSettings(methods=("volume_fusion",), data=("intask",), n_labeled=(a.n,), seeds=(a.seed,))
    iterations = a.iterations or s.finetune_iterations
    threshold = s.threshold if a.threshold is None else a.threshold
    out = os.path.abspath(a.out)
    with contextlib.redirect_stdout(io.StringIO()):
        data = prepare_data(s, out, ["volume_fusion"]).materialize()
    os.environ["nnUNet_results"] = os.path.join(out, "nnUNet_results")
    seed_everything(a.seed)
    tr = build_trainer(data.target, CONFIG, data.fold_of(a.n, a.seed), trainer=s.trainer, device="cpu").trainer
    apply_run_options(tr, RunOptions(epochs=iterations // s.iterations_per_epoch,
                                     iterations_per_epoch=s.iterations_per_epoch, val_iterations=a.batches))
    batches, times = [], {"train": 0.0, "validation": 0.0, "train_steps": 0, "validation_steps": 0}
    train_step, validation_step, on_val_end = tr.train_step, tr.validation_step, tr.on_validation_epoch_end

    def timed_train(batch):
        t0 = time.perf_counter()
        r = train_step(batch)
        times["train"] += time.perf_counter() - t0
        times["train_steps"] += 1
        return r

    def recorded_validation(batch):
        t0 = time.perf_counter()
        r = validation_step(batch)
        times["validation"] += time.perf_counter() - t0
        times["validation_steps"] += 1
        batches[-1].append([r["tp_hard"].tolist(), r["fp_hard"].tolist(), r["fn_hard"].tolist()])
        return r

    def start_epoch_record(outputs):
        on_val_end(outputs)
        dump()  # after every epoch: a long measurement can be analysed while it runs (--analyse)
        batches.append([])

    def dump():
        per_train = times["train"] / max(1, times["train_steps"])
        per_val = times["validation"] / max(1, times["validation_steps"])
        with atomic_path(os.path.join(out, "val_batches.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump({"batches": [b for b in batches if b], "seconds_per_train_iteration": per_train,
                       "seconds_per_validation_batch": per_val, "iterations_per_epoch": s.iterations_per_epoch,
                       "threshold": threshold, "n": a.n, "seed": a.seed}, f)

    batches.append([])
    tr.train_step, tr.validation_step, tr.on_validation_epoch_end = timed_train, recorded_validation, \
        start_epoch_record
    with contextlib.redirect_stdout(io.StringIO()):
        tr.run_training()
    report(os.path.join(out, "val_batches.json"))


def report(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    batches, ipe, threshold = m["batches"], m["iterations_per_epoch"], m["threshold"]
    per_train, per_val = m["seconds_per_train_iteration"], m["seconds_per_validation_batch"]
    rows, pooled = analyse(batches, ipe, threshold, (1, 2, 3, 4, 6, 8))
    print(f"{len(batches)} epochs x {ipe} iterations, {len(batches[0])} validation batches per epoch, n = {m['n']}, "
          f"seed {m['seed']}; {per_train:.2f} s per training iteration, {per_val:.2f} s per validation batch")
    print("pooled curve (all batches): " + " ".join(f"{d:.3f}" for d in pooled))
    counts = np.asarray(batches, float)
    reference = (counts[:, :, 0] + counts[:, :, 2]).sum(-1)  # (E, B): reference foreground voxels of a batch
    print(f"reference foreground voxels per batch (the content a batch validates on): coefficient of variation "
          f"{np.mean(reference.std(1, ddof=1) / reference.mean(1)):.3f}; epoch 0: {reference[0].astype(int).tolist()}")
    ema, e = [], None
    for d in (pseudo_dice(*np.asarray(b[0], float)) for b in batches):
        e = d if e is None else 0.9 * e + 0.1 * d
        ema.append(e)
    print("EMA of the V = 1 curve (first batch): " + " ".join(f"{d:.3f}" for d in ema))
    print(f"| V | curves | pseudo Dice noise (std) | first crossing of {threshold} (iterations, per curve) | range "
          f"| validation cost / epoch |\n|---|---|---|---|---|---|")
    for r in rows:
        cost = r["V"] * per_val / (ipe * per_train)
        print(f"| {r['V']} | {r['groups']} | {r['noise_std']:.3f} | {r['crossings']} | {r['crossing_range']} "
              f"| {cost:.0%} |")
    print("\nnoise (std over the curves) per epoch, and the rise of the pooled curve per epoch:")
    print("| V | " + " | ".join(f"ep. {e + 1}" for e in range(len(batches))) + " |\n|---|" + "---|" * len(batches))
    for r in rows:
        print(f"| {r['V']} | " + " | ".join(f"{x:.3f}" for x in r["noise_per_epoch"]) + " |")
    print("| rise | – | " + " | ".join(f"{b - a:+.3f}" for a, b in zip(pooled, pooled[1:])) + " |")


if __name__ == "__main__":
    main()
