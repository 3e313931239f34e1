"""Does Volume Fusion pretraining help? Test Dice of pretrained minus scratch fine-tuning, few labels.

For every seed one synthetic pool is written (``write_synthetic_btcv``: max(--n_labeled)
labeled training cases, 3 test cases with labels, --unlabeled unlabeled volumes). For every
n in --n_labeled a BTCV dataset holding only the first n training cases (plus the 3 test
images) goes into its own nnU-Net folder tree, is planned with the ``tiny`` preset for every
architecture, and the unlabeled set is preprocessed with those plans (``-pd``). Then, per
(seed, n, architecture):

1. ``pretrain(volume_fusion)`` on the unlabeled set for --pretrain_iterations (batch 2);
2. ``train(fold="all")`` from scratch and from that checkpoint with the same budget
   (--epochs x --iterations_per_epoch, one validation iteration per epoch);
3. ``predict`` the 3 test images (no TTA) and ``evaluate_folder`` against their labels;
   the score is nnU-Net's foreground mean Dice (``summary.json["foreground_mean"]["Dice"]``).

Pretraining is done per (seed, n, architecture) because the plans (and so the network and
the normalization of the unlabeled data) follow the fingerprint of the labeled dataset.
Every step is skipped when its output exists, so rerunning with the same --out resumes.
Fine-tuning is not seeded beyond ``torch.manual_seed(seed)`` before each run (nnU-Net's
data augmentation draws from its own global RNGs), so seeds differ in data, pretraining and
initialisation; the spread over seeds includes fine-tuning noise.

Cost (measured on the shared 2-core machine, load ~4.5, plainconvunet, shape 32x64x64): about
80 s of conversion/planning/preprocessing/prediction per (seed, n), 1.2 s per pretraining
iteration and about 5 s per fine-tuning iteration (nnU-Net's augmentation runs in the main
process). The defaults (60 pretraining iterations, 4 x 10 fine-tuning iterations) were sized
from that for roughly an hour over 3 seeds x 2 n x 2 architectures; that full run was not
timed. Budgets this small are far from the papers' and mostly measure early fine-tuning.

Run: ``python benchmarks/bench_pretraining_helps.py [--quick] [--architectures plainconvunet]``.
"""
import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

DATASET = "BTCV"
UNLABELED = "CTUnlabeled"
TEST_CASES = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (data pool, pretraining, init).")
    p.add_argument("--n_labeled", type=int, nargs="+", default=[2, 4], help="Numbers of labeled training cases.")
    p.add_argument("--architectures", nargs="+", default=["plainconvunet", "pct_net"],
                   help="Architectures (tiny preset).")
    p.add_argument("--unlabeled", type=int, default=10, help="Unlabeled volumes per seed for pretraining.")
    p.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], help="Synthetic volume shape (Z Y X).")
    p.add_argument("--pretrain_iterations", type=int, default=60, help="Volume Fusion iterations (batch 2).")
    p.add_argument("--epochs", type=int, default=4, help="Fine-tuning epochs (scratch and pretrained alike).")
    p.add_argument("--iterations_per_epoch", type=int, default=10, help="Fine-tuning iterations per epoch.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--out", default=None, help="Work folder (default: a temporary folder, removed at the end).")
    p.add_argument("--quick", action="store_true",
                   help="Smoke configuration: seed 0, n_labeled 2, tiny shape, a few iterations.")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.n_labeled, a.unlabeled, a.shape = [0], [2], 3, [24, 48, 48]
        a.pretrain_iterations, a.epochs, a.iterations_per_epoch = 4, 1, 2
    return a


@contextlib.contextmanager
def quiet():
    """nnU-Net's and nnssl's progress output would bury the table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def labeled_subset(pool: dict, n: int, dst: str) -> str:
    """A BTCV RawData copy with training cases 1..n and all test images (``pool`` is never modified)."""
    for sub in ("Training/img", "Training/label", "Testing/img"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    files = [(f"Training/img/img{i:04d}.nii.gz", f"Training/label/label{i:04d}.nii.gz") for i in range(1, n + 1)]
    rels = [r for pair in files for r in pair]
    rels += [f"Testing/img/{f}" for f in sorted(os.listdir(os.path.join(pool["raw_data"], "Testing", "img")))]
    for rel in rels:
        if not os.path.isfile(os.path.join(dst, rel)):
            shutil.copyfile(os.path.join(pool["raw_data"], rel), os.path.join(dst, rel))
    return dst


def prepare_tree(root: str, pool: dict, n: int, archs) -> dict:
    """Own nnU-Net tree for n labeled cases: convert, test labels, plan + preprocess (with -pd)."""
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled
    from nnssl.datasets import known_datasets
    from nnssl.demo import copy_test_labels, use_folder_tree
    from nnssl.planning.api import plan_and_preprocess

    tree = use_folder_tree(root)
    existing = known_datasets(("raw",))
    with quiet():
        if "Dataset001_BTCV" not in existing:
            convert_btcv(labeled_subset(pool, n, os.path.join(root, "RawData")), dataset_id=1, progress=False)
        if "Dataset002_CTUnlabeled" not in existing:
            convert_unlabeled(pool["unlabeled"], dataset_id=2, name=UNLABELED, progress=False)
        tree["labelsTs"] = copy_test_labels(pool["testing_labels"],
                                             os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV"))
        os.environ["nnUNet_n_proc_DA"] = "1"  # nnU-Net's planner divides by it in its VRAM estimate; 0 crashes
        plan_and_preprocess(DATASET, architectures=list(archs), pretraining=[UNLABELED], preset="tiny",
                            num_processes=1, show_progress=False)
    # Data loading in the main process from here on: forked loader workers of a process that has
    # already run torch (an earlier fine-tuning) deadlocked in the second pretraining of a run.
    os.environ["nnUNet_n_proc_DA"] = "0"
    return tree


def pretrain_once(root: str, arch: str, seed: int, iterations: int) -> str:
    from nnssl.training.pretrainer import pretrain
    folder = os.path.join(root, "pretraining", arch)
    ckpt = os.path.join(folder, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        resume = os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
        with quiet():
            pretrain(DATASET, "volume_fusion", arch, UNLABELED, iterations=iterations,
                     iterations_per_epoch=max(1, iterations // 5), batch_size=2, device="cpu", resume=resume,
                     seed=seed, num_workers=0, output_folder=folder)
    return ckpt


def finetune_and_score(root: str, tree: dict, arch: str, label: str, ckpt, seed: int, a) -> float:
    """Fine-tune (fold all), predict the test images, evaluate; returns the foreground mean Dice."""
    from nnssl.evaluation.evaluate import evaluate_folder
    from nnssl.inference.predict import predict
    from nnssl.training.finetune import train

    run_root = os.path.join(root, "runs", arch, label)
    os.environ["nnUNet_results"] = os.path.join(run_root, "nnUNet_results")  # one results tree per run
    pred_dir = os.path.join(run_root, "test_predictions")
    summary = os.path.join(pred_dir, "summary.json")
    if not os.path.isfile(summary):
        torch.manual_seed(seed)
        with quiet():
            train(DATASET, "3d_fullres", "all", architecture=arch, pretrained=ckpt, epochs=a.epochs,
                  iterations_per_epoch=a.iterations_per_epoch, val_iterations=1, device="cpu")
            predict(os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV", "imagesTs"), pred_dir, DATASET,
                    folds=("all",), architecture=arch, device="cpu", disable_tta=True, npp=1, nps=1)
            evaluate_folder(tree["labelsTs"], pred_dir, DATASET, num_processes=1)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    return float(load_json(summary)["foreground_mean"]["Dice"])


def run(a, scores: dict) -> None:
    """Fill ``scores``: {(arch, n): {"scratch": [dice per seed], "pretrained": [...]}} (kept when interrupted)."""
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv

    torch.set_num_threads(a.threads)
    os.environ["nnUNet_def_n_proc"] = "1"
    base = os.path.abspath(a.out)
    for seed in a.seeds:
        with quiet():
            pool = write_synthetic_btcv(os.path.join(base, f"seed{seed}", "pool"), cases=max(a.n_labeled),
                                        test_cases=TEST_CASES, unlabeled=a.unlabeled, seed=seed,
                                        shape=tuple(a.shape))
        for n in a.n_labeled:
            root = os.path.join(base, f"seed{seed}", f"n{n}")
            t0 = time.time()
            tree = prepare_tree(root, pool, n, a.architectures)
            for arch in a.architectures:
                ckpt = pretrain_once(root, arch, seed, a.pretrain_iterations)
                row = scores.setdefault((arch, n), {"scratch": [], "pretrained": []})
                for label, pre in (("scratch", None), ("pretrained", ckpt)):
                    row[label].append(finetune_and_score(root, tree, arch, label, pre, seed, a))
                print(f"seed {seed} n {n} {arch}: scratch {row['scratch'][-1]:.4f} "
                      f"pretrained {row['pretrained'][-1]:.4f} ({time.time() - t0:.0f} s so far)", flush=True)


def fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def main(argv=None) -> None:
    a = parse_args(argv)
    temp = a.out is None
    if temp:
        a.out = tempfile.mkdtemp(prefix="nnssl_bench_pretraining_helps_")
    t0, scores, status = time.time(), {}, "complete"
    try:
        run(a, scores)
    except KeyboardInterrupt:  # Ctrl-C: report the finished (seed, n, architecture) runs
        status = "INTERRUPTED; only finished runs are counted"
    finally:
        if temp:
            shutil.rmtree(a.out, ignore_errors=True)
    print(f"\nRun {status}. Settings: seeds {a.seeds}, n_labeled {a.n_labeled}, architectures "
          f"{a.architectures} (tiny preset), shape {tuple(a.shape)}, {a.unlabeled} unlabeled / {TEST_CASES} "
          f"test cases per seed, Volume Fusion {a.pretrain_iterations} iterations (batch 2), fine-tuning "
          f"{a.epochs} epochs x {a.iterations_per_epoch} iterations (fold all), CPU, {a.threads} torch threads; "
          f"wall {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    print("Test Dice = nnU-Net foreground mean Dice over the test cases; mean ± std (ddof 1) over seeds"
          " (n = seeds finished).\n")
    print("| architecture | n_labeled | scratch Dice | pretrained Dice | pretrained − scratch |")
    print("|---|---|---|---|---|")
    for (arch, n), row in sorted(scores.items()):
        k = len(row["pretrained"])  # an interrupted run may have a scratch score without its partner
        if k == 0:
            continue
        scratch, pre = row["scratch"][:k], row["pretrained"]
        diff = np.asarray(pre) - np.asarray(scratch)
        print(f"| {arch} | {n} | {fmt(scratch)} | {fmt(pre)} | {fmt(diff)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
