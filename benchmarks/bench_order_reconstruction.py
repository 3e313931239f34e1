"""order_reconstruction (LWI) training step ÷ a plain forward+backward of the same network (target ≤ 1.15).

Both steps train the same network on the same batch (``make_batch`` of random crops): the plain step is
``network(x)`` -> voxel MSE against the target -> backward -> AdamW step; the LWI step is
``forward_loss`` (encoder, per-level slab pooling and order heads, decoder, CE + MSE) -> backward ->
AdamW step over the network and the heads. The difference is what order prediction costs on top of
reconstruction. Steps alternate (plain, LWI, plain, ...) after one warm-up each, so load changes on a
shared machine hit both alike; the medians are reported. ``make_batch`` (slab shuffle + masking, run in
the loader workers) is timed on its own, with one thread as in the workers.

Models: ``NAME`` (paper size) or ``NAME:PRESET`` (e.g. ``plainconvunet:tiny``, the demo's network), each
built by ``build_network`` for ``--patch`` (default the demo's 32 x 64 x 64).

Run: ``python benchmarks/bench_order_reconstruction.py [--models plainconvunet:tiny unetr] [--patch D H W]
[--batch 2] [--steps 5] [--threads 1] [--device cpu|cuda]``
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from nnssl.architectures import build_network
from nnssl.architectures.spec import count_parameters
from nnssl.ssl.order_reconstruction import OrderReconstruction, OrderReconstructionConfig


def timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(spec: str, patch, batch: int, steps: int, device: torch.device) -> None:
    name, _, preset = spec.partition(":")
    preset = preset or None

    def build():
        return build_network(name, patch, 1, 1, preset=preset)

    cfg = OrderReconstruction.configure(OrderReconstructionConfig(batch_size=batch), build, patch, 1)
    torch.manual_seed(0)
    net = build()
    method = OrderReconstruction(cfg, net, patch, 1)
    net, method = net.to(device).train(), method.to(device)
    images = np.random.default_rng(0).normal(size=(batch, 1) + tuple(patch)).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    t_make = float(np.median([timed(lambda: OrderReconstruction.make_batch(cfg, images, rng), torch.device("cpu"))
                              for _ in range(10)]))
    torch.set_num_threads(threads)
    data = {k: v.to(device) for k, v in OrderReconstruction.make_batch(cfg, images, rng).items()}
    plain_opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lwi_opt = torch.optim.AdamW(list(net.parameters()) + list(method.parameters()), lr=cfg.lr,
                                weight_decay=cfg.weight_decay)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        F.mse_loss(net(data["data"]), data["target"]).backward()
        plain_opt.step()

    def lwi():
        lwi_opt.zero_grad(set_to_none=True)
        method.forward_loss(net, data)["loss"].backward()
        lwi_opt.step()

    plain(), lwi()  # warm-up: allocator, kernel selection
    t_plain, t_lwi = [], []
    for _ in range(steps):
        t_plain.append(timed(plain, device))
        t_lwi.append(timed(lwi, device))
    p, m = float(np.median(t_plain)), float(np.median(t_lwi))
    heads = sum(h.linear.in_features for h in method.heads)
    print(f"  {spec:<20} {count_parameters(net) / 1e6:7.2f} M params, B = {cfg.num_slabs} slabs, order heads on "
          f"levels {method.levels} ({heads} input features)")
    print(f"    plain fwd+bwd+AdamW {1e3 * p:9.1f} ms   order_reconstruction step {1e3 * m:9.1f} ms   "
          f"ratio {m / p:.3f} (target <= 1.15)   make_batch {1e3 * t_make:.1f} ms (1 thread)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["plainconvunet:tiny", "unetr"])
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"order_reconstruction step vs plain step, batch {args.batch}, patch {tuple(args.patch)}, device "
          f"{args.device}, {args.threads} torch thread(s), median of {args.steps}; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    for spec in args.models:
        bench_model(spec, tuple(args.patch), args.batch, args.steps, torch.device(args.device))


if __name__ == "__main__":
    main()
