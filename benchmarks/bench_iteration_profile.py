"""Where a fine-tuning and a pretraining iteration spend their time (issue 9, item 5).

Fine-tuning: an nnU-Net trainer (``-tr``, default ``nnsslTrainer_Short``) on an already
preprocessed dataset (e.g. the demo's), built by ``nnssl.training.finetune.build_trainer``;
its own data loaders, network, loss and optimizer are timed call by call:

- ``data``: ``next(dataloader_train)`` (loading + nnU-Net's augmentation; with loader workers
  this is the wait for a batch the workers did not finish yet);
- ``forward`` (network + deep-supervision loss), ``backward``, ``optimizer`` (clip + step);
- per epoch: ``validation`` (``--val_iterations`` batches through ``validation_step``) and
  ``epoch_end`` (nnU-Net's ``on_epoch_end``: log, best checkpoint, ``progress.png``).

Pretraining needs no script: the engine's ``training_log.txt`` gives per epoch the epoch time
and the data-wait time and fraction (e.g. Volume Fusion at the demo size, 1 torch thread, load
~5: 1.2 s per iteration, data wait 0.8 %).

Each (loader workers, torch threads) setting is timed separately, because on 2 cores the
loader processes and torch's intra-op threads compete for the same cores.

Measured (demo data 32x64x64, tiny plainconvunet, batch 2, nnsslTrainer_Short; the 2 cores
shared with other jobs, load average 1.0 -> 4.0 during the run), seconds:

| workers | threads | data | forward | backward | optimizer | iteration | validation | epoch_end |
|---|---|---|---|---|---|---|---|---|
| 0 | 2 | 0.126 | 0.357 | 0.455 | 0.069 | 1.007 | 0.264 | 1.031 |
| 1 | 1 | 0.000 | 0.424 | 0.680 | 0.017 | 1.121 | 0.698 | 1.458 |
| 2 | 2 | 0.000 | 0.629 | 0.763 | 0.050 | 1.442 | 0.767 | 1.104 |
| 0 | 1 | 0.157 | 0.277 | 0.525 | 0.014 | 0.972 | 0.468 | 1.279 |

Idle machine (load < 1; AMX CPU), after CPU bf16 autocast was added (``--cpu_precision``):

| workers | threads | precision | data | forward | backward | optimizer | iteration | validation | epoch_end |
|---|---|---|---|---|---|---|---|---|---|
| 0 | 2 | fp32 | 0.089 | 0.127 | 0.230 | 0.008 | 0.455 | 0.204 | 0.023 |
| 0 | 2 | auto (bf16) | 0.110 | 0.079 | 0.138 | 0.008 | 0.334 | 0.156 | 0.013 |
| 0 | 1 | auto (bf16) | 0.073 | 0.109 | 0.191 | 0.009 | 0.381 | 0.222 | 0.013 |
| 1 | 1 | auto (bf16) | 0.000 | 0.118 | 0.202 | 0.009 | 0.329 | 0.278 | 0.043 |

"forward" includes the float32 deep-supervision loss, which autocast leaves in float32. The
last line the script prints times the network alone (forward + backward on a random batch):
fp32 0.321 s, bf16 0.209 s, 1.54x on the demo network (its full-resolution stages use 1x3x3
kernels, so the bf16 convolutions are a smaller share); a second run of the whole table on the
idle machine gave 0.512 s (fp32) and 0.376 s (auto) per iteration.

"2 workers, 2 threads" is what nnU-Net picks on a 2-core machine without ``nnUNet_n_proc_DA``
(min(12, cpu count)); augmentation in the main process is ~30 % faster per iteration, so the
demo and ``nnssl_benchmark_ssl`` set ``nnUNet_n_proc_DA=0``. ``epoch_end`` was almost all
``progress.png``: without the redraw (``nnsslTrainer_Short`` redraws every 5 epochs) it measured
0.11 s at load ~14, where an iteration took 22 s.

Run (after the demo, or any plan+preprocess with the tiny preset):
``nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=/tmp/x python benchmarks/bench_iteration_profile.py
-d BTCV --settings 0:2:fp32 0:2:auto 0:1:auto 1:1:auto``
"""
import argparse
import contextlib
import io
import os
import time

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset", default="BTCV")
    p.add_argument("-tr", "--trainer", default="nnsslTrainer_Short")
    p.add_argument("-a", "--architecture", default="plainconvunet")
    p.add_argument("--iterations", type=int, default=20, help="timed training iterations per setting")
    p.add_argument("--val_iterations", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2, help="timed epoch ends (validation + on_epoch_end)")
    p.add_argument("--settings", nargs="+", default=["0:2:fp32", "0:2:auto", "1:1:auto", "2:2:auto"],
                   help="WORKERS:THREADS[:PRECISION] (nnUNet_n_proc_DA, torch threads, --cpu_precision; "
                        "default auto)")
    return p.parse_args(argv)


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def profile_finetuning(a, workers: int, threads: int, precision: str = "auto") -> dict:
    from nnssl.training.finetune import build_trainer

    os.environ["nnUNet_n_proc_DA"] = str(workers)
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        run = build_trainer(a.dataset, "3d_fullres", "all", a.architecture, a.trainer, device="cpu",
                            cpu_precision=precision)
        tr = run.trainer
        tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 1000, a.iterations, a.val_iterations
        tr.on_train_start()
    times = {k: [] for k in ("data", "forward", "backward", "optimizer")}
    epoch_times = {"validation": [], "epoch_end": []}
    net = tr.network
    for epoch in range(a.epochs):
        with contextlib.redirect_stdout(io.StringIO()):
            tr.on_epoch_start()
            tr.on_train_epoch_start()
        for i in range(a.iterations):
            batch, dt = _t(lambda: next(tr.dataloader_train))
            times["data"].append(dt)
            if hasattr(tr.lr_scheduler, "set_iteration"):
                tr.lr_scheduler.set_iteration(epoch * a.iterations + i)
            target = batch["target"]
            tr.optimizer.zero_grad(set_to_none=True)
            def forward():
                with tr._nnssl_autocast():  # what the trainer's train_step does (CPU bf16 or nothing)
                    return tr.loss(net(batch["data"]), target)
            loss, dt = _t(forward)
            times["forward"].append(dt)
            _, dt = _t(loss.backward)
            times["backward"].append(dt)

            def opt():
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
                tr.optimizer.step()
            _, dt = _t(opt)
            times["optimizer"].append(dt)
        with contextlib.redirect_stdout(io.StringIO()):
            tr.on_train_epoch_end([{"loss": np.array(float(loss))}])

            def val():
                with torch.no_grad():
                    tr.on_validation_epoch_start()
                    outs = [tr.validation_step(next(tr.dataloader_val)) for _ in range(a.val_iterations)]
                    tr.on_validation_epoch_end(outs)
            _, dt = _t(val)
            epoch_times["validation"].append(dt)
            _, dt = _t(tr.on_epoch_end)
            epoch_times["epoch_end"].append(dt)
    with contextlib.redirect_stdout(io.StringIO()):
        tr.on_train_end()
    # the first iteration includes worker start-up and lazy allocations: leave it out
    out = {k: float(np.mean(v[1:])) for k, v in times.items()}
    out.update({k: float(np.mean(v)) for k, v in epoch_times.items()})
    out["iteration"] = sum(out[k] for k in ("data", "forward", "backward", "optimizer"))
    return out


def network_alone(a, repeats: int = 8) -> dict:
    """Forward + backward of the trainer's network on a random batch, float32 vs bf16 autocast
    (no loss, no data): what the precision changes by itself. Seconds per step, 2 warm-ups left out."""
    from nnssl.training.finetune import build_trainer

    with contextlib.redirect_stdout(io.StringIO()):
        tr = build_trainer(a.dataset, "3d_fullres", "all", a.architecture, a.trainer, device="cpu").trainer
        tr.initialize()
    net, cm = tr.network, tr.configuration_manager
    x = torch.randn(cm.batch_size, tr.num_input_channels, *cm.patch_size)
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                y = net(x)
            sum(o.float().mean() for o in (y if isinstance(y, (list, tuple)) else [y])).backward()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.mean(times[2:]))
    return out


def main(argv=None):
    a = parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for s in a.settings:
        w, t, *prec = s.split(":")
        w, t, prec = int(w), int(t), (prec or ["auto"])[0]
        r = profile_finetuning(a, w, t, prec)
        rows.append((w, t, prec, r))
        print(f"workers {w} threads {t} precision {prec}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()),
              flush=True)
    torch.set_num_threads(2)
    alone = network_alone(a)
    print(f"load average after: {os.getloadavg()}")
    print(f"\nFine-tuning, {a.trainer}, {a.architecture}, seconds (mean over {a.iterations - 1} iterations x "
          f"{a.epochs} epochs; per-epoch costs over {a.epochs} epochs, {a.val_iterations} validation batches)\n")
    keys = ("data", "forward", "backward", "optimizer", "iteration", "validation", "epoch_end")
    print("| workers | threads | precision | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for w, t, prec, r in rows:
        print(f"| {w} | {t} | {prec} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    print(f"\nNetwork alone (forward + backward, random batch, 2 threads): fp32 {alone['fp32']:.3f} s, bf16 autocast "
          f"{alone['bf16']:.3f} s, ratio {alone['fp32'] / alone['bf16']:.2f}x")


if __name__ == "__main__":
    main()
