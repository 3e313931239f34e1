"""The main job on the embedded default: synthetic data through the whole nnssl pipeline.

synthetic BTCV-like data -> convert (labeled + unlabeled) -> plan/preprocess (the unlabeled
set with the target's plans) -> Volume Fusion pretraining -> fine-tuning from the checkpoint
and from scratch with the same budget -> prediction of the test cases -> evaluation ->
comparison report.

Each step is skipped when its output already exists, so an interrupted demo resumes where it
stopped. The demo uses its own nnU-Net folder tree under the output directory (it never
touches the user's nnUNet_raw/preprocessed/results) and the ``tiny`` network preset, so it
runs on 2 CPU cores. The two fine-tuning runs get separate results trees because nnU-Net
names a result folder by trainer, plans and configuration only.
"""
import os
import time
from dataclasses import dataclass
from typing import Dict

from nnssl.errors import NnsslError
from nnssl.io import write_json


@dataclass(frozen=True)
class DemoSettings:
    name: str
    cases: int
    test_cases: int
    unlabeled: int
    pretrain_iterations: int
    finetune_epochs: int
    iterations_per_epoch: int
    shape: tuple  # voxels (Z, Y, X) of the synthetic volumes: sets the patch size and so the speed
    seed: int = 0
    architecture: str = "plainconvunet"
    method: str = "volume_fusion"
    preset: str = "tiny"


FULL = DemoSettings("full", cases=6, test_cases=3, unlabeled=10, pretrain_iterations=200,
                    finetune_epochs=10, iterations_per_epoch=20, shape=(32, 64, 64))
FAST = DemoSettings("fast", cases=3, test_cases=1, unlabeled=3, pretrain_iterations=10,
                    finetune_epochs=2, iterations_per_epoch=5, shape=(24, 48, 48))


def use_folder_tree(root: str) -> Dict[str, str]:
    folders = {var: os.path.join(root, var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, path in folders.items():
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path
    return folders


def _step(title: str) -> None:
    print(f"\n=== nnssl demo: {title} ===", flush=True)


def run_demo(out_dir: str = "nnssl_demo", fast: bool = False) -> dict:
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled
    from nnssl.datasets import known_datasets
    from nnssl.evaluation.compare import compare_runs
    from nnssl.evaluation.evaluate import evaluate_folder
    from nnssl.inference.predict import predict
    from nnssl.planning.api import plan_and_preprocess
    from nnssl.training.finetune import train
    from nnssl.training.pretrainer import pretrain

    s = FAST if fast else FULL
    root = os.path.join(os.path.abspath(out_dir), s.name)  # fast and full runs never share data
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NnsslError(f"Demo output '{out_dir}' exists and is not a folder; pass another -o.")
    tree = use_folder_tree(root)
    t0 = time.time()

    _step("synthetic BTCV-like data (original BTCV layout + unlabeled volumes)")
    src = write_synthetic_btcv(os.path.join(root, "synthetic"), cases=s.cases, test_cases=s.test_cases,
                               unlabeled=s.unlabeled, seed=s.seed, shape=s.shape)

    _step("convert to nnU-Net format")
    existing = known_datasets(("raw",))
    if "Dataset001_BTCV" not in existing:
        convert_btcv(src["raw_data"], dataset_id=1)
    if "Dataset002_CTUnlabeled" not in existing:
        convert_unlabeled(src["unlabeled"], dataset_id=2, name="CTUnlabeled")

    labels_ts = copy_test_labels(src["testing_labels"], os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV"))

    _step("fingerprint, plan and preprocess (unlabeled data with the target's plans)")
    plan_and_preprocess("BTCV", architectures=[s.architecture], pretraining=["CTUnlabeled"], preset=s.preset,
                        num_processes=1)

    _step(f"{s.method} pretraining on the unlabeled set ({s.pretrain_iterations} iterations)")
    pre_dir = os.path.join(root, "pretraining")
    ckpt = os.path.join(pre_dir, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        resume = os.path.isfile(os.path.join(pre_dir, "checkpoint_latest.pth"))
        pretrain("BTCV", s.method, s.architecture, "CTUnlabeled", iterations=s.pretrain_iterations,
                 iterations_per_epoch=max(1, s.pretrain_iterations // 5), batch_size=2, device="cpu",
                 resume=resume, seed=s.seed, output_folder=pre_dir)

    runs = {"scratch": None, s.method: ckpt}
    run_folders = []
    for label, pretrained in runs.items():
        _step(f"fine-tune '{label}': {s.finetune_epochs} epochs x {s.iterations_per_epoch} iterations")
        run_root = os.path.join(root, "runs", label)
        os.environ["nnUNet_results"] = os.path.join(run_root, "nnUNet_results")
        fold_dir = _fold_dir(run_root)
        if fold_dir is None or not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            resume = fold_dir is not None and os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth"))
            fold_dir = train("BTCV", "3d_fullres", "all", architecture=s.architecture,
                             pretrained=None if resume else pretrained, epochs=s.finetune_epochs,
                             iterations_per_epoch=s.iterations_per_epoch, val_iterations=1, device="cpu",
                             continue_training=resume)["output_folder"]
        pred_dir = os.path.join(run_root, "test_predictions")
        _step(f"predict the test cases with '{label}'")
        predict(os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV", "imagesTs"), pred_dir, "BTCV",
                folds=("all",), architecture=s.architecture, device="cpu", disable_tta=True, npp=1, nps=1)
        evaluate_folder(labels_ts, pred_dir, "BTCV", num_processes=1)
        write_json({"label": label, "architecture": s.architecture,
                    "method": s.method if pretrained else "none (scratch)",
                    "pretraining_data": "Dataset002_CTUnlabeled" if pretrained else "none",
                    "fold_dir": fold_dir}, os.path.join(pred_dir, "nnssl_run.json"))
        run_folders.append(pred_dir)

    _step("compare")
    report = compare_runs(run_folders, os.path.join(root, "report"))
    print("\n" + report["markdown"])
    print(f"\nnnssl demo finished in {time.time() - t0:.0f} s.\nReport: {root}/report.md, report.csv, "
          f"report.png\nPretext preview: nnssl_show_pretext -d BTCV -m {s.method} -o preview.png "
          f"(with nnUNet_raw/preprocessed/results set to the folders under {root})")
    os.environ["nnUNet_results"] = tree["nnUNet_results"]
    return {"root": root, "report": report, "runs": run_folders}


def copy_test_labels(testing_labels: str, dataset_folder: str) -> str:
    """BTCV has no test labels; the synthetic data does. Put them where nnU-Net users keep them
    (``labelsTs/``, named like the converted cases: label0007 -> BTCV_0007) for evaluation."""
    import shutil
    from nnssl.io import atomic_path
    out = os.path.join(dataset_folder, "labelsTs")
    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(testing_labels)):
        target = os.path.join(out, "BTCV_" + f[len("label"):])
        if f.startswith("label") and not os.path.isfile(target):
            with atomic_path(target) as tmp:
                shutil.copyfile(os.path.join(testing_labels, f), tmp)
    return out


def _fold_dir(run_root: str):
    """The fold folder of a run started earlier, or None."""
    import glob
    found = glob.glob(os.path.join(run_root, "nnUNet_results", "Dataset001_BTCV", "*", "fold_all"))
    return found[0] if found else None
