"""The main job on the embedded default: synthetic data through the whole nnssl pipeline.

Each step is skipped when its output already exists, so an interrupted demo resumes where it
stopped. The demo uses its own nnU-Net folder tree under the output directory (it never
touches the user's nnUNet_raw/preprocessed/results) and tiny network presets so that it
runs on 2 CPU cores.
"""
import os
import time
from dataclasses import dataclass
from typing import List

from nnssl.errors import NnsslError


@dataclass
class DemoSettings:
    cases: int = 6
    test_cases: int = 2
    unlabeled: int = 8
    seed: int = 0
    architectures: tuple = ("plainconvunet",)
    preset: str = "tiny"


FAST = DemoSettings(cases=3, test_cases=1, unlabeled=3)


def _use_demo_folders(out_dir: str) -> dict:
    folders = {var: os.path.join(out_dir, sub) for var, sub in
               (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                ("nnUNet_results", "nnUNet_results"))}
    for var, path in folders.items():
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path
    return folders


def _step(title: str, log: List[str]):
    print(f"\n=== nnssl demo: {title} ===", flush=True)
    log.append(title)


def run_demo(out_dir: str = "nnssl_demo", fast: bool = False) -> dict:
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled
    from nnssl.datasets import known_datasets
    from nnssl.planning.api import plan_and_preprocess

    s = FAST if fast else DemoSettings()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NnsslError(f"Demo output '{out_dir}' exists and is not a folder; pass another -o.")
    folders = _use_demo_folders(out_dir)
    t0 = time.time()
    log: List[str] = []

    _step("synthetic BTCV-like data", log)
    src = write_synthetic_btcv(os.path.join(out_dir, "synthetic"), cases=s.cases, test_cases=s.test_cases,
                               unlabeled=s.unlabeled, seed=s.seed)

    _step("convert to nnU-Net format", log)
    existing = known_datasets(("raw",))
    if "Dataset001_BTCV" not in existing:
        convert_btcv(src["raw_data"], dataset_id=1)
    if "Dataset002_CTUnlabeled" not in existing:
        convert_unlabeled(src["unlabeled"], dataset_id=2, name="CTUnlabeled")

    _step("fingerprint, plan and preprocess (labeled + unlabeled with the target's plans)", log)
    plan_and_preprocess("BTCV", architectures=list(s.architectures), pretraining_datasets=["CTUnlabeled"],
                        preset=s.preset, num_processes=1)

    print(f"\nnnssl demo finished in {time.time() - t0:.0f} s. Folders: {folders}")
    return {"folders": folders, "steps": log}
