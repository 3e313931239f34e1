"""The one place that turns a ``-device`` argument into a ``torch.device`` (pretraining,
fine-tuning and prediction share it), and ``--cpu_precision`` into an autocast dtype."""
import os
from typing import Optional

import torch

from nnssl.errors import NnsslError

DEVICES = ("cpu", "cuda", "mps")
CPU_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: Optional[str], local_rank: Optional[int] = None) -> torch.device:
    """'cpu' / 'cuda' / 'mps' / None (cuda when available, else cpu; mps only when asked for, as in
    nnU-Net).

    ``local_rank`` (under torchrun / -num_gpus): the process's GPU is selected and returned as
    ``cuda:<rank>``; with 'cpu' every process uses the CPU.
    """
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise NnsslError(f"-device '{name}' is not supported; use {', '.join(DEVICES)}.")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        return _mps()
    if not torch.cuda.is_available():
        raise NnsslError("-device cuda was requested but torch sees no CUDA GPU; use -device cpu.")
    if local_rank is None:
        return torch.device("cuda")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _mps() -> torch.device:
    """Apple's Metal GPU, or a refusal saying why this torch cannot use it."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        raise NnsslError(f"-device mps: this torch build ({torch.__version__}) has no MPS support; MPS (Apple's Metal "
                         f"GPU) exists only in torch builds for macOS. Use -device cpu or cuda.")
    if not mps.is_available():
        raise NnsslError("-device mps: torch supports MPS but sees no MPS device (it needs macOS 12.3 or later on a "
                         "Mac with a Metal GPU). Use -device cpu.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        raise NnsslError("-device mps runs a single process: torch.distributed has no MPS backend. Train with one "
                         "process (no torchrun / -num_gpus), or use -device cuda or cpu.")
    return torch.device("mps")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 in hardware (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo's flags).

    Elsewhere oneDNN emulates bf16, which is slower than float32, so "auto" stays in float32 there."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def cpu_autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype of CPU mixed precision for ``--cpu_precision`` (None: float32 throughout).

    "auto": bf16 autocast on a CPU with native bf16 (measured on the demo's tiny U-Net, 2 cores with
    AMX: the network's forward + backward 1.5x faster, a whole fine-tuning iteration 1.36x),
    float32 elsewhere; "bf16" / "fp32" force it. On CUDA this is
    None: there nnU-Net's own fp16 AMP applies. Weights, optimizer state and checkpoints stay float32."""
    if precision not in CPU_PRECISIONS:
        raise NnsslError(f"--cpu_precision '{precision}' is not one of {', '.join(CPU_PRECISIONS)}.")
    if device.type != "cpu" or precision == "fp32":
        return None
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None
