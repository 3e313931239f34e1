"""Every GPU question of nnssl in one short run: prints one Markdown table (issue 23, §1).

``python benchmarks/gpu_check.py`` (one CUDA GPU, about 8 min) does, in a temporary nnU-Net tree:

1. data: synthetic BTCV phantoms (BTCV-like spacing, ``SIZES[mode].shape`` voxels), converted and
   planned for every architecture at its paper size (no preset; the planner's own patch and batch
   for an 8 GB budget), preprocessed once (all plans share the data), in-task pretraining data;
2. an end-to-end chain, small: Volume Fusion pretraining (2 iterations) -> weight injection ->
   fine-tuning (1 epoch of 2 iterations) -> ``nnssl_predict`` of the test case, and stock
   ``nnUNetv2_predict`` on the same model folder: the masks must be equal;
3. per architecture and every method it supports: the pretraining engine's train step
   (``Pretrainer._step``: fp16 autocast + GradScaler on CUDA, losses in float32) on pre-made
   batches, iterations/s as the median over ``--steps`` after ``--warmup`` steps, and the peak
   GPU memory (``torch.cuda.max_memory_allocated`` over the timed steps) next to the planner's
   estimate for the planned patch and batch (pretraining rows: scaled to the method's crop and
   batch; nnU-Net's feature-map proxy in GB:
   ``estimate / UNet_reference_val_3d * UNet_reference_val_corresp_GB * batch / UNet_reference_val_corresp_bs_3d``);
4. per architecture its fine-tuning trainer's ``train_step`` (nnU-Net's AMP), with ``torch.compile``
   off and on (nnU-Net's ``nnUNet_compile`` switch, read in ``initialize``; ``--compile_architectures``),
   and nnU-Net's own ``nnUNetTrainer`` on its default plans (``nnUNetPlans``) as the anchor: the
   ratio column is the step time ÷ nnU-Net's step time, measured in the same run.

``--smoke`` runs the same code on the CPU at tiny sizes (``--preset tiny`` plans, tiny phantoms,
plainconvunet only by default); ``tests/test_gpu_check.py`` runs it (7-14 min on 2 cores at load
average 10-16; not yet timed on an idle machine). On the CPU nnU-Net ignores ``nnUNet_compile`` and
there is no GPU memory: those cells say so.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Sizes:
    shape: tuple  # phantom voxels (Z, Y, X)
    cases: int
    preset: Optional[str]
    steps: int
    warmup: int


SIZES = {"gpu": Sizes((64, 256, 256), 4, None, 10, 3), "smoke": Sizes((16, 32, 32), 2, "tiny", 1, 1)}
COMPILED = ("plainconvunet", "swinunetr", "unetr_pp")  # Assumption: compile costs ~1 min each; these three


def set_tree(root: str) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(os.path.join(root, var), exist_ok=True)
        os.environ[var] = os.path.join(root, var)  # before nnunetv2 is imported: it reads them once


def make_data(root: str, sizes: Sizes, architectures: Sequence[str]) -> str:
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.planning.api import plan_and_preprocess

    with quiet():
        src = write_synthetic_btcv(os.path.join(root, "synthetic"), cases=sizes.cases, test_cases=1, unlabeled=1,
                                   shape=sizes.shape)
        convert_btcv(src["raw_data"], dataset_id=1, progress=False)
        plan_and_preprocess("BTCV", architectures=sorted(set(architectures) | {"plainconvunet"}),
                            pretraining=["intask"], preset=sizes.preset, num_processes=2, show_progress=False)
    return os.path.join(os.environ["nnUNet_raw"], "Dataset001_BTCV", "imagesTs")


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def timed(step: Callable[[int], None], device, warmup: int, steps: int):
    """(median seconds per step, peak GPU GB over the timed steps or None on the CPU)."""
    import torch

    cuda = device.type == "cuda"
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return float(np.median(times)), peak


def planner_estimate_gb(arch: str, plans: dict, n_labels: int) -> float:
    """The planner's memory estimate for the planned patch and batch, in GB (see the module docstring)."""
    from nnssl.architectures.spec import ARCHITECTURES

    spec = ARCHITECTURES.get(arch)
    cfg = plans["configurations"]["3d_fullres"]
    block = cfg["architecture"]
    with quiet():
        planner = spec.planner_class().without_dataset(1, n_labels, preset=plans.get("nnssl_preset"))
        est = planner.static_estimate_VRAM_usage(tuple(cfg["patch_size"]), 1, n_labels, block["network_class_name"],
                                                 block["arch_kwargs"], tuple(block["_kw_requires_import"]))
    return (est / planner.UNet_reference_val_3d * planner.UNet_reference_val_corresp_GB * cfg["batch_size"]
            / planner.UNet_reference_val_corresp_bs_3d)


def load_plans(arch: str) -> dict:
    from nnssl.architectures.spec import ARCHITECTURES

    path = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset001_BTCV",
                        ARCHITECTURES.get(arch).plans_name + ".json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def overrides(method: str, patch: Sequence[int], smoke: bool) -> List[str]:
    """hybrid_mim tiles its crop with 32-voxel sub-volumes (or one smaller, even one): the largest such
    crop inside the planned patch. Smoke: masked_kmeans with 4 small clusterers (the k-means fit of the
    paper's 80 is the slowest part of a CPU smoke run; it is not on the GPU)."""
    if method == "masked_kmeans" and smoke:
        return ["n_clusterers=4", "k_min=2", "k_max=4"]
    if method != "hybrid_mim":
        return []
    crop = [p - p % 2 if p < 32 else p - p % 32 for p in patch]
    return ["crop_size=" + ",".join(map(str, crop))]


def pretrain_row(arch: str, method: str, device, sizes: Sizes, root: str, patch: Sequence[int]) -> dict:
    import torch
    from nnssl.training.pretrain_data import PretrainLoader, map_tensors
    from nnssl.training.pretrain_setup import prepare, prepare_method
    from nnssl.training.pretrainer import Pretrainer

    with quiet():
        setup = prepare_method(prepare("BTCV", method, arch, overrides=overrides(method, patch, device.type == "cpu")),
                               seed=0)
        engine = Pretrainer(setup, os.path.join(root, f"pre_{arch}_{method}"), 10 ** 6, 10 ** 6, device, 0, 0, False)
    engine.model.train()
    loader = PretrainLoader(setup.data_folder, setup.batch_size, setup.crop_size, setup.method_cls, setup.cfg, 0)
    batches = [map_tensors(loader.make(i), lambda x: x.to(device)) for i in range(2)]
    sec, peak = timed(lambda i: engine._step(i, batches[i % 2]), device, sizes.warmup, sizes.steps)
    del engine, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"patch": setup.crop_size, "batch": setup.batch_size, "sec": sec, "peak": peak, "precision":
            "fp16 AMP" if device.type == "cuda" else "CPU --cpu_precision auto"}


def finetune_row(arch: Optional[str], device, sizes: Sizes, compile_on: bool, trainer: Optional[str] = None,
                 plans: Optional[str] = None) -> dict:
    import torch
    from nnssl.training.finetune import build_trainer

    os.environ["nnUNet_compile"] = "t" if compile_on else "f"
    with quiet():
        tr = build_trainer("BTCV", "3d_fullres", "all", architecture=arch, trainer=trainer, plans=plans,
                           device=device.type).trainer
        tr.initialize()
        tr.on_train_start()
    try:
        compiled = "OptimizedModule" in type(tr.network).__name__
        batches = [next(tr.dataloader_train) for _ in range(2)]
        sec, peak = timed(lambda i: tr.train_step(batches[i % 2]), device, sizes.warmup, sizes.steps)
    finally:
        with quiet():
            tr.on_train_end()
    del tr
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"sec": sec, "peak": peak, "compiled": compiled}


def chain(device, test_images: str, root: str) -> str:
    """pretrain -> inject -> fine-tune -> nnssl_predict vs stock nnUNetv2_predict; a line for the report."""
    import SimpleITK as sitk
    from nnssl.inference.predict import predict
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer
    from nnssl.training.injection import LOADED, inject_pretrained
    from nnssl.training.pretrainer import pretrain
    from nnssl.training.trainer_lookup import nnssl_trainer_folder

    os.environ["nnUNet_compile"] = "f"
    with quiet():
        pre = pretrain("BTCV", "volume_fusion", iterations=2, iterations_per_epoch=2, batch_size=2,
                       device=device.type, num_workers=0, output_folder=os.path.join(root, "chain_pretraining"))
        tr = build_trainer("BTCV", "3d_fullres", "all", device=device.type).trainer
        apply_run_options(tr, RunOptions(epochs=1, iterations_per_epoch=2, val_iterations=1))
        tr.initialize()
        report = inject_pretrained(tr, os.path.join(pre, "checkpoint_final.pth"))
        tr.run_training()
        ours = os.path.join(root, "pred_nnssl")
        predict(test_images, ours, "BTCV", "3d_fullres", ["all"], device=device.type, disable_tta=True, npp=0, nps=0)
    stock = os.path.join(root, "pred_stock")
    exe = shutil.which("nnUNetv2_predict")
    if exe is None:
        return "chain: FAILED (nnUNetv2_predict is not on PATH)"
    r = subprocess.run([exe, "-i", test_images, "-o", stock, "-d", "1", "-c", "3d_fullres", "-f", "all", "-tr",
                        "nnsslTrainer", "-p", "nnUNetPlans", "-device", device.type, "--disable_tta", "-npp", "0",
                        "-nps", "0"], env={**os.environ, "nnUNet_extTrainer": nnssl_trainer_folder()},
                       capture_output=True, text=True, encoding="utf-8", errors="replace")
    if r.returncode != 0:
        return f"chain: FAILED (stock nnUNetv2_predict exit {r.returncode}: {(r.stderr or r.stdout)[-400:]!r})"
    diffs = []
    for f in sorted(os.listdir(ours)):
        if f.endswith(".nii.gz"):
            a, b = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, f))) for d in (ours, stock))
            diffs.append(int((a != b).sum()) if a.shape == b.shape else -1)
    same = bool(diffs) and all(d == 0 for d in diffs)
    return (f"chain on {device.type}: pretrain (volume_fusion, 2 it) -> inject ({len(report.keys(LOADED))} "
            f"tensors) -> fine-tune (1 epoch x 2 it) -> nnssl_predict vs stock nnUNetv2_predict: "
            f"{'EQUAL' if same else 'DIFFERENT'} masks ({len(diffs)} case(s), differing voxels {diffs})")


def guarded(fn: Callable, what: str):
    """fn(), or its error as a short text: one failure must not cost the rest of a GPU window."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (reported in the table, and the run goes on)
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300].replace("|", "/")
        return f"{what}: FAILED ({msg})" if what else f"FAILED ({msg})"


def fmt(v, spec=".3g", none="n/a"):
    return none if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="nnssl GPU check: one Markdown table (see the module docstring)")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (for the tests)")
    p.add_argument("--architectures", nargs="+", default=None, help="default: all (smoke: plainconvunet)")
    p.add_argument("--compile_architectures", nargs="*", default=None,
                   help=f"fine-tuning also with torch.compile for these (default: {' '.join(COMPILED)}; smoke: "
                        f"none, nnU-Net never compiles on the CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no_chain", action="store_true")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="nnssl_gpu_check_")
    set_tree(root)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch

    import nnssl.architectures  # noqa: F401
    import nnssl.ssl  # noqa: F401
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.ssl.base import METHODS, compatible_architectures

    sizes = SIZES["smoke" if a.smoke else "gpu"]
    sizes = Sizes(sizes.shape, sizes.cases, sizes.preset, a.steps or sizes.steps, a.warmup or sizes.warmup)
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; run with --smoke for the CPU version.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.smoke else "cuda")
    archs = a.architectures or (["plainconvunet"] if a.smoke else ARCHITECTURES.names())
    compiled = set(a.compile_architectures if a.compile_architectures is not None else () if a.smoke else COMPILED)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke)"
    t_start = time.perf_counter()
    lines: List[str] = []
    try:
        test_images = make_data(root, sizes, archs)
        lines.append(f"data + plans: {time.perf_counter() - t_start:.0f} s")
        if not a.no_chain:
            lines.append(guarded(lambda: chain(device, test_images, root), "chain"))
        anchor = finetune_row(None, device, sizes, False, trainer="nnUNetTrainer", plans="nnUNetPlans")
        rows = ["| architecture | step | patch | batch | it/s | ÷ nnU-Net step | peak GB | planner GB | "
                "peak ÷ planner |",
                "|---|---|---|---|---|---|---|---|---|"]

        def row(arch, what, patch, batch, r, est):
            if isinstance(r, str):  # the error of a failed measurement
                rows.append(f"| {arch} | {what} | {'x'.join(map(str, patch))} | {batch} | {r} | | | {est:.3g} | |")
                return
            ratio = None if r["peak"] is None else r["peak"] / est
            rows.append(f"| {arch} | {what} | {'x'.join(map(str, patch))} | {batch} | {1 / r['sec']:.2f} | "
                        f"{r['sec'] / anchor['sec']:.2f} | {fmt(r['peak'])} | {est:.3g} | {fmt(ratio, '.2f')} |")

        base = load_plans("plainconvunet")
        with open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset001_BTCV", "dataset.json"),
                  encoding="utf-8") as f:
            n_labels = len(json.load(f)["labels"])
        row("nnU-Net", "nnUNetTrainer fine-tune (anchor)", base["configurations"]["3d_fullres"]["patch_size"],
            base["configurations"]["3d_fullres"]["batch_size"], anchor, planner_estimate_gb("plainconvunet", base,
                                                                                            n_labels))
        for arch in archs:
            plans = load_plans(arch)
            cfg = plans["configurations"]["3d_fullres"]
            est = planner_estimate_gb(arch, plans, n_labels)
            for method in METHODS.names():
                if arch in compatible_architectures(method):
                    r = guarded(lambda: pretrain_row(arch, method, device, sizes, root, cfg["patch_size"]), "")
                    if isinstance(r, str):
                        row(arch, f"pretrain {method}", cfg["patch_size"], "", r, est)
                        continue
                    # the estimate scaled to the method's crop and batch (feature maps grow with both)
                    scale = np.prod(r["patch"]) * r["batch"] / (np.prod(cfg["patch_size"]) * cfg["batch_size"])
                    row(arch, f"pretrain {method} ({r['precision']})", r["patch"], r["batch"], r, est * scale)
            for on in ((False, True) if arch in compiled else (False,)):
                r = guarded(lambda: finetune_row(arch, device, sizes, on), "")
                label = "compile on" if on else "compile off"
                if on and isinstance(r, dict) and not r["compiled"]:
                    label += " (nnU-Net did not compile: CPU)"
                row(arch, f"fine-tune ({label})", cfg["patch_size"], cfg["batch_size"], r, est)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = "\n".join([f"# nnssl gpu_check on {gpu} (torch {torch.__version__}), "
                       f"{time.perf_counter() - t_start:.0f} s", ""] + [f"- {ln}" for ln in lines] + [""] + rows)
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
