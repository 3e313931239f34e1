"""HybridMIM pretraining step time: partial region prediction vs full reconstruction (paper 002,
Fig. 5: 36-52 % less time per step), and SwinUNETR vs nnU-Net's U-Net at the same patch.

1. One HybridMIM step (``forward_loss`` with every term, backward, AdamW step) on the same network,
   crop and batch, once with the paper's centred region (64³ of a 96³ crop: the decoder runs on
   cropped levels) and once with the region = the whole crop (full reconstruction). Target: the
   partial step takes >= 30 % less time on plainconvunet.
2. Forward + backward of the bare segmentation network (a mean-square loss on its output, no SSL)
   for ``swinunetr`` divided by ``plainconvunet`` at the same patch.

Networks come from ``build_network`` (nnU-Net's 3d_fullres topology for the patch at 1 mm isotropic
spacing; SwinUNETR at feature size 48), one input channel. Each timing: ``--warmup`` untimed steps
then the median of ``--reps`` timed ones, all in one process (the same load for every row). On CPU
the default (96³, batch 2, full-size networks) takes several minutes on 2 cores; ``--preset tiny``
and ``--patch 64`` make a smoke run.

Run: ``python benchmarks/bench_hybrid_mim.py [--patch 96] [--batch 2] [--reps 3] [--device cpu]
[--preset tiny] [--hybrid_archs plainconvunet swinunetr] [--skip_segmentation]``.
"""
import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from nnssl.architectures import build_network
from nnssl.ssl.hybrid_mim import HybridMIM, HybridMIMConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, reps: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``reps`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hybrid_step_time(arch: str, patch, batch_size: int, region, args, device) -> float:
    torch.manual_seed(0)
    net = build_network(arch, patch, 1, 1, preset=args.preset).to(device)
    cfg = dataclasses.replace(HybridMIMConfig(), region_size=tuple(region))
    method = HybridMIM(cfg, net, patch, 1).to(device)
    images = np.random.default_rng(0).normal(size=(batch_size, 1, *patch)).astype(np.float32)
    batch = {k: v.to(device) for k, v in HybridMIM.make_batch(cfg, images, np.random.default_rng(1)).items()}
    params = list(net.parameters()) + list(method.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)
    net.train()
    method.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = method.forward_loss(net, batch)["loss"]
        loss.backward()
        opt.step()
    return time_steps(step, args.warmup, args.reps, device)


def segmentation_fwd_bwd_time(arch: str, patch, batch_size: int, args, device) -> float:
    torch.manual_seed(0)
    net = build_network(arch, patch, 1, 14, preset=args.preset).to(device).train()
    x = torch.randn(batch_size, 1, *patch, device=device)

    def step():
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = net(x).float().pow(2).mean()
        loss.backward()
    return time_steps(step, args.warmup, args.reps, device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=96, help="cubic crop edge (a multiple of 32)")
    p.add_argument("--region", type=int, default=None, help="partial region edge (default: crop - 32)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--preset", default=None, help="architecture size preset (e.g. tiny); default the papers'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--hybrid_archs", nargs="*", default=["plainconvunet"],
                   help="architectures to time partial vs full HybridMIM on (e.g. plainconvunet swinunetr)")
    p.add_argument("--skip_segmentation", action="store_true", help="leave out the swinunetr / plainconvunet row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = (args.patch,) * 3
    region = (args.region or args.patch - 32,) * 3
    print(f"device {device}, torch threads {torch.get_num_threads()}, crop {list(patch)}, batch {args.batch}, "
          f"preset {args.preset or 'paper size'}, median of {args.reps} after {args.warmup} warm-up")

    for arch in args.hybrid_archs:
        partial = hybrid_step_time(arch, patch, args.batch, region, args, device)
        full = hybrid_step_time(arch, patch, args.batch, patch, args, device)
        print(f"hybrid_mim step on {arch}: partial region {list(region)} {partial:.3f} s, full reconstruction "
              f"{full:.3f} s -> partial takes {100 * (1 - partial / full):.1f} % less time (paper: 36-52 %; "
              f"target >= 30 % on plainconvunet)")

    if args.skip_segmentation:
        return
    swin = segmentation_fwd_bwd_time("swinunetr", patch, args.batch, args, device)
    unet = segmentation_fwd_bwd_time("plainconvunet", patch, args.batch, args, device)
    print(f"segmentation forward+backward: swinunetr {swin:.3f} s, plainconvunet {unet:.3f} s -> "
          f"swinunetr / plainconvunet = {swin / unet:.2f}")


if __name__ == "__main__":
    main()
