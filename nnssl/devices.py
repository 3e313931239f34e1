"""The one place that turns a ``-device`` argument into a ``torch.device`` (pretraining,
fine-tuning and prediction share it), and ``--cpu_precision`` into an autocast dtype."""
from typing import Optional

import torch

from nnssl.errors import NnsslError

DEVICES = ("cpu", "cuda")
CPU_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: Optional[str], local_rank: Optional[int] = None) -> torch.device:
    """'cpu' / 'cuda' / None (cuda when available, else cpu).

    ``local_rank`` (under torchrun): the process's GPU is selected and returned as ``cuda:<rank>``.
    """
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise NnsslError(f"-device '{name}' is not supported; use {' or '.join(DEVICES)}.")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise NnsslError("-device cuda was requested but torch sees no CUDA GPU; use -device cpu.")
    if local_rank is None:
        return torch.device("cuda")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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
