"""Pretraining-stage speed and memory at the demo size, against nnU-Net in the same run.

Demo size: the demo's full synthetic data (6 labeled + 3 test + 10 unlabeled phantoms), the
``tiny`` plainconvunet plans, Volume Fusion, batch 2, CPU. Everything below is measured in one
run of this script, in a temporary nnU-Net folder tree:

1. Volume Fusion ``make_batch`` (box draws, label maps, fusion of the crops) ÷ the engine's
   forward+backward on that batch (target < 0.05); forward+backward = the engine step of (3)
   minus its gradient clipping + optimizer step, timed on their own. ``make_batch`` runs with the
   torch thread count the engine's (forked) data workers inherit, i.e. ``--threads``; for
   information also with 1 thread, and the whole loader batch (blosc2 crops + fusion, what a
   worker does per iteration).
2. Data wait ÷ step time of a real ``pretrain(...)`` run with the engine's background workers
   (batchgenerators' ``MultiThreadedAugmenter``), read from the epoch records the engine keeps
   (``data_wait`` / ``epoch_time``); the first epoch (worker start-up) is the warm-up and is
   left out (target < 0.10).
3. The engine's train step (``Pretrainer._step``: lr, forward_loss, backward, grad clipping,
   optimizer step) ÷ nnU-Net's ``nnUNetTrainer.train_step`` on the same plans, patch and batch,
   on pre-made batches (nnU-Net's from its own dataloader), both with the same torch thread
   count; steps are interleaved so load changes on the shared machine hit both sides alike
   (target ≤ 1.10 against nnU-Net's stock train_step, i.e. with deep supervision; the row
   without deep supervision is the like-for-like comparison, since Volume Fusion trains the
   full-resolution output only). The networks differ only in the output layer (5 Volume
   Fusion classes against the 14 BTCV labels, plus nnU-Net's deep-supervision heads).
4. Peak memory of the pretraining run of (2), which runs in a fresh process: its max RSS and
   the max RSS of its data workers (``getrusage``: RUSAGE_SELF and RUSAGE_CHILDREN).

Run: ``python benchmarks/bench_pretrain.py [--threads 2] [--workers 2] [--steps 10] [--keep]``.
"""
import argparse
import contextlib
import io
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch

BATCH = 2
DEMO_DATA = {"cases": 6, "test_cases": 3, "unlabeled": 10, "seed": 0}  # nnssl.demo.FULL
ARGS = ("BTCV", "volume_fusion", "plainconvunet", "CTUnlabeled")  # dataset, method, architecture, -pd


def set_tree(root: str) -> dict:
    env = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = os.path.join(root, var)
        os.makedirs(env[var], exist_ok=True)
    os.environ.update(env)
    return env


def make_data(root: str) -> None:
    """The demo's pipeline up to planning: synthetic data -> nnU-Net format -> tiny plans + preprocessing."""
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled
    from nnssl.planning.api import plan_and_preprocess

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        src = write_synthetic_btcv(os.path.join(root, "synthetic"), **DEMO_DATA)
    convert_btcv(src["raw_data"], dataset_id=1, progress=False)
    convert_unlabeled(src["unlabeled"], dataset_id=2, name="CTUnlabeled", progress=False)
    os.environ["nnUNet_n_proc_DA"] = "1"  # nnU-Net's planner divides by it in its memory estimate
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plan_and_preprocess("BTCV", architectures=["plainconvunet"], pretraining=["CTUnlabeled"], preset="tiny",
                            num_processes=1, show_progress=False)


def median_ms(times) -> float:
    return 1e3 * float(np.median(times))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nnssl_side(root: str, n_batches: int):
    """The engine (Pretrainer) on the demo setup and pre-made loader batches; the loader itself."""
    from nnssl.training.pretrain_data import PretrainLoader
    from nnssl.training.pretrain_setup import prepare, prepare_method
    from nnssl.training.pretrainer import Pretrainer

    setup = prepare_method(prepare(*ARGS, batch_size=BATCH), seed=0)
    trainer = Pretrainer(setup, os.path.join(root, "engine_steps"), total_iterations=10 ** 6,
                         iterations_per_epoch=10 ** 6, device=torch.device("cpu"), seed=0, num_workers=0,
                         compile_network=False)
    trainer.model.train()
    loader = PretrainLoader(setup.data_folder, setup.batch_size, setup.crop_size, setup.method_cls, setup.cfg, 0)
    batches = [loader.make(i) for i in range(n_batches)]
    return setup, trainer, loader, batches


def nnunet_side(setup, n_batches: int):
    """nnUNetTrainer on the same plans (3d_fullres, fold 0, cpu), batch 2, batches from its own
    (single-process) dataloader; a second trainer with deep supervision switched off."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnssl import paths

    folder = os.path.join(paths.preprocessed(), setup.target)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    trainers = []
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its banner and plans
        for _ in range(2):
            plans = load_json(os.path.join(folder, setup.plans_manager.plans_name + ".json"))
            plans["continue_training"] = False  # what nnU-Net's run_training adds to the plans
            torch.manual_seed(0)
            t = nnUNetTrainer(plans, setup.configuration, 0, dataset_json, device=torch.device("cpu"))
            t.initialize()
            t.batch_size = BATCH
            t.network.train()
            trainers.append(t)
        ds, no_ds = trainers
        os.environ["nnUNet_n_proc_DA"] = "0"  # in-process loader: no background load while timing
        dl_train, dl_val = ds.get_dataloaders()
        batches = [next(dl_train) for _ in range(n_batches)]
    no_ds.set_deep_supervision_enabled(False)
    no_ds.loss = no_ds.loss.loss  # the DC_and_CE_loss inside nnU-Net's DeepSupervisionWrapper
    flat = [{"data": b["data"], "target": b["target"][0]} for b in batches]  # full-resolution target only
    return ds, no_ds, batches, flat


def _pretrain_child(env: dict, threads: int, workers: int, iterations: int, warmup: int, folder: str, queue):
    """A real pretraining in a fresh process (so its peak RSS is the pretraining's own)."""
    os.environ.update(env)
    torch.set_num_threads(threads)
    from nnssl.checkpoints import load_resume_checkpoint
    from nnssl.training.pretrainer import FINAL, pretrain

    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars; the log is read from training_log.txt
        pretrain(*ARGS, iterations=warmup + iterations, iterations_per_epoch=warmup, batch_size=BATCH,
                 device="cpu", seed=0, num_workers=workers, output_folder=folder)
    wall = time.perf_counter() - t0
    history = load_resume_checkpoint(os.path.join(folder, FINAL))["resume"]["loss_history"]
    queue.put({"history": [{k: h[k] for k in ("epoch", "iteration", "epoch_time", "data_wait")} for h in history],
               "wall": wall, "rss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "rss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss})


def run_pretraining(root: str, threads: int, workers: int, iterations: int, warmup: int) -> dict:
    ctx = mp.get_context("spawn")  # not a pool: pool workers are daemons and cannot start data workers
    queue = ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("nnUNet_")}
    proc = ctx.Process(target=_pretrain_child, args=(env, threads, workers, iterations, warmup,
                                                     os.path.join(root, "pretraining"), queue))
    proc.start()
    result = queue.get()  # before join: a child with queued data does not exit until it is read
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"the pretraining process failed (exit code {proc.exitcode})")
    return result


def measure_in_process(root: str, args) -> dict:
    """(1) batch creation and (3) interleaved train steps of both sides, in this process."""
    torch.set_num_threads(args.threads)
    setup, trainer, loader, batches = nnssl_side(root, 2)
    ds, no_ds, nn_batches, nn_flat = nnunet_side(setup, 2)
    torch.set_num_threads(args.threads)  # in case anything above changed it

    # The engine's data workers are forked from the training process and keep its torch thread
    # count (the fusion runs torch.lerp), so that count is what the target figure uses; 1 thread for comparison.
    rng = np.random.default_rng(0)
    images, _, _ = loader.images(0)
    make, whole = {}, {}
    for threads in (args.threads, 1):
        torch.set_num_threads(threads)
        make[threads] = median_ms([timed(lambda: setup.method_cls.make_batch(setup.cfg, images, rng))
                                   for _ in range(args.make_reps + 1)][1:])
        whole[threads] = median_ms([timed(lambda i=i: loader.make(1000 + i)) for i in range(args.make_reps + 1)][1:])
    torch.set_num_threads(args.threads)

    fns = {"nnssl engine step": lambda i: trainer._step(i, batches[i % len(batches)]),
           "nnU-Net train_step (DS)": lambda i: ds.train_step(nn_batches[i % len(nn_batches)]),
           "nnU-Net train_step (no DS)": lambda i: no_ds.train_step(nn_flat[i % len(nn_flat)])}
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(3 + args.steps):  # rotating order, first 3 rounds are warm-up
        for k in names[r % len(names):] + names[:r % len(names)]:
            dt = timed(lambda: fns[k](r))
            if r >= 3:
                times[k].append(dt)
    step = {k: median_ms(v) for k, v in times.items()}

    def clip_and_update():  # on the gradients the last engine step left behind
        if trainer.grad_clip:  # Volume Fusion clips nothing (its paper), so this is the optimizer step alone
            torch.nn.utils.clip_grad_norm_(trainer.params, trainer.grad_clip)
        trainer.optimizer.step()

    update_ms = median_ms([timed(clip_and_update) for _ in range(args.steps)])
    return {"setup": setup, "step": step, "update_ms": update_ms, "make_ms": make, "loader_ms": whole,
            "params": sum(p.numel() for p in trainer.network.parameters()),
            "params_nnunet": sum(p.numel() for p in ds.network.parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads for every timed step (both sides)")
    p.add_argument("--workers", type=int, default=2, help="background data workers of the pretraining run")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per side (median; after 3 warm-up)")
    p.add_argument("--make_reps", type=int, default=40, help="timed make_batch / loader batches (median)")
    p.add_argument("--iterations", type=int, default=30, help="measured iterations of the pretraining run")
    p.add_argument("--warmup", type=int, default=5, help="warm-up iterations (its first epoch) of that run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = p.parse_args(argv)
    if min(args.threads, args.steps, args.make_reps, args.iterations, args.warmup) < 1 or args.workers < 0:
        p.error("counts must be at least 1 (--workers at least 0)")

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="bench_pretrain_")
    set_tree(root)
    try:
        make_data(root)
        t_setup = time.perf_counter() - t_start
        m = measure_in_process(root, args)
        run = run_pretraining(root, args.threads, args.workers, args.iterations, args.warmup)
        with open(os.path.join(root, "pretraining", "training_log.txt"), encoding="utf-8") as f:
            epoch_lines = [line.rstrip() for line in f if ": epoch " in line]
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    setup, step = m["setup"], m["step"]
    fwd_bwd = step["nnssl engine step"] - m["update_ms"]
    first, measured = run["history"][0], run["history"][1:]
    n_measured = measured[-1]["iteration"] - first["iteration"]
    wait, elapsed = sum(h["data_wait"] for h in measured), sum(h["epoch_time"] for h in measured)
    make, whole = m["make_ms"], m["loader_ms"]
    ratio_make, ratio_loader = make[args.threads] / fwd_bwd, whole[args.threads] / fwd_bwd
    ratio_make_1 = make[1] / fwd_bwd
    wait_frac = wait / elapsed
    r_ds = step["nnssl engine step"] / step["nnU-Net train_step (DS)"]
    r_nods = step["nnssl engine step"] / step["nnU-Net train_step (no DS)"]

    print(f"\nSetup: demo data {DEMO_DATA}, tiny plainconvunet plans ({setup.plans_manager.plans_name}, "
          f"{setup.configuration}), patch {list(setup.crop_size)}, batch {BATCH}, cpu; data + planning {t_setup:.0f} s")
    print(f"Network: {m['params']} parameters (Volume Fusion, 5 outputs); nnU-Net's: {m['params_nnunet']} "
          f"(14 outputs + deep-supervision heads)")
    print(f"torch threads {args.threads} (both sides), cpu count {os.cpu_count()}, data workers {args.workers}; "
          f"load average at start {tuple(round(x, 2) for x in load_start)}, at end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"Step times, median of {args.steps} after 3 warm-up, interleaved (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in step.items())
          + f"; of the engine step: clip + optimizer step {m['update_ms']:.1f}, forward+backward {fwd_bwd:.1f}")
    print(f"Batch creation, median of {args.make_reps} (ms): make_batch {make[args.threads]:.2f} with "
          f"{args.threads} torch threads (what the data workers inherit), {make[1]:.2f} with 1; whole loader batch "
          f"(blosc2 crops + make_batch) {whole[args.threads]:.2f} / {whole[1]:.2f}")
    print(f"Pretraining run ({args.workers} workers): {args.warmup} warm-up + {n_measured} measured iterations, "
          f"{elapsed / n_measured * 1e3:.1f} ms per iteration, data wait {wait:.2f} s of {elapsed:.2f} s "
          f"(warm-up epoch: {first['data_wait']:.2f} s of {first['epoch_time']:.2f} s); whole pretrain() call "
          f"{run['wall']:.1f} s. Engine log:")
    print("\n".join("  " + line for line in epoch_lines))
    rows = [
        ("1. VF make_batch / nnssl fwd+bwd", f"{ratio_make:.4f}", "< 0.05", ratio_make < 0.05),
        ("   (info) same, make_batch with 1 thread", f"{ratio_make_1:.4f}", "-", None),
        ("   (info) loader batch / nnssl fwd+bwd", f"{ratio_loader:.4f}", "-", None),
        (f"2. data wait / step time ({args.workers} workers)", f"{wait_frac:.4f}", "< 0.10", wait_frac < 0.10),
        ("3. nnssl step / nnU-Net train_step (DS)", f"{r_ds:.3f}", "<= 1.10", r_ds <= 1.10),
        ("   nnssl step / nnU-Net step (no DS)", f"{r_nods:.3f}", "info: <= 1.10", r_nods <= 1.10),
        ("4. peak RSS, pretraining process", f"{run['rss_self_kib'] / 1024:.0f} MiB", "-", None),
        ("   peak RSS, largest data worker", f"{run['rss_children_kib'] / 1024:.0f} MiB", "-", None),
    ]
    print(f"\n{'measure':44s} | {'value':>9s} | {'target':22s} | pass?")
    for name, value, target, ok in rows:
        print(f"{name:44s} | {value:>9s} | {target:22s} | {'-' if ok is None else ('yes' if ok else 'NO')}")
    print(f"\nTotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
