"""The interface every SSL method implements.

A method is three things (the lightly/MAE pattern):

1. ``make_batch(cfg, images, rng)`` -- a pure function, run in the data-loading worker
   processes, that turns a batch of cropped, normalized image patches into the network
   inputs and the targets. All randomness comes from the ``numpy.random.Generator`` it is
   given (the engine derives it from seed, rank and iteration, which is what makes resumed
   runs bit-identical). The heavy lifting lives in ``nnssl/transforms/`` as functions
   ``f(x, ..., rng) -> (x_out, aux)`` that can be tested without a network.
2. heads: ``nn.Module`` attributes of the method object (never of the network, so the
   checkpoint's ``network_weights`` hold the segmentation network only);
3. ``forward_loss(network, batch)`` -- runs the network (and heads) and returns a dict of
   named loss terms plus ``"loss"``, their weighted sum, which the engine backpropagates.

Hyper-parameters are a dataclass with the paper's defaults (``config_class``); the engine
overrides fields from ``--set key=value`` and saves the result beside the checkpoint.
"""
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl.registry import Registry


class SSLMethod(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    # Which parts of the network are meaningful to transfer: "encoder" or "encoder+decoder".
    transfer: ClassVar[str] = "encoder+decoder"
    # Smallest batch the method can work with (Volume Fusion fuses sample i with i+1: 2).
    min_batch_size: ClassVar[int] = 1
    # Capabilities (nnssl.architectures.spec.CAPABILITIES) the network must have; checked by
    # check_compatible before anything is built.
    requires: ClassVar[FrozenSet[str]] = frozenset()

    def __init__(self, cfg, network: nn.Module, patch_size: Sequence[int], num_input_channels: int):
        super().__init__()
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_input_channels = num_input_channels

    # --- class-level hooks: needed before the network exists, or inside worker processes ---
    @classmethod
    def network_output_channels(cls, cfg) -> int:
        """Number of output channels the segmentation network is built with during pretraining."""
        return 1

    @classmethod
    def crop_size(cls, cfg, planned_patch_size: Sequence[int]) -> Tuple[int, ...]:
        """Size of the random crops the loader produces (default: the planned patch size)."""
        return tuple(int(p) for p in planned_patch_size)

    @classmethod
    def prepare(cls, cfg, data_folder: str, identifiers: List[str], seed: int):
        """Once per run, in the main process (rank 0 under DDP) before the loader workers start:
        precompute what ``make_batch`` needs (e.g. masked_kmeans' pseudo-label cache) and return the
        config to use (a ``dataclasses.replace`` copy when it changes). Default: ``cfg`` unchanged."""
        return cfg

    @classmethod
    def make_batch(cls, cfg, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, X, Y, Z] float32 normalized crops -> dict of tensors (inputs and targets).

        meta: ``{"keys": [case identifier per sample], "boxes": [per sample [[lo, hi] per spatial
        axis] in the preprocessed volume's voxel coordinates, beyond the volume where padded]}``;
        methods that do not need it ignore it.
        """
        raise NotImplementedError

    @classmethod
    def preview(cls, cfg, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Volumes [X, Y, Z] of sample 0 to show in ``nnssl_show_pretext``: (title, volume)."""
        raise NotImplementedError

    # --- runs in the training process ---
    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, iteration: int, total_iterations: int) -> None:
        """Called by the engine after every optimizer step (e.g. to update an EMA target network,
        BYOL's momentum encoder). Default: nothing."""


METHODS: Registry[type] = Registry("SSL method", "-m")


def compatible_architectures(method: str) -> List[str]:
    """Names of the registered architectures that have every capability ``method`` requires."""
    from nnssl.architectures.spec import ARCHITECTURES

    needs = METHODS.get(method).requires
    return [name for name, spec in ARCHITECTURES.items() if needs <= spec.capabilities]


def check_compatible(method: str, architecture: str) -> None:
    """Refuse (NnsslError) a method on an architecture that lacks a capability the method needs."""
    from nnssl.architectures.spec import ARCHITECTURES, CAPABILITIES
    from nnssl.errors import NnsslError

    missing = sorted(METHODS.get(method).requires - ARCHITECTURES.get(architecture).capabilities)
    if missing:
        what = "; ".join(f"{m}: {CAPABILITIES[m]}" for m in missing)
        raise NnsslError(
            f"SSL method (-m) '{method}' cannot run on architecture (-a) '{architecture}': it needs {what}. "
            f"Architectures that can: {', '.join(compatible_architectures(method)) or 'none registered'}.")
