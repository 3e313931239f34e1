"""Settings of ``nnssl_benchmark_ssl``, the planned runs, and every check made before a file is written.

No torch at import (the fine-tuning recipe and CPU precision are looked up only for ``settings.json``).
"""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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
    pretrain_per_seed: bool = False  # False: one pretraining per (method, data), seed = the first seed
    finetune_iterations: int = 300
    iterations_per_epoch: int = 20
    # validation batches per epoch of the curve behind "iterations to threshold": 4 halves the
    # sampling noise of 1 for ~9 % more time (benchmarks/results/val_iterations/README.md)
    val_iterations: int = 4
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
        import torch
        from nnssl.devices import cpu_autocast_dtype
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
        raise NnsslError(f"--seeds {' '.join(map(str, s.seeds))}: give distinct seeds (at least 3 for a verdict).")
    if any(seed < 0 for seed in s.seeds):
        raise NnsslError(f"--seeds {' '.join(map(str, s.seeds))}: seeds must be non-negative integers "
                         f"(numpy's default_rng draws the training cases from them), e.g. --seeds 0 1 2.")
    for name, v in (("--iterations", s.finetune_iterations), ("--iterations_per_epoch", s.iterations_per_epoch),
                    ("--pretrain_iterations", s.pretrain_iterations), ("--val_iterations", s.val_iterations),
                    ("--pretrain_batch_size", s.pretrain_batch_size), ("--test_cases", s.test_cases),
                    ("--val_cases", s.val_cases), ("--labeled_pool", s.labeled_pool)):
        if v < 1:
            raise NnsslError(f"{name} must be at least 1 (got {v}).")
    if not 0.0 < s.threshold <= 1.0:
        raise NnsslError(f"--threshold {s.threshold}: a validation pseudo Dice in (0, 1].")
    if s.dataset is None and (s.unlabeled < 1 or min(s.shape) < 1):
        raise NnsslError(f"--unlabeled {s.unlabeled} / --shape {' '.join(map(str, s.shape))}: must be positive.")
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
