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
noise.

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
runs), ``settings.json`` (a rerun with other settings is refused), ``results.csv`` (one row
per run), ``results.md`` and ``results.png`` (see :mod:`nnssl.benchmark_ssl_report`).
"""
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnssl.devices import cpu_autocast_dtype
from nnssl.errors import NnsslError
from nnssl.io import write_json

DATA_KINDS = ("intask", "pool")
SCRATCH = "scratch"
# Settings that only add runs to a finished benchmark (a rerun with them changed resumes and adds).
ADDS_RUNS_ONLY = ("equal_budget",)
CONFIG = "3d_fullres"


@dataclass(frozen=True)
class BenchmarkSettings:
    dataset: Optional[str] = None  # None: synthetic phantoms
    pool_dataset: Optional[str] = None  # unlabeled dataset for data "pool" with a user dataset
    methods: Tuple[str, ...] = ()  # () = every registered method
    architectures: Tuple[str, ...] = ("plainconvunet",)
    seeds: Tuple[int, ...] = (0, 1, 2)
    n_labeled: Tuple[int, ...] = (1, 6)
    data: Tuple[str, ...] = DATA_KINDS
    pretrain_iterations: int = 300
    pretrain_batch_size: int = 2
    finetune_iterations: int = 300
    iterations_per_epoch: int = 20
    val_iterations: int = 1
    equal_budget: bool = False
    threshold: float = 0.3  # validation pseudo Dice whose first crossing is "iterations to threshold"
    trainer: str = "nnsslTrainer_Short"
    preset: str = "tiny"
    # synthetic data only
    labeled_pool: int = 6
    val_cases: int = 2
    test_cases: int = 3
    unlabeled: int = 10
    shape: Tuple[int, int, int] = (32, 64, 64)
    method_overrides: Tuple[str, ...] = ()  # "method.key=value" for nnssl_pretrain's --set

    def to_json(self) -> dict:
        """The settings plus the fine-tuning trainer's recipe (a changed recipe must not mix with old runs)."""
        from nnssl.training.trainer_lookup import find_trainer_class

        d = dataclasses.asdict(self)
        recipe = getattr(find_trainer_class(self.trainer), "recipe", None)
        if dataclasses.is_dataclass(recipe):
            d["trainer_recipe"] = dataclasses.asdict(recipe)
        # fine-tuning runs on the CPU; bf16 and float32 runs must not mix either (--cpu_precision auto)
        d["cpu_autocast"] = str(cpu_autocast_dtype("auto", torch.device("cpu")) or "float32")
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class Run:
    architecture: str
    start: str  # "scratch" or "METHOD/DATA"
    n: int
    seed: int
    finetune_iterations: int
    pretrain_iterations: int = 0
    budget: str = "same"  # "same" | "equal" (scratch run as long as pretraining + fine-tuning)

    @property
    def folder(self) -> str:
        suffix = "_equal" if self.budget == "equal" else ""
        return os.path.join("runs", self.architecture, self.start.replace("/", "__"), f"n{self.n}_s{self.seed}{suffix}")


def seed_everything(seed: int) -> None:
    """Seed the global RNGs nnU-Net's training draws from (augmentation, sampling, initialization)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def organ_dice(summary: dict, dataset_json: dict) -> Dict[str, float]:
    """Class name -> mean test Dice from an nnssl/nnU-Net ``summary.json``."""
    from nnssl.evaluation.evaluate import label_names

    return {name: float(summary["mean"][key]["Dice"]) for key, name in label_names(dataset_json).items()
            if key in summary["mean"]}


def iterations_to_threshold(val_dice: Sequence[float], iterations_per_epoch: int, threshold: float) -> Optional[int]:
    """Training iterations done when the per-epoch validation Dice first reaches ``threshold`` (None: never)."""
    for epoch, d in enumerate(val_dice):
        if d is not None and np.isfinite(d) and d >= threshold:
            return (epoch + 1) * int(iterations_per_epoch)
    return None


def paired_stats(pretrained: Sequence[float], scratch: Sequence[float]) -> dict:
    """Mean/std (ddof 1; 0 for one value) of both, and of the paired difference pretrained - scratch.

    ``verdict``: "helps" / "hurts" when the mean difference is more than twice its standard error
    (std / sqrt(k)) away from 0, else "within noise" (always with fewer than 2 pairs).
    """
    p, s = np.asarray(pretrained, float), np.asarray(scratch, float)
    if p.shape != s.shape or p.size == 0:
        raise ValueError("paired_stats needs the same, non-zero number of pretrained and scratch values")
    d = p - s
    k = d.size
    std = lambda v: float(v.std(ddof=1)) if v.size > 1 else 0.0  # noqa: E731
    se = std(d) / np.sqrt(k) if k > 1 else float("inf")
    mean = float(d.mean())
    verdict = "within noise" if k < 2 or abs(mean) <= 2 * se else ("helps" if mean > 0 else "hurts")
    return {"k": k, "pretrained_mean": float(p.mean()), "pretrained_std": std(p), "scratch_mean": float(s.mean()),
            "scratch_std": std(s), "diff_mean": mean, "diff_std": std(d), "verdict": verdict}


def planned_runs(s: BenchmarkSettings, methods: Sequence[str]) -> List[Run]:
    runs = []  # budget-major, so that an interrupted benchmark has every seed and start of the first budgets
    for arch in s.architectures:
        for n in s.n_labeled:
            for seed in s.seeds:
                runs.append(Run(arch, SCRATCH, n, seed, s.finetune_iterations))
                for m in methods:
                    for data in s.data:
                        runs.append(Run(arch, f"{m}/{data}", n, seed, s.finetune_iterations, s.pretrain_iterations))
                if s.equal_budget:
                    runs.append(Run(arch, SCRATCH, n, seed, equal_budget_iterations(s), 0, "equal"))
    return runs


def equal_budget_iterations(s: BenchmarkSettings) -> int:
    """Fine-tuning iterations of the equal-budget scratch run: pretraining + fine-tuning of the others."""
    return s.finetune_iterations + s.pretrain_iterations


def validate(s: BenchmarkSettings) -> List[str]:
    """Check everything that can be checked before any file is written; returns the methods to run."""
    from nnssl.architectures import ARCHITECTURES
    from nnssl.ssl import METHODS
    from nnssl.ssl.base import check_compatible
    from nnssl.training.trainer_lookup import find_trainer_class

    for a in s.architectures:
        ARCHITECTURES.get(a)
    methods = list(s.methods) or list(METHODS.names())
    for m in methods:
        METHODS.get(m)
        if s.methods:  # asked for by name: an impossible pair is an error
            for a in s.architectures:
                check_compatible(m, a)
    if not s.methods:  # every registered method: keep those that run on every chosen architecture
        methods = [m for m in methods if all(_compatible(m, a) for a in s.architectures)]
    find_trainer_class(s.trainer)
    bad = [d for d in s.data if d not in DATA_KINDS]
    if bad:
        raise NnsslError(f"--data {' '.join(bad)}: unknown; choose from {', '.join(DATA_KINDS)}.")
    if "pool" in s.data and s.dataset is not None and s.pool_dataset is None:
        raise NnsslError("--data pool with -d needs --pool UNLABELED_DATASET (a converted unlabeled dataset); "
                         "or pass --data intask.")
    if len(s.seeds) != len(set(s.seeds)) or not s.seeds:
        raise NnsslError(f"--seeds {s.seeds}: give distinct seeds (at least 3 to see the spread).")
    for name, v in (("--iterations", s.finetune_iterations), ("--iterations_per_epoch", s.iterations_per_epoch),
                    ("--pretrain_iterations", s.pretrain_iterations)):
        if v < 1:
            raise NnsslError(f"{name} must be at least 1 (got {v}).")
    for v in (s.finetune_iterations, equal_budget_iterations(s) if s.equal_budget else s.iterations_per_epoch):
        if v < s.iterations_per_epoch or v % s.iterations_per_epoch:
            raise NnsslError(
                f"Fine-tuning iterations {v} are not a positive multiple of --iterations_per_epoch "
                f"{s.iterations_per_epoch} (with --equal_budget also --iterations plus --pretrain_iterations). "
                f"Choose budgets that divide into whole epochs.")
    overrides_for(s, methods)
    return methods


def _compatible(method: str, arch: str) -> bool:
    from nnssl.ssl.base import check_compatible
    try:
        check_compatible(method, arch)
        return True
    except NnsslError:
        return False


def overrides_for(s: BenchmarkSettings, methods: Sequence[str], method: Optional[str] = None) -> List[str]:
    out = []
    for item in s.method_overrides:
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest or name not in methods:
            raise NnsslError(f"--set '{item}': expected METHOD.key=value with METHOD one of {', '.join(methods)}, "
                             f"e.g. --set masked_kmeans.warmup_iterations=20.")
        if name == method:
            out.append(rest)
    return out


def check_settings_file(out_dir: str, s: BenchmarkSettings) -> None:
    """Refuse to mix runs of other settings into ``out_dir``; write settings.json on the first run."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        new = s.to_json()
        diff = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and k not in ADDS_RUNS_ONLY]
        if diff:
            raise NnsslError(f"{out_dir} holds a benchmark with other settings ({'; '.join(diff)}). Rerun with "
                             f"the same settings to resume, or pass another -o.")
        if old.get("equal_budget") != new.get("equal_budget") and new.get("equal_budget"):
            write_json(new, path)
    else:
        os.makedirs(out_dir, exist_ok=True)
        write_json(s.to_json(), path)


def run_benchmark(s: BenchmarkSettings, out_dir: str, log=print) -> dict:
    """Run (or resume) every planned run, then write results.csv/.md/.png; returns the report dict."""
    from nnssl.benchmark_data import prepare_data
    from nnssl.benchmark_ssl_report import write_reports

    methods = validate(s)
    out_dir = os.path.abspath(out_dir)
    data = prepare_data(s, out_dir, methods)  # refuses a label budget larger than the pool, before writing
    check_settings_file(out_dir, s)
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
        ckpt = pretrain_once(s, data, run.architecture, method, kind, out_dir, overrides_for(s, methods, method))
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


def pretrain_once(s: BenchmarkSettings, data, arch: str, method: str, kind: str, out_dir: str,
                  overrides: Sequence[str]) -> str:
    from nnssl.training.pretrainer import pretrain

    folder = os.path.join(out_dir, "pretraining", arch, f"{method}__{kind}")
    ckpt = os.path.join(folder, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        resume = os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
        pretrain(data.target, method, arch, data.pretraining_dataset(kind), configuration=CONFIG,
                 iterations=s.pretrain_iterations, iterations_per_epoch=max(1, s.pretrain_iterations // 10),
                 batch_size=s.pretrain_batch_size, device="cpu", resume=resume, seed=s.seeds[0],
                 overrides=tuple(overrides), num_workers=0, output_folder=folder)
    return ckpt
