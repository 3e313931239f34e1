"""The one place that turns a ``-device`` argument into a ``torch.device`` (pretraining,
fine-tuning and prediction share it)."""
from typing import Optional

import torch

from nnssl.errors import NnsslError

DEVICES = ("cpu", "cuda")


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
