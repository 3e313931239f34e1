"""Planners for QT-UNet T / S / B (paper 001): write ``nnsslQTUNet{T,S,B}Plans.json``.

Patch constraint: every axis divisible by the patch embedding stride times one 2 per patch
merging, 4 x 2^3 = 32, so every merge sees an even grid and every skip lines up. The window (7)
adds none: window attention pads and masks (``blocks/swin.py``). Memory: the base planner
shrinks the patch until ``QTUNet.compute_conv_feature_map_size`` (counted from the token grids:
linear outputs, attention maps, norms) fits nnU-Net's budget; QT-UNet-B at 96^3 (the paper's CT
patch) fits the default 8 GB. Every hyper-parameter is written into the plans' ``arch_kwargs``.

The cross-attention's keys/values are the arch kwarg ``cross_kv_source``, written into the plans:
"encoder_output" (the paper); set it to "encoder_input" in the plans' ``arch_kwargs`` to reproduce
the authors' code (``nnssl.architectures.qt_unet``'s docstring).

Assumption: isotropic merging on every axis (the paper merges all three axes and trains on
96^3 / 128^3 cubes), so anisotropic data gets a patch that is a multiple of 32 per axis.
"""
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.qt_unet import EMBED_DIMS, QTUNetConfig
from nnssl.architectures.ulkanet import config_to_kwargs
from nnssl.planning.planners import nnsslArchitecturePlanner


class QTUNetBPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with QT-UNet's divisibility (32) and token-count memory estimate (base variant)."""

    network_class_name: ClassVar[str] = "nnssl.architectures.qt_unet.QTUNet"
    default_plans_name: ClassVar[str] = "nnsslQTUNetBPlans"
    variant: ClassVar[str] = "b"  # key of qt_unet.EMBED_DIMS
    # QTUNetConfig field overrides on top of the variant (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = None, **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, **kwargs)

    def config(self) -> QTUNetConfig:
        return QTUNetConfig(**{"embed_dim": EMBED_DIMS[self.variant], **self.arch_overrides})

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        return config_to_kwargs(self.config())

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        return (self.config().divisor,) * 3


class QTUNetSPlanner(QTUNetBPlanner):
    """QT-UNet-S (C = 72)."""

    default_plans_name: ClassVar[str] = "nnsslQTUNetSPlans"
    variant: ClassVar[str] = "s"


class QTUNetTPlanner(QTUNetBPlanner):
    """QT-UNet-T (C = 48)."""

    default_plans_name: ClassVar[str] = "nnsslQTUNetTPlans"
    variant: ClassVar[str] = "t"
