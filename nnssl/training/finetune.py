"""Fine-tuning (and training from scratch) on nnU-Net's training machinery.

``train(...)`` is ``nnUNetv2_train`` with nnssl's additions: trainer lookup without nnU-Net's
folder crawl, training length set per run (``--epochs`` etc. are written onto the trainer
instance after construction, before ``initialize()``, so no class per value is needed, and
they work for nnU-Net's own ``nnUNetTrainer`` too), pretrained-weight injection with a report,
the warm-up options of nnssl's trainers, and errors instead of nnU-Net's silent fallbacks
(``--c`` with nothing to continue from starts over in nnU-Net; here it is refused).

Results land where nnU-Net puts them:
``$nnUNet_results/DatasetXXX/Trainer__Plans__config/fold_X/`` (``checkpoint_final.pth``,
``validation/``, ``progress.png``, the training log), plus ``nnssl_training_options.json`` (the
options of this fold, reused by ``--c`` / ``--val`` for flags not given again) and, with
``-pretrained``, ``nnssl_pretrained.json`` (see ``injection.py``).
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import torch

from nnssl import paths
from nnssl.datasets import resolve
from nnssl.devices import cpu_autocast_dtype, resolve_device
from nnssl.errors import NnsslError
from nnssl.io import check_writable, write_json

OPTIONS_FILE = "nnssl_training_options.json"
DEFAULT_ARCHITECTURE = "plainconvunet"


@dataclass
class RunOptions:
    """Per-run training options; None = not given (trainer default, or the saved value on --c)."""
    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    val_iterations: Optional[int] = None
    warmup_epochs: Optional[int] = None
    freeze_encoder_epochs: Optional[int] = None
    cpu_precision: Optional[str] = None  # None = "auto" (nnssl.devices.cpu_autocast_dtype)

    def merged_over(self, saved: dict) -> "RunOptions":
        return RunOptions(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                             else saved.get(f.name) for f in fields(self)})


FOLD_RANGE = ("Fold '{fold}': fold must be 0–4 or all (nnU-Net's 5-fold cross-validation; 'all' trains on every "
              "case; a splits_final.json with more folds allows more).")


def _fold(fold: Union[int, str]) -> Union[int, str]:
    if str(fold) == "all":
        return "all"
    try:
        value = int(fold)
    except ValueError:
        value = -1
    if value < 0:
        raise NnsslError(FOLD_RANGE.format(fold=fold))
    return value


def fold_folder(ds: str, trainer_name: str, plans_name: str, configuration: str, fold=None) -> str:
    """``$nnUNet_results/DatasetXXX/Trainer__Plans__config[/fold_X]``, named by nnU-Net's own function.

    (nnU-Net's ``get_output_folder`` reads ``nnUNet_results`` once at import; nnssl's folders follow
    the variable as it is now, see ``nnssl.paths``.)"""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    folder = os.path.join(paths.results(), ds,
                          convert_trainer_plans_config_to_identifier(trainer_name, plans_name, configuration))
    return folder if fold is None else os.path.join(folder, f"fold_{fold}")


def _positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and int(value) < minimum:
        raise NnsslError(f"{name} must be at least {minimum} (got {value}).")


def resolve_run(dataset, configuration: str, architecture: Optional[str], plans: Optional[str],
                trainer: Optional[str], where=("preprocessed",)):
    """(dataset full name, plans name, trainer name) from the CLI arguments and the architecture registry."""
    from nnssl.architectures import ARCHITECTURES
    from nnssl.architectures.spec import architecture_for_plans

    paths.ensure_paths()
    ds = resolve(dataset, where=where)
    if architecture is None and plans is not None:
        try:
            spec = architecture_for_plans(plans)
        except NnsslError:  # --like plans name their architecture; others: nnU-Net's default network trainer
            spec = ARCHITECTURES.get(_named_architecture(ds, plans) or DEFAULT_ARCHITECTURE)
    else:
        spec = ARCHITECTURES.get(architecture or DEFAULT_ARCHITECTURE)
    return ds, plans or spec.plans_name, trainer or spec.trainer, spec


def _named_architecture(ds: str, plans_name: str) -> Optional[str]:
    """The ``"nnssl_architecture"`` a plans file records (``--like`` plans do), if any."""
    try:
        with open(os.path.join(paths.preprocessed(), ds, plans_name + ".json"), encoding="utf-8") as f:
            return json.load(f).get("nnssl_architecture")
    except (OSError, ValueError, AttributeError):
        return None


def _load_plans(ds: str, plans_name: str, configuration: str, arch_name: str) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    base = os.path.join(paths.preprocessed(), ds)
    plans_file = os.path.join(base, plans_name + ".json")
    if not os.path.isfile(plans_file):
        raise NnsslError(f"Plans file {plans_file} does not exist. Plan and preprocess first: "
                         f"nnssl_plan_and_preprocess -d {ds} -a {arch_name}")
    plans = load_json(plans_file)
    if configuration not in plans.get("configurations", {}):
        raise NnsslError(f"Configuration '{configuration}' is not in {plans_file}; it has "
                         f"{', '.join(plans.get('configurations', {}))}.")
    cfg = plans["configurations"][configuration]
    data_id = cfg.get("data_identifier")
    data_dir = os.path.join(base, data_id) if data_id else None
    if data_dir is None or not os.path.isdir(data_dir) or not os.listdir(data_dir):
        raise NnsslError(f"Preprocessed data {data_dir} for configuration '{configuration}' is missing. Run "
                         f"nnssl_plan_and_preprocess -d {ds} -a {arch_name} -c {configuration}")
    return plans


def _check_fold_possible(ds: str, plans: dict, configuration: str, fold) -> None:
    """nnU-Net's 5-fold split needs 5 cases; without a splits_final.json it would crash in scikit-learn."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    base = os.path.join(paths.preprocessed(), ds)
    splits = os.path.join(base, "splits_final.json")
    if fold == "all":
        return
    if os.path.isfile(splits):
        with open(splits, encoding="utf-8") as f:
            n_folds = len(json.load(f))
        if fold >= n_folds:  # nnU-Net would silently train on a random 80:20 split instead
            raise NnsslError(f"Fold '{fold}': {splits} has {n_folds} fold(s), so fold must be 0–{n_folds - 1} "
                             f"or all.")
        return
    if fold > 4:
        raise NnsslError(FOLD_RANGE.format(fold=fold))
    data_dir = os.path.join(base, plans["configurations"][configuration]["data_identifier"])
    n = len(infer_dataset_class(data_dir).get_identifiers(data_dir))
    if n < 5:
        raise NnsslError(f"{ds} has {n} training cases, too few for nnU-Net's 5-fold cross-validation (fold {fold}). "
                         f"Train with fold 'all' (validation on the training cases), or write your own split to "
                         f"{os.path.join(base, 'splits_final.json')}.")


def _checkpoint_to_continue(fold_dir: str, cmd: str) -> str:
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        if os.path.isfile(os.path.join(fold_dir, name)):
            return os.path.join(fold_dir, name)
    raise NnsslError(f"--c: there is no checkpoint to continue from in {fold_dir} (nnU-Net writes "
                     f"checkpoint_latest.pth every 50 epochs). Start the training without --c: {cmd}")


def apply_run_options(trainer, opts: RunOptions) -> None:
    """Set training length and nnssl options on a constructed, not yet initialized trainer."""
    from nnssl.training.trainers.base import FinetuneOptionsMixin, TRAINERS

    if opts.epochs is not None:
        trainer.num_epochs = int(opts.epochs)
    if opts.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(opts.iterations_per_epoch)
    if opts.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = int(opts.val_iterations)
    if opts.warmup_epochs or opts.freeze_encoder_epochs:
        if not isinstance(trainer, FinetuneOptionsMixin):
            raise NnsslError(f"--warmup_epochs / --freeze_encoder_epochs need an nnssl trainer; "
                             f"{type(trainer).__name__} is not one. Use -tr with one of {', '.join(TRAINERS.names())} "
                             f"(nnsslTrainer = nnU-Net's defaults plus these options).")
        trainer.nnssl_warmup_epochs = int(opts.warmup_epochs or 0)
        trainer.nnssl_freeze_encoder_epochs = int(opts.freeze_encoder_epochs or 0)
    set_cpu_precision(trainer, opts.cpu_precision or "auto")


def check_cpu_precision(precision: Optional[str], trainer_cls: type) -> None:
    """Refuse an unknown ``--cpu_precision`` and "bf16" for a trainer without the nnssl options."""
    from nnssl.training.trainers.base import FinetuneOptionsMixin

    if precision is None:
        return
    cpu_autocast_dtype(precision, torch.device("cpu"))  # refuses an unknown value
    if precision == "bf16" and not issubclass(trainer_cls, FinetuneOptionsMixin):
        raise NnsslError(f"--cpu_precision bf16 needs an nnssl trainer; {trainer_cls.__name__} is not one "
                         f"(use -tr nnsslTrainer for nnU-Net's recipe, or --cpu_precision fp32).")


def set_cpu_precision(trainer, precision: str = "auto") -> None:
    """CPU mixed precision of an nnssl trainer (``--cpu_precision``); other trainers keep nnU-Net's
    float32 on the CPU ("auto") or are refused ("bf16")."""
    from nnssl.training.trainers.base import FinetuneOptionsMixin

    check_cpu_precision(precision, type(trainer))
    if isinstance(trainer, FinetuneOptionsMixin):
        trainer.nnssl_cpu_autocast = cpu_autocast_dtype(precision, trainer.device)


@dataclass
class TrainingRun:
    """A constructed (not yet initialized) trainer and where it stands."""
    trainer: object
    dataset: str
    plans_name: str
    fold_dir: str


def build_trainer(dataset, configuration: str = "3d_fullres", fold: Union[int, str] = 0,
                  architecture: Optional[str] = None, trainer: Optional[str] = None, plans: Optional[str] = None,
                  device: Optional[str] = None, continue_training: bool = False,
                  cpu_precision: str = "auto") -> TrainingRun:
    """Validate the inputs and construct the trainer the way nnUNetv2_train does (no training yet)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnssl.training.trainer_lookup import find_trainer_class

    fold = _fold(fold)
    dev = resolve_device(device)
    ds, plans_name, trainer_name, spec = resolve_run(dataset, configuration, architecture, plans, trainer)
    plans_dict = _load_plans(ds, plans_name, configuration, spec.name)
    _check_fold_possible(ds, plans_dict, configuration, fold)
    trainer_cls = find_trainer_class(trainer_name)
    name = trainer_cls.__name__
    fold_dir = fold_folder(ds, name, plans_name, configuration, fold)
    plans_dict["continue_training"] = continue_training
    dataset_json = load_json(os.path.join(paths.preprocessed(), ds, "dataset.json"))
    tr = trainer_cls(plans=plans_dict, configuration=configuration, fold=fold, dataset_json=dataset_json, device=dev)
    if tr.is_ddp and dev.type == "cpu":  # nnU-Net moves every DDP rank to CUDA; gloo ranks stay here (ddp.py)
        tr.device, tr.grad_scaler = dev, None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    set_cpu_precision(tr, cpu_precision)
    return TrainingRun(tr, ds, plans_name, fold_dir)


def train(dataset, configuration: str = "3d_fullres", fold: Union[int, str] = 0, architecture: Optional[str] = None,
          trainer: Optional[str] = None, plans: Optional[str] = None, pretrained: Optional[str] = None,
          epochs: Optional[int] = None, iterations_per_epoch: Optional[int] = None,
          val_iterations: Optional[int] = None, warmup_epochs: Optional[int] = None,
          freeze_encoder_epochs: Optional[int] = None, device: Optional[str] = None,
          cpu_precision: Optional[str] = None, continue_training: bool = False, npz: bool = False,
          validation_only: bool = False,
          allow_plans_mismatch: bool = False, final_validation: bool = True) -> dict:
    """Train (or fine-tune with ``pretrained``) one fold; returns the fold folder and the injection report.

    ``final_validation=False`` skips nnU-Net's prediction of the validation cases after training
    (``nnssl_benchmark_ssl`` reads the per-epoch validation from the log and tests on its own cases).

    ``allow_plans_mismatch``: fine-tune from a checkpoint pretrained under plans that preprocess
    differently (see ``injection.py``); the differences are logged instead of refused."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnssl.training.injection import inject_pretrained

    for flag, v, m in (("--epochs", epochs, 1), ("--iterations_per_epoch", iterations_per_epoch, 1),
                       ("--val_iterations", val_iterations, 1), ("--warmup_epochs", warmup_epochs, 0),
                       ("--freeze_encoder_epochs", freeze_encoder_epochs, 0)):
        _positive(flag, v, m)
    resolve_device(device)  # an unusable -device (e.g. mps without MPS) is refused first
    if continue_training and pretrained:
        raise NnsslError("--c continues a fine-tuning that already started from its own checkpoint; -pretrained "
                         "only applies to a fresh start. Drop one of the two.")
    if continue_training and validation_only:
        raise NnsslError("--c and --val exclude each other: --val only re-runs the final validation.")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise NnsslError(f"Pretrained checkpoint (-pretrained) {pretrained} does not exist; pass the "
                         f"checkpoint_final.pth written by nnssl_pretrain.")
    # Checked before the trainer exists: constructing it creates the fold folder and a log file.
    ds, plans_name, trainer_name, _ = resolve_run(dataset, configuration, architecture, plans, trainer)
    probe = fold_folder(ds, trainer_name, plans_name, configuration, _fold(fold))
    check_writable(probe, "The fold folder (under nnUNet_results)")
    if cpu_precision is not None:  # before the trainer exists (it creates the fold folder)
        from nnssl.training.trainer_lookup import find_trainer_class
        check_cpu_precision(cpu_precision, find_trainer_class(trainer_name))
    resume_from = None
    if continue_training:
        resume_from = _checkpoint_to_continue(probe, f"nnssl_train {dataset} {configuration} {fold} (without --c)")
    elif validation_only:
        resume_from = os.path.join(probe, "checkpoint_final.pth")
        if not os.path.isfile(resume_from):
            raise NnsslError(f"--val needs a finished training ({resume_from} is missing). Train first, without --val.")
    elif os.path.isfile(os.path.join(probe, "checkpoint_final.pth")):
        print(f"nnssl_train: fold {fold} is already trained; training it again from the start overwrites "
              f"{os.path.join(probe, 'checkpoint_final.pth')} (as nnUNetv2_train does; --c continues it instead).")

    run = build_trainer(dataset, configuration, fold, architecture, trainer, plans, device,
                        continue_training=resume_from is not None)
    tr = run.trainer
    saved_file = os.path.join(run.fold_dir, OPTIONS_FILE)
    saved = load_json(saved_file) if resume_from is not None and os.path.isfile(saved_file) else {}
    opts = RunOptions(epochs, iterations_per_epoch, val_iterations, warmup_epochs,
                      freeze_encoder_epochs, cpu_precision).merged_over(saved.get("options", {}))
    apply_run_options(tr, opts)

    report = None
    if pretrained is not None:
        tr.initialize()
        report = inject_pretrained(tr, pretrained, allow_plans_mismatch=allow_plans_mismatch)
        if tr.is_ddp:
            from nnssl.training.same_start import verify_ranks_start_alike
            verify_ranks_start_alike(tr, report)
        if hasattr(tr, "nnssl_on_pretrained"):  # e.g. per-group lrs of nnsslTrainer_Short
            tr.nnssl_on_pretrained(report)
    elif resume_from is not None:
        tr.load_checkpoint(resume_from)
    if not validation_only:
        write_json({"options": asdict(opts), "trainer": type(tr).__name__, "plans": run.plans_name,
                    "configuration": configuration,
                    "pretrained": os.path.abspath(pretrained) if pretrained else saved.get("pretrained")}, saved_file)
        tr.run_training()
    if final_validation:
        tr.perform_actual_validation(npz)
    return {"output_folder": tr.output_folder, "trainer": type(tr).__name__, "plans": run.plans_name,
            "dataset": run.dataset, "injection": report.to_dict() if report is not None else None}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators. nnU-Net's trainer draws from them (network
    initialization, the loader's cases and crops, augmentation), so seeding them alike before two
    fine-tuning runs is the only way to pair them (the demo, ``nnssl_benchmark_ssl``)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
