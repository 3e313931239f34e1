"""Training-step time of UNETR and UNETR++ relative to nnU-Net's PlainConvUNet at the same patch.

Every network is the paper-size default built by ``build_network`` for the same patch (1 input
channel, 14 classes, deep supervision off, train mode): UNETR (ViT-B/16, 92.8 M parameters at 96^3;
only its position embedding follows the patch), UNETR++ (dims 32-64-128-256; its size does, through the
position embeddings and spatial projections) and the PlainConvUNet nnU-Net's topology gives that
patch at isotropic spacing. A step is forward + cross-entropy on a random label map + backward
(no optimizer update); 1 warm-up step each, then ``--reps`` steps per network taken round-robin
(so a change of load during the run hits every network alike), reported as medians of the wall
time and of the process CPU time (less sensitive to other processes on a shared machine) and as
ratios to the PlainConvUNet.

The patch must be divisible by (16, 32, 32) (UNETR++'s stem (2, 4, 4) times 2^3; UNETR needs 16).
The default 32 x 64 x 64 keeps the run to a few minutes on 2 CPU cores; ``--patch 64 128 128`` is
UNETR++'s paper patch. The machine's load average is printed with the figures.

Run: ``python benchmarks/bench_unetr.py [--patch D H W] [--reps N] [--device cpu|cuda] [--threads N]``
"""
import argparse
import os
import time
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnssl.architectures import build_network
from nnssl.architectures.spec import count_parameters

NUM_CLASSES = 14
MODELS = ("plainconvunet", "unetr", "unetr_pp")


def step_seconds(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """(wall, process CPU) seconds of one forward + cross-entropy + backward."""
    w0, c0 = time.perf_counter(), time.process_time()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), target).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = tuple(args.patch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *patch, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (1, *patch), generator=gen).to(device)
    nets = {}
    for name in MODELS:
        torch.manual_seed(0)
        nets[name] = build_network(name, patch, 1, NUM_CLASSES).to(device).train()
        step_seconds(nets[name], x, target)  # warm-up: allocator, kernel selection
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"fwd+bwd step, batch 1, patch {patch}, {NUM_CLASSES} classes, device {device}, torch threads "
          f"{args.threads}, median of {args.reps} steps per network taken round-robin; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    times = {name: [] for name in MODELS}
    for _ in range(args.reps):  # round-robin, so load changes during the run hit every network alike
        for name, net in nets.items():
            times[name].append(step_seconds(net, x, target))
    median = {name: np.median(np.asarray(t), axis=0) for name, t in times.items()}
    base = median["plainconvunet"]
    for name, net in nets.items():
        (wall, cpu), ratio = median[name], median[name] / base
        print(f"  {name:<14} {count_parameters(net) / 1e6:7.2f} M parameters  wall {wall:8.3f} s (x{ratio[0]:.2f})  "
              f"process CPU {cpu:8.3f} s (x{ratio[1]:.2f} of plainconvunet)")


if __name__ == "__main__":
    main()
