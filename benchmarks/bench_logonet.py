"""Size and speed of ULKANet, LoGoNet and their large variants at a 1 x 96^3 patch, 14 classes
(Masked LoGoNet paper, Table 10), beside nnU-Net's PlainConvUNet planned for the same patch.

Per network: trainable parameters; forward FLOPs from ``torch.utils.flop_counter.FlopCounterMode``
(counted on the meta device, so without arithmetic), which counts a multiply-add as 2 FLOPs and
only matrix products / convolutions (no norms, activations or interpolation), also shown halved as
multiply-adds (GMACs) -- the paper's "FLOPs (G)" compare with those (the thop / fvcore convention);
CPU forward time per patch under ``torch.no_grad`` in eval mode (1 warm-up + 2 timed runs, mean;
``--reps``, and for the slow large variants ``--large_warmup`` / ``--large_reps``), and its ratio
to the PlainConvUNet, all measured in one run.

The PlainConvUNet is nnU-Net's 3d_fullres topology for a 96^3 isotropic patch: 6 stages, features
32, 64, 128, 256, 320, 320, 3^3 kernels, strides [1,1,1] then [2,2,2] x 5, 2 convs per stage,
InstanceNorm + LeakyReLU.

Run: ``python benchmarks/bench_logonet.py [--reps N] [--patch S] [--models NAME ...]`` (the default,
all five at 96^3, takes 5-8 minutes on 2 busy CPU cores).
"""
import argparse
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnssl.architectures.logonet import LoGoNet
from nnssl.architectures.ulkanet import VARIANTS, ULKANet

NUM_CLASSES = 14
# Table 10 of the paper: (parameters in M, "FLOPs (G)").
PAPER = {"ULKANet": (40.2, 109.94), "LoGoNet": (67.5, 246.96), "ULKANet-L": (121.2, 218.70),
         "LoGoNet-L": (172.54, 487.65), "PlainConvUNet": (None, None)}


def plain_conv_unet() -> nn.Module:
    return PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_conv_per_stage=2,
        num_classes=NUM_CLASSES, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)


BUILDERS = {
    "PlainConvUNet": plain_conv_unet,
    "ULKANet": lambda: ULKANet(1, NUM_CLASSES, **VARIANTS["normal"]),
    "LoGoNet": lambda: LoGoNet(1, NUM_CLASSES, **VARIANTS["normal"]),
    "ULKANet-L": lambda: ULKANet(1, NUM_CLASSES, **VARIANTS["large"]),
    "LoGoNet-L": lambda: LoGoNet(1, NUM_CLASSES, **VARIANTS["large"]),
}


def forward_flops(name: str, shape) -> int:
    """Counted on the meta device: shapes only, no arithmetic, no memory."""
    with torch.device("meta"):
        net = BUILDERS[name]().eval()
        x = torch.empty(shape)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    return counter.get_total_flops()


def mean_forward_seconds(net: nn.Module, x: torch.Tensor, reps: int, warmup: int) -> float:
    for _ in range(warmup):  # allocator, oneDNN primitive creation
        net(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        net(x)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="timed forward passes per network after one warm-up")
    parser.add_argument("--large_reps", type=int, default=2,
                        help="timed forward passes of ULKANet-L / LoGoNet-L (slow on CPU: lower it on a busy machine)")
    parser.add_argument("--large_warmup", type=int, default=1,
                        help="warm-up passes of ULKANet-L / LoGoNet-L before timing (0 saves one slow pass each)")
    parser.add_argument("--patch", type=int, default=96, help="edge of the cubic input patch (a multiple of 32, at least 64)")
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS),
                        help="networks to measure; PlainConvUNet is always measured first as the reference")
    args = parser.parse_args(argv)
    if min(args.reps, args.large_reps) < 1 or args.large_warmup < 0 or args.patch < 64 or args.patch % 32:
        parser.error("--reps/--large_reps must be >= 1, --large_warmup >= 0, and --patch a multiple of 32 of at "
                     "least 64 (the U-Net downsamples 5 times)")
    names = ["PlainConvUNet"] + [m for m in args.models if m != "PlainConvUNet"]

    torch.manual_seed(0)
    x = torch.randn(1, 1, args.patch, args.patch, args.patch)
    rows = []
    with torch.no_grad():
        for name in names:
            flops = forward_flops(name, x.shape)
            net = BUILDERS[name]().eval()
            params = sum(p.numel() for p in net.parameters() if p.requires_grad)
            large = name.endswith("-L")
            reps, warmup = (args.large_reps, args.large_warmup) if large else (args.reps, 1)
            seconds = mean_forward_seconds(net, x, reps, warmup)
            rows.append((name, params, flops, seconds, f"{warmup}+{reps}"))
            del net

    reference = rows[0][3]
    print(f"Forward of one 1x{args.patch}^3 patch, {NUM_CLASSES} classes, CPU, {torch.get_num_threads()} threads, "
          f"eval + no_grad; time = mean of the timed runs after the warm-up ones (runs: warm-up+timed)")
    print(f"{'network':<14}{'params (M)':>11}{'paper':>8}{'GFLOPs':>9}{'GMACs':>8}{'paper':>8}"
          f"{'s/patch':>9}{'x plain':>9}{'runs':>6}")
    for name, params, flops, seconds, runs in rows:
        p_params, p_flops = PAPER[name]
        print(f"{name:<14}{params / 1e6:>11.2f}{p_params if p_params else '-':>8}{flops / 1e9:>9.1f}"
              f"{flops / 2e9:>8.1f}{p_flops if p_flops else '-':>8}{seconds:>9.2f}{seconds / reference:>9.2f}"
              f"{runs:>6}")
    print("GFLOPs: FlopCounterMode, a multiply-add = 2 FLOPs (convs/matmuls only); GMACs = GFLOPs / 2. "
          "Paper columns: Table 10 (# Param, FLOPs (G)) at 96^3.")


if __name__ == "__main__":
    main()
