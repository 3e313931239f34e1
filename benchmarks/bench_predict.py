"""nnssl_predict against nnUNetv2_predict: seconds per case, same model, same inputs (target ≤ 1.05).

Model: nnU-Net's own ``nnUNetTrainer`` on the ``tiny`` plainconvunet plans, trained 1 short epoch
(fold ``all``) on synthetic BTCV-like phantoms; both commands predict the same test folder with
the same settings (``-f all -device cpu``, ``-npp``/``-nps`` as given, ``--disable_tta`` unless
``--tta``: without mirroring a case costs 1/8 of the network time, so nnssl's extra work weighs
more in the ratio and the benchmark is the stricter for it).

(a) both commands as subprocesses, process start included: wall time ÷ number of cases;
(b) in process: ``nnssl.inference.predict`` (trainer lookup, input checks, staging and publishing
    of the outputs) against ``nnUNetPredictor.initialize_from_trained_model_folder`` +
    ``predict_from_files``, per case.

Every timing is the best of ``--repeats`` runs, alternating the order (the machine is shared; the
minimum is the least disturbed run; the ratio of medians is printed too). The two output folders
are also compared (identical masks).

Run: ``python benchmarks/bench_predict.py [--cases 4] [--shape 32 96 96] [--npp 1 --nps 1] [--tta]``.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

_PREDICT_ARGS = ["-d", "1", "-c", "3d_fullres", "-f", "all", "-tr", "nnUNetTrainer", "-p", "nnUNetPlans",
                 "-device", "cpu"]


def make_model(root, train_cases, test_cases, shape):
    """Synthetic data -> tiny plans -> nnUNetTrainer, 1 epoch of 10 iterations (no final validation)."""
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.planning.api import plan_and_preprocess
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer

    src = write_synthetic_btcv(os.path.join(root, "synthetic"), cases=train_cases, test_cases=test_cases,
                               unlabeled=0, shape=tuple(shape))
    raw = convert_btcv(src["raw_data"], dataset_id=1, progress=False)
    plan_and_preprocess("1", preset="tiny", num_processes=1, show_progress=False)
    trainer = build_trainer("1", "3d_fullres", "all", trainer="nnUNetTrainer", device="cpu").trainer
    apply_run_options(trainer, RunOptions(epochs=1, iterations_per_epoch=10, val_iterations=1))
    trainer.run_training()
    return os.path.join(raw, "imagesTs")


def timed(cmd, env):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def in_process(which, inputs, out, args):
    """Seconds for one in-process prediction of the whole folder with ``which`` in {"nnssl", "nnunet"}."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnssl.inference.predict import predict

    t0 = time.perf_counter()
    if which == "nnssl":
        predict(inputs, out, "1", "3d_fullres", ["all"], trainer="nnUNetTrainer", plans="nnUNetPlans", device="cpu",
                disable_tta=not args.tta, npp=args.npp, nps=args.nps)
    else:
        p = nnUNetPredictor(use_mirroring=args.tta, device=torch.device("cpu"))
        p.initialize_from_trained_model_folder(get_output_folder(1, "nnUNetTrainer", "nnUNetPlans", "3d_fullres"),
                                               ["all"])
        p.predict_from_files(inputs, out, num_processes_preprocessing=args.npp,
                             num_processes_segmentation_export=args.nps)
    return time.perf_counter() - t0


def same_masks(a, b):
    import numpy as np
    import SimpleITK as sitk

    segs = sorted(f for f in os.listdir(a) if f.endswith(".nii.gz"))
    return segs == sorted(f for f in os.listdir(b) if f.endswith(".nii.gz")) and all(
        np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(a, f))),
                       sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(b, f)))) for f in segs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=4, help="test cases to predict")
    p.add_argument("--train_cases", type=int, default=3, help="training cases of the tiny model")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96), help="phantom shape Z Y X")
    p.add_argument("--npp", type=int, default=1, help="-npp of both commands")
    p.add_argument("--nps", type=int, default=1, help="-nps of both commands")
    p.add_argument("--tta", action="store_true", help="predict with mirroring TTA (both commands)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the best is reported)")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="bench_predict_")
    env = {**os.environ, **{v: os.path.join(root, s) for v, s in
                            (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pp"), ("nnUNet_results", "results"))},
           "nnUNet_n_proc_DA": "1"}
    os.environ.update(env)
    extra = ["-npp", str(args.npp), "-nps", str(args.nps)] + ([] if args.tta else ["--disable_tta"])
    try:
        inputs = make_model(root, args.train_cases, args.cases, args.shape)
        outs = {k: os.path.join(root, f"pred_{k}") for k in ("nnssl", "nnunet")}
        cmds = {"nnssl": [shutil.which("nnssl_predict"), "-i", inputs, "-o", outs["nnssl"], *_PREDICT_ARGS, *extra],
                "nnunet": [shutil.which("nnUNetv2_predict"), "-i", inputs, "-o", outs["nnunet"], *_PREDICT_ARGS,
                           *extra]}
        sub = {k: [] for k in cmds}
        inproc = {k: [] for k in cmds}
        for r in range(args.repeats):
            for k in (("nnssl", "nnunet") if r % 2 == 0 else ("nnunet", "nnssl")):
                shutil.rmtree(outs[k], ignore_errors=True)
                sub[k].append(timed(cmds[k], env))
        identical = same_masks(outs["nnssl"], outs["nnunet"])
        for r in range(args.repeats):
            for k in (("nnssl", "nnunet") if r % 2 == 0 else ("nnunet", "nnssl")):
                shutil.rmtree(outs[k], ignore_errors=True)
                inproc[k].append(in_process(k, inputs, outs[k], args))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.cases
    print(f"\n{n} cases of shape {tuple(args.shape)}, tiny nnUNetTrainer model, -npp {args.npp} -nps {args.nps}"
          f"{', mirroring TTA' if args.tta else ', no TTA'}; best of {args.repeats}; identical masks: "
          f"{identical}")
    print(f"{'measure':38s} {'nnssl':>9s} {'nnU-Net':>9s} {'ratio':>7s} {'median ratio':>13s}  target")
    for name, d in (("(a) subprocess, s/case (with start)", sub), ("(b) in process, s/case", inproc)):
        ours, theirs = min(d["nnssl"]) / n, min(d["nnunet"]) / n
        med = statistics.median(d["nnssl"]) / statistics.median(d["nnunet"])
        print(f"{name:38s} {ours:9.3f} {theirs:9.3f} {ours / theirs:7.3f} {med:13.3f}  "
              f"{'<= 1.05' if name.startswith('(a)') else ''}")
    print("all runs [s]:", {k: [round(t, 2) for t in v] for k, v in sub.items()}, "in process:",
          {k: [round(t, 2) for t in v] for k, v in inproc.items()})


if __name__ == "__main__":
    main()
