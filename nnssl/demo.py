"""The main job on the embedded default: synthetic data through the whole nnssl pipeline.

synthetic BTCV-like data -> convert (labeled + unlabeled) -> plan/preprocess (the unlabeled
set with the target's plans) -> Volume Fusion pretraining (and its pretext preview,
``pretext.png``) -> fine-tuning from the checkpoint and from scratch with the same budget and
the short-budget recipe (``nnsslTrainer_Short``) -> prediction of the test cases ->
evaluation -> comparison report (tables and ``report.png`` with the learning curves of both
runs; ``segmentation.png`` with a test slice and both predictions) -> a plain verdict (does
the pretrained start beat scratch?) and where every picture is.

Paired and reproducible: before each fine-tuning run every global generator (Python's
``random``, numpy's, torch's) is seeded with ``--seed`` and nnU-Net's loader runs in this process
(``nnUNet_n_proc_DA=0``; its worker processes are not seeded), so the scratch and the pretrained
run draw the same batches and augmentations, and two fresh runs with the same ``--seed`` print the
same Dice. ``--seed`` also seeds the synthetic data and the pretraining (its own folder
``<name>_seed<S>`` for seeds other than 0). One seed is one paired sample: the verdict says
so, and names the command that measures the difference over seeds.

Each step is skipped when its output already exists, so an interrupted demo resumes where it
stopped. The demo uses its own nnU-Net folder tree under the output directory (it never
touches the user's nnUNet_raw/preprocessed/results) and the ``tiny`` network preset, so it
runs on 2 CPU cores. The two fine-tuning runs get separate results trees because nnU-Net
names a result folder by trainer, plans and configuration only.

Speed on 2 cores (benchmarks/bench_iteration_profile.py): nnU-Net's augmentation runs in the
main process (``nnUNet_n_proc_DA=0``, needed for the pairing above anyway; loader worker
processes compete with torch's threads for the two cores and made an iteration ~40 % slower), the final
validation on the training cases is skipped (fold ``all`` validates on its own training data,
and the test cases are evaluated anyway), and prediction runs sequentially in this process.
Fine-tuning uses CPU bf16 autocast where the CPU has it natively (``--cpu_precision auto`` of
the nnssl trainers; 0.455 -> 0.334 s per iteration on 2 idle AMX cores).

Length: 45 epochs x 20 iterations per run. With 30 x 20 (600 iterations) the scratch run had
found liver, stomach, spleen, kidneys and IVC but not yet the aorta (test Dice 0.00; mean 0.388);
with 900 iterations it found the aorta too (full demo, one seed: aorta 0.88, liver 0.96,
stomach 0.90, IVC 0.89, mean 0.649; Volume Fusion start 0.663; 11 min 12 s on 2 idle cores
including pretraining and data preparation). Organs appear roughly
in order of size, the thin vessels last, so the run must outlast the aorta's onset while the lr
is still high.
"""
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

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
    trainer: str = "nnsslTrainer_Short"


FULL = DemoSettings("full", cases=6, test_cases=3, unlabeled=10, pretrain_iterations=200,
                    finetune_epochs=45, iterations_per_epoch=20, shape=(32, 64, 64))
FAST = DemoSettings("fast", cases=3, test_cases=1, unlabeled=3, pretrain_iterations=10,
                    finetune_epochs=2, iterations_per_epoch=5, shape=(24, 48, 48))

PICTURES = (
    ("report.png", "test Dice of both runs (mean ± std, per organ) and their learning curves (validation pseudo "
                   "Dice and loss vs iteration): which start learns faster and ends better"),
    ("segmentation.png", "one test case, the axial slice with the most organs: CT, reference labels and each run's "
                         "prediction, titled with its Dice on that case"),
    ("pretext.png", "what the pretraining method shows the network: its corrupted input and what it must predict"),
    ("runs/scratch/fold/progress.png", "nnU-Net's own training plot of the scratch run (loss, pseudo Dice, lr)"),
    ("runs/PRETRAINED/fold/progress.png", "nnU-Net's own training plot of the pretrained run"),
    ("pretraining/progress.png", "pretraining loss, learning rate and data-wait fraction vs iteration"),
)


def use_folder_tree(root: str) -> Dict[str, str]:
    folders = {var: os.path.join(root, var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, path in folders.items():
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path
    return folders


def _step(title: str) -> None:
    print(f"\n=== nnssl demo: {title} ===", flush=True)


def prepare_data(s: DemoSettings, root: str) -> Tuple[Dict[str, str], str]:
    """Synthetic data, conversion, planning and preprocessing under ``root``; returns (tree, labelsTs folder)."""
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled
    from nnssl.datasets import known_datasets
    from nnssl.planning.api import plan_and_preprocess

    tree = use_folder_tree(root)
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
    return tree, labels_ts


def finetune(s: DemoSettings, run_root: str, pretrained, dataset: str = "BTCV") -> str:
    """Fine-tune fold 'all' of ``dataset`` (resuming an interrupted run) in ``run_root``'s own results tree,
    every generator seeded with ``s.seed`` first and the loader in this process (module docstring);
    returns the fold folder."""
    from nnssl.training.finetune import seed_everything, train

    os.environ["nnUNet_results"] = os.path.join(run_root, "nnUNet_results")
    fold_dir = _fold_dir(run_root)
    if fold_dir is not None and os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        return fold_dir
    resume = fold_dir is not None and os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth"))
    os.environ["nnUNet_n_proc_DA"] = "0"  # nnU-Net's loader workers are not seeded
    seed_everything(s.seed)
    return train(dataset, "3d_fullres", "all", architecture=s.architecture, trainer=s.trainer,
                 pretrained=None if resume else pretrained, epochs=s.finetune_epochs,
                 iterations_per_epoch=s.iterations_per_epoch, val_iterations=1, device="cpu",
                 continue_training=resume, final_validation=False)["output_folder"]


def finetune_and_test(s: DemoSettings, tree: Dict[str, str], labels_ts: str, run_root: str, pretrained) -> str:
    """Fine-tune (:func:`finetune`), predict and evaluate the test cases; returns the prediction folder."""
    from nnssl.evaluation.evaluate import evaluate_folder
    from nnssl.inference.predict import predict

    fold_dir = finetune(s, run_root, pretrained)
    pred_dir = os.path.join(run_root, "test_predictions")
    if not os.path.isfile(os.path.join(pred_dir, "summary.json")):
        predict(os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV", "imagesTs"), pred_dir, "BTCV", folds=("all",),
                architecture=s.architecture, trainer=s.trainer, device="cpu", disable_tta=True, npp=0, nps=0)
        evaluate_folder(labels_ts, pred_dir, "BTCV", num_processes=1)
    write_json({"label": os.path.basename(run_root), "architecture": s.architecture, "trainer": s.trainer,
                "method": s.method if pretrained else "none (scratch)",
                "pretraining_data": "Dataset002_CTUnlabeled" if pretrained else "none",
                "fold_dir": fold_dir}, os.path.join(pred_dir, "nnssl_run.json"))
    return pred_dir


def run_demo(out_dir: str = "nnssl_demo", fast: bool = False, seed: int = 0) -> dict:
    from nnssl.evaluation.compare import compare_runs
    from nnssl.training.pretext_preview import show_pretext
    from nnssl.training.pretrainer import pretrain

    s = dataclasses.replace(FAST if fast else FULL, seed=int(seed))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NnsslError(f"Demo output '{out_dir}' exists and is not a folder; pass another -o.")
    # fast and full runs, and different seeds, never share data
    root = os.path.join(os.path.abspath(out_dir), s.name + (f"_seed{s.seed}" if s.seed else ""))
    os.environ["nnUNet_n_proc_DA"] = "0"  # see the module docstring
    t0 = time.time()
    tree, labels_ts = prepare_data(s, root)

    _step(f"{s.method} pretraining on the unlabeled set ({s.pretrain_iterations} iterations)")
    pre_dir = os.path.join(root, "pretraining")
    ckpt = os.path.join(pre_dir, "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        resume = os.path.isfile(os.path.join(pre_dir, "checkpoint_latest.pth"))
        pretrain("BTCV", s.method, s.architecture, "CTUnlabeled", iterations=s.pretrain_iterations,
                 iterations_per_epoch=max(1, s.pretrain_iterations // 5), batch_size=2, device="cpu",
                 resume=resume, seed=s.seed, output_folder=pre_dir)
    pretext = os.path.join(root, "pretext.png")
    if not os.path.isfile(pretext):
        show_pretext("BTCV", s.method, pretext, architecture=s.architecture, pretraining_data="CTUnlabeled",
                     seed=s.seed)

    run_folders = []
    for label, pretrained in (("scratch", None), (s.method, ckpt)):
        _step(f"fine-tune '{label}' ({s.trainer}): {s.finetune_epochs} epochs x {s.iterations_per_epoch} "
              f"iterations, then predict the test cases")
        run_folders.append(finetune_and_test(s, tree, labels_ts, os.path.join(root, "runs", label), pretrained))
    os.environ["nnUNet_results"] = tree["nnUNet_results"]

    _step("compare")
    report = compare_runs(run_folders, os.path.join(root, "report"))
    segmentation_picture(root, tree, labels_ts, run_folders, ["scratch", f"{s.method} pretrained"])
    print("\n" + report["markdown"])
    print("\n" + verdict(run_folders, s.method, s.seed))
    print(f"\nnnssl demo finished in {time.time() - t0:.0f} s.")
    print(pictures_message(root, run_folders))
    return {"root": root, "report": report, "runs": run_folders, "pictures": existing_pictures(root, run_folders)}


def segmentation_picture(root: str, tree: Dict[str, str], labels_ts: str, run_folders: List[str],
                         run_labels: List[str]) -> str:
    """``segmentation.png`` of the first test case (see ``nnssl.evaluation.overlay``); returns its path."""
    import json
    from nnssl.evaluation.overlay import write_segmentation_figure

    dataset = os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV")
    case = sorted(f for f in os.listdir(labels_ts) if f.endswith(".nii.gz"))[0]
    with open(os.path.join(dataset, "dataset.json"), encoding="utf-8") as f:
        names = {int(v): k for k, v in json.load(f)["labels"].items() if int(v) > 0}
    path = os.path.join(root, "segmentation.png")
    write_segmentation_figure(os.path.join(dataset, "imagesTs", case[:-len(".nii.gz")] + "_0000.nii.gz"),
                              os.path.join(labels_ts, case),
                              [(label, os.path.join(p, case)) for label, p in zip(run_labels, run_folders)],
                              names, path, title=f"test case {case[:-len('.nii.gz')]}")
    return path


def _foreground_dice(pred_dir: str) -> float:
    import json
    with open(os.path.join(pred_dir, "summary.json"), encoding="utf-8") as f:
        return float(json.load(f)["foreground_mean"]["Dice"])


def verdict(run_folders: List[str], method: str, seed: int = 0) -> str:
    """Plain sentences: is the pretrained start better, worse or the same as scratch on the test cases
    (the same at the printed precision: "no difference"), and why one seed cannot settle it."""
    scratch, pre = (_foreground_dice(p) for p in run_folders)
    diff = pre - scratch
    if round(diff, 3) == 0:
        head = (f"No difference: the {method}-pretrained start and scratch reach the same test mean Dice here "
                f"({pre:.3f} vs {scratch:.3f}).")
        size = "Nor can one seed tell a difference smaller than the seed-to-seed noise from none"
    else:
        word = "WORSE" if diff < 0 else "better"
        head = (f"The {method}-pretrained start is {word} than scratch here: test mean Dice {pre:.3f} vs "
                f"{scratch:.3f} ({diff:+.3f}).")
        size = f"One seed cannot tell a difference of this size ({abs(diff):.3f} Dice) from seed-to-seed noise"
    return (f"{head} {size} (this is seed {seed}, one paired sample at a tiny budget). To measure it, pair scratch "
            f"and pretrained over seeds: nnssl_benchmark_ssl -m {method} --seeds 0 1 2 3 4")


def existing_pictures(root: str, run_folders: List[str]) -> List[Tuple[str, str]]:
    """(absolute path, what it shows) for every picture the demo wrote that exists."""
    import json
    out = []
    for rel, what in PICTURES:
        if rel.startswith("runs/"):
            which = 0 if "/scratch/" in rel else 1
            with open(os.path.join(run_folders[which], "nnssl_run.json"), encoding="utf-8") as f:
                path = os.path.join(json.load(f)["fold_dir"], "progress.png")
        else:
            path = os.path.join(root, rel)
        if os.path.isfile(path):
            out.append((path, what))
    return out


def pictures_message(root: str, run_folders: List[str]) -> str:
    lines = ["Pictures:"] + [f"  {path}\n      {what}." for path, what in existing_pictures(root, run_folders)]
    lines.append(f"Tables: {os.path.join(root, 'report.md')} and report.csv")
    return "\n".join(lines)


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
    found = glob.glob(os.path.join(run_root, "nnUNet_results", "*", "*", "fold_all"))
    return found[0] if found else None
