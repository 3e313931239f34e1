"""Volume Fusion speed: the box draw, label painting and fusion of a 2x1x64x128x128 float32
batch (SPEC §7.1: ~0.02 ms / ~1.2 ms), and the whole ``make_batch`` against one training step
of nnU-Net's default 3d_fullres PlainConvUNet at that patch (target ratio < 0.05).

Run: ``python benchmarks/bench_volume_fusion.py [--reps N] [--steps N]``.
"""
import argparse
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnssl.ssl.volume_fusion import VolumeFusion, VolumeFusionConfig
from nnssl.transforms.volume_fusion import draw_fusion_boxes, fuse, paint_label_map

PATCH = (64, 128, 128)
BATCH = 2


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up (allocator, first-touch pages)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def nnunet_like_unet(num_classes: int) -> nn.Module:
    """nnU-Net-style 3d_fullres PlainConvUNet for a 64x128x128 patch with anisotropic spacing:
    6 stages, 32..320 features, 1x3x3 kernels while the first axis is not downsampled."""
    return PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
        kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="repetitions per transform timing (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed network training steps (after one warm-up)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        parser.error("--reps and --steps must be at least 1")

    cfg = VolumeFusionConfig()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 1) + PATCH).astype(np.float32)
    draws = [draw_fusion_boxes(rng, PATCH, cfg) for _ in range(BATCH)]
    labels = np.stack([paint_label_map(d, PATCH) for d in draws])
    fused = np.empty_like(images)

    def fuse_batch():
        for i in range(BATCH):
            fuse(images[i], images[(i + 1) % BATCH], labels[i], cfg.K, out=fused[i])

    # nnU-Net's loader workers run with one torch thread (NonDetMultiThreadedAugmenter): time that.
    train_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_draw = median_ms(lambda: [draw_fusion_boxes(rng, PATCH, cfg) for _ in range(BATCH)], args.reps)
    t_paint = median_ms(lambda: [paint_label_map(d, PATCH, out=labels[i]) for i, d in enumerate(draws)], args.reps)
    t_fuse = median_ms(fuse_batch, args.reps)
    t_make = median_ms(lambda: VolumeFusion.make_batch(cfg, images, rng), args.reps)
    torch.set_num_threads(train_threads)
    shape = f"{BATCH}x1x" + "x".join(map(str, PATCH))
    print(f"Volume Fusion transforms, {shape} float32, median of {args.reps}, 1 thread")
    print(f"  draw boxes (both samples): {t_draw:.4f} ms")
    print(f"  paint label maps:          {t_paint:.3f} ms")
    print(f"  fuse (in-place-capable):   {t_fuse:.3f} ms")
    print(f"  make_batch (all of it):    {t_make:.3f} ms")

    torch.manual_seed(0)
    net = nnunet_like_unet(VolumeFusion.network_output_channels(cfg))
    method = VolumeFusion(cfg, net, PATCH, 1)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = VolumeFusion.make_batch(cfg, images, rng)

    def step():
        loss = method.forward_loss(net, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = median_ms(step, args.steps)
    print(f"PlainConvUNet (6 stages, 32..320) fwd+bwd+Adam step, batch {BATCH}: {t_step:.0f} ms "
          f"(median of {args.steps}, {train_threads} threads)")
    print(f"  make_batch / step = {t_make / t_step:.5f}  (target < 0.05)")


if __name__ == "__main__":
    main()
