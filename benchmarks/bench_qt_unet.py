"""QT-UNet and swin_pretext on CPU: step times and the memory of the BYOL heads.

1. **fwd+bwd**: one training step (forward, sum of the logits, backward) of QT-UNet-B and of
   nnU-Net's PlainConvUNet at the same patch (both from ``build_network``, i.e. what the planners
   write for that patch at 1 mm isotropic spacing), batch ``--batch``, 1 channel, 14 classes;
   mean of ``--reps`` timed steps after one warm-up step, and the ratio QT-UNet-B / PlainConvUNet.
2. **swin_pretext ÷ plain**: per network, swin_pretext's forward + backward (two views through
   the encoder, the target network's forward, the three heads) divided by a plain fwd+bwd step of
   the same network (as pretraining builds it: 1 output channel) on the same crops (issue target:
   <= 2.6); also with Adam's step and the EMA update included.
3. **BYOL heads at 96^3**: projector + predictor (+ the EMA target projector) on a QT-UNet-B
   bottleneck (768 x 3^3, two views of ``--batch`` crops), flattened (the authors' code) or
   pooled first (swin_pretext's default): parameters, parameter memory (weights, gradients,
   Adam's two moments, the target copy) and the measured peak resident memory of a forward +
   backward + Adam step in a fresh subprocess (``ru_maxrss`` minus the same process's peak
   before the heads existed).

Run: ``python benchmarks/bench_qt_unet.py [--patch 64] [--batch 2] [--reps 2]`` (about 2-4 minutes
at 64^3 on 2 busy cores; ``--patch 96`` is the paper's CT patch and takes several times longer).
Timings are wall-clock on a shared machine: compare ratios, not absolute numbers.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from nnssl.architectures import build_network
from nnssl.ssl.swin_pretext import SwinPretext, SwinPretextConfig

NUM_CLASSES = 14


def step_time(fn, reps: int) -> float:
    fn()  # warm-up (allocations, caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def plain_step(net, x):
    def run():
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()
    return run


def pretext_step(net, method, batch, optimizer=None):
    """forward_loss + backward; with an optimizer also Adam's step and the EMA update."""
    def run():
        net.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        method.forward_loss(net, batch)["loss"].backward()
        if optimizer is not None:
            optimizer.step()
            method.after_step(0, 100)
    return run


def bench_steps(patch: int, batch: int, reps: int) -> None:
    size = (patch,) * 3
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, 1, *size)).astype(np.float32)
    x = torch.from_numpy(images)
    plain = {}
    print(f"## fwd+bwd and swin_pretext steps at {patch}^3, batch {batch}, CPU ({torch.get_num_threads()} threads)")
    for name in ("plainconvunet", "qt_unet_b"):
        torch.manual_seed(0)
        net = build_network(name, size, 1, NUM_CLASSES).train()
        plain[name] = step_time(plain_step(net, x), reps)
        cfg = SwinPretextConfig(batch_size=batch)
        method = SwinPretext(cfg, build_network(name, size, 1, 1).train(), size, 1).train()
        online = method._online[0]
        params = [p for p in list(online.parameters()) + list(method.parameters()) if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        pretext_batch = SwinPretext.make_batch(cfg, images, rng)
        # the plain step of the pretraining network itself (1 output channel), for the ratio
        same_net_plain = step_time(plain_step(online, x), reps)
        pretext = step_time(pretext_step(online, method, pretext_batch), reps)
        full = step_time(pretext_step(online, method, pretext_batch, optimizer), reps)
        print(f"{name:14s} fwd+bwd (14 classes) {plain[name]:7.3f} s | swin_pretext fwd+bwd {pretext:7.3f} s / plain "
              f"fwd+bwd of the pretraining network {same_net_plain:7.3f} s = {pretext / same_net_plain:5.2f} "
              f"(with Adam step + EMA update: {full:7.3f} s = {full / same_net_plain:5.2f})")
    print(f"ratio fwd+bwd qt_unet_b / plainconvunet = {plain['qt_unet_b'] / plain['plainconvunet']:.2f}")


def _heads_child(pool: bool, batch: int) -> None:
    """In a fresh process: peak RSS growth of one BYOL-heads training step (printed as JSON)."""
    torch.set_num_threads(1)
    from nnssl.ssl.swin_pretext import mlp_head

    cfg = SwinPretextConfig()
    feats = torch.randn(2 * batch, 768, 3, 3, 3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    proj_in = 768 if pool else 768 * 27
    projector = mlp_head(proj_in, cfg.byol_hidden, cfg.byol_out)
    predictor = mlp_head(cfg.byol_out, cfg.byol_hidden, cfg.byol_out)
    target = mlp_head(proj_in, cfg.byol_hidden, cfg.byol_out).requires_grad_(False)
    optimizer = torch.optim.Adam(list(projector.parameters()) + list(predictor.parameters()), lr=cfg.lr)
    inp = feats.mean(dim=(2, 3, 4)) if pool else feats.flatten(1)
    p = predictor(projector(inp))
    with torch.no_grad():
        z = target(inp)
    (2 - 2 * torch.nn.functional.cosine_similarity(p, z.roll(batch, 0), dim=-1)).mean().backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_online = sum(q.numel() for q in list(projector.parameters()) + list(predictor.parameters()))
    n_target = sum(q.numel() for q in target.parameters())
    print(json.dumps({"online_params": n_online, "target_params": n_target,
                      "param_bytes": 4 * (4 * n_online + n_target), "peak_rss_growth_kib": peak - before}))


def bench_heads(batch: int) -> None:
    print(f"## BYOL heads on a QT-UNet-B bottleneck at 96^3 (768 x 3^3), 2 x {batch} rows, fp32")
    for pool in (False, True):
        out = subprocess.run([sys.executable, __file__, "--heads_child", str(int(pool)), "--batch", str(batch)],
                             capture_output=True, text=True, encoding="utf-8", check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "pooled   " if pool else "flattened"
        print(f"{label} projector input: online heads {r['online_params'] / 1e6:6.2f} M params, target projector "
              f"{r['target_params'] / 1e6:6.2f} M; weights+grads+Adam+target {r['param_bytes'] / 2 ** 20:7.1f} MiB; "
              f"measured peak RSS growth {r['peak_rss_growth_kib'] / 1024:7.1f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=64, help="cubic patch edge (a multiple of 32; default 64)")
    p.add_argument("--batch", type=int, default=2, help="crops per step (default 2, swin_pretext's default)")
    p.add_argument("--reps", type=int, default=2, help="timed steps per measurement (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--heads_child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.heads_child is not None:
        return _heads_child(bool(a.heads_child), a.batch)
    torch.set_num_threads(a.threads)
    bench_heads(a.batch)
    bench_steps(a.patch, a.batch, a.reps)


if __name__ == "__main__":
    main()
