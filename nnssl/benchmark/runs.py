"""``nnssl_benchmark_ssl``: does SSL pretraining help on this dataset, and by more than the noise?

One labeled dataset (the user's ``-d``, or synthetic BTCV-like phantoms) is split by case
identifier, the same split for every run: the last ``test_cases`` cases are the test set, the
``val_cases`` before them the validation set (nnU-Net's per-epoch pseudo Dice: the learning
curves), the rest the **labeled pool**. For label budget n and seed s the fine-tuning cases
are n cases of the pool drawn with ``numpy.random.default_rng(s)``; each (n, s) is one fold
of the benchmark's own ``splits_final.json``. Everything runs in the benchmark's own nnU-Net
folder tree under the output folder (a user dataset is linked there read-only, then planned
and preprocessed with the ``tiny`` preset), never in the user's.

Pretraining data (``--data``): ``intask`` = the pool's own images (labels unused; the
semi-supervised setting of in-task SSL, e.g. LWI), ``pool`` = a separate unlabeled set
(synthetic: ``unlabeled`` phantom volumes; with ``-d``: the dataset given by ``--pool``).
Both are converted as unlabeled datasets and preprocessed with the target's plans. Each
(architecture, method, data) is pretrained **once** (seed = the first seed), so the spread
over seeds is fine-tuning noise (data subset, initialization, augmentation), not pretraining
noise, and a verdict holds for that one pretraining run; ``--pretrain_per_seed`` pretrains once
per seed (seed s for the runs of seed s), so the spread includes the pretraining's.

Per (architecture, start, n, seed) the fine-tuning (trainer ``--trainer``, default the
short-budget recipe ``nnsslTrainer_Short``; scratch and pretrained get the same one and the
same budget) runs with every global RNG seeded (``random``, ``numpy``, ``torch``: nnU-Net's
augmentation draws from them; its loader workers are switched off for that), predicts and
evaluates the test cases. ``--equal_budget`` adds, per (n, seed), a scratch run of
``--iterations`` + ``--pretrain_iterations`` fine-tuning iterations, against which every
pretrained run (P pretraining + F fine-tuning iterations) is also compared: the same total
number of iterations (LWI, Table VII: 800 SSL + 4200 fine-tuning epochs vs 5000 fine-tuning
epochs). It counts iterations, not compute (a pretraining and a fine-tuning iteration do not
cost the same, and pretraining runs once for every label budget and seed).

Outputs (atomic, under ``-o``): ``runs/.../result.json`` per run (a rerun skips finished
runs), ``settings.json`` (a rerun with other settings is refused), ``command.txt`` (the
command line), ``results.csv`` (one row per run), ``results.md`` and ``results.png`` (see
:mod:`nnssl.benchmark.report`).
"""
import dataclasses
import os
import shlex
import time
from typing import Dict, List, Optional, Sequence


from nnssl.benchmark.data import prepare_data
from nnssl.benchmark.report import write_reports
from nnssl.benchmark.settings import CONFIG, SCRATCH, BenchmarkSettings, Run, check_settings_file, overrides_for, \
    planned_runs, validate
from nnssl.benchmark.stats import iterations_to_threshold
from nnssl.io import atomic_path, write_json
from nnssl.training.finetune import seed_everything


def organ_dice(summary: dict, dataset_json: dict) -> Dict[str, float]:
    """Class name -> mean test Dice from an nnssl/nnU-Net ``summary.json``."""
    from nnssl.evaluation.evaluate import label_names

    return {name: float(summary["mean"][key]["Dice"]) for key, name in label_names(dataset_json).items()
            if key in summary["mean"]}


def run_benchmark(s: BenchmarkSettings, out_dir: str, log=print, command: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) every planned run, then write results.csv/.md/.png; returns the report dict.

    ``command``: the command line (argv) written to ``command.txt``. Nothing is written before
    the settings and the data were checked."""
    methods = validate(s)
    out_dir = os.path.abspath(out_dir)
    data = prepare_data(s, out_dir, methods)  # refuses a label budget larger than the pool, before writing
    check_settings_file(out_dir, s)
    if command is not None:
        with atomic_path(os.path.join(out_dir, "command.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(shlex.join(command) + "\n")
    data = data.materialize()
    runs = planned_runs(s, methods)
    results = []
    for i, run in enumerate(runs, 1):
        t0 = time.time()
        r = run_one(s, data, run, out_dir, methods)
        results.append(r)
        log(f"[{i}/{len(runs)}] {run.architecture} {run.start} n={run.n} seed={run.seed} {run.budget}: "
            f"test Dice {r['test_dice']:.3f} ({time.time() - t0:.0f} s)")
        write_reports(s, results, out_dir, figure=False)  # the tables so far; the figure at the end
    return write_reports(s, results, out_dir)


def run_one(s: BenchmarkSettings, data, run: Run, out_dir: str, methods: Sequence[str]) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnssl.evaluation.evaluate import evaluate_folder
    from nnssl.inference.predict import predict
    from nnssl.training.finetune import train

    folder = os.path.join(out_dir, run.folder)
    result_file = os.path.join(folder, "result.json")
    if os.path.isfile(result_file):
        return load_json(result_file)
    ckpt = None
    if run.start != SCRATCH:
        method, kind = run.start.split("/")
        ckpt = pretrain_once(s, data, run.architecture, method, kind, out_dir, overrides_for(s, methods, method),
                             pretraining_seed(s, run.seed))
    os.environ["nnUNet_results"] = os.path.join(folder, "nnUNet_results")
    fold = data.fold_of(run.n, run.seed)
    t0 = time.time()
    seed_everything(run.seed)
    epochs = run.finetune_iterations // s.iterations_per_epoch
    out = train(data.target, CONFIG, fold, architecture=run.architecture, trainer=s.trainer, pretrained=ckpt,
                epochs=epochs, iterations_per_epoch=s.iterations_per_epoch, val_iterations=s.val_iterations,
                device="cpu", final_validation=False)
    train_s = time.time() - t0
    pred = os.path.join(folder, "test_predictions")
    predict(data.test_images, pred, data.target, folds=(fold,), architecture=run.architecture, trainer=s.trainer,
            device="cpu", disable_tta=True, npp=0, nps=0)
    summary = evaluate_folder(data.test_labels, pred, data.target, num_processes=1)
    curve = validation_curve(out["output_folder"])
    result = {**dataclasses.asdict(run), "fold": fold, "test_dice": float(summary["foreground_mean"]["Dice"]),
              "test_dice_per_class": organ_dice(summary, data.dataset_json()),
              "pretraining": ckpt, "test_cases": len(data.test),
              "val_dice": curve["val_dice"], "val_loss": curve["val_loss"], "train_loss": curve["train_loss"],
              "iterations_to_threshold": iterations_to_threshold(curve["val_dice"], s.iterations_per_epoch,
                                                                 s.threshold),
              "train_seconds": train_s, "load_average": os.getloadavg()[0], "fold_dir": out["output_folder"]}
    write_json(result, result_file)
    return result


def validation_curve(fold_dir: str) -> Dict[str, List[float]]:
    """Per-epoch validation pseudo Dice and losses (nnU-Net's logger, via the shared parser)."""
    from nnssl.evaluation.curves import learning_curves

    c = learning_curves(fold_dir)
    return {"val_dice": _floats(c["mean_fg_dice"]), "val_loss": _floats(c["val_losses"]),
            "train_loss": _floats(c["train_losses"])}


def _floats(values) -> List[float]:
    return [float(v) for v in values]


def pretraining_seed(s: BenchmarkSettings, seed: int) -> int:
    """The seed of the pretraining a run of ``seed`` starts from: its own with --pretrain_per_seed, else the first."""
    return seed if s.pretrain_per_seed else s.seeds[0]


def pretraining_folder(out_dir: str, arch: str, method: str, kind: str, s: BenchmarkSettings, seed: int) -> str:
    name = f"{method}__{kind}" + (f"__s{seed}" if s.pretrain_per_seed else "")
    return os.path.join(out_dir, "pretraining", arch, name)


def pretrain_once(s: BenchmarkSettings, data, arch: str, method: str, kind: str, out_dir: str,
                  overrides: Sequence[str], seed: int) -> str:
    from nnssl.training.pretrainer import pretrain

    folder = pretraining_folder(out_dir, arch, method, kind, s, seed)
    ckpt = os.path.join(folder, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        resume = os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
        pretrain(data.target, method, arch, data.pretraining_dataset(kind), configuration=CONFIG,
                 iterations=s.pretrain_iterations, iterations_per_epoch=max(1, s.pretrain_iterations // 10),
                 batch_size=s.pretrain_batch_size, device="cpu", resume=resume, seed=seed,
                 overrides=tuple(overrides), num_workers=0, output_folder=folder)
    return ckpt
