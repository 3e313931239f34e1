"""Planners for ULKANet and LoGoNet (Masked LoGoNet paper): write ``nnsslULKANetPlans.json``,
``nnsslULKANetLargePlans.json``, ``nnsslLoGoNetPlans.json`` and ``nnsslLoGoNetLargePlans.json``.

Patch constraints:
- ULKANet: every axis divisible by the total encoder stride (the product of the patch-embedding
  strides: 4 x 2 x 2 x 2 = 32 by default), so that every skip connection lines up.
- LoGoNet: additionally, the 2x2x2 split hands each local ULKANet half the patch, which must be
  divisible by the local total stride (4 x 2 = 8): every axis divisible by
  lcm(32, 2 x 8) = 32 by default.

Memory: the base planner shrinks the patch until the network's own
``compute_conv_feature_map_size`` fits nnU-Net's budget. Every hyper-parameter is written into
the plans' ``arch_kwargs``, so a plans file keeps building the same network if defaults change.

Assumption: no anisotropy-dependent strides. The paper resamples to (near-)isotropic voxels
(BTCV 1.5 x 1.5 x 2 mm, MSD 1 mm) and trains on 96^3 cubes; per-axis ``strides`` can be set
through ``arch_overrides`` (a preset) if a dataset needs them.
"""
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.logonet import LoGoNetConfig, required_divisor
from nnssl.architectures.ulkanet import VARIANTS, ULKANetConfig, config_to_kwargs
from nnssl.errors import NnsslError
from nnssl.planning.planners import nnsslArchitecturePlanner


class ULKANetPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with ULKANet's divisibility and memory estimate (normal variant)."""

    network_class_name: ClassVar[str] = "nnssl.architectures.ulkanet.ULKANet"
    default_plans_name: ClassVar[str] = "nnsslULKANetPlans"
    variant: ClassVar[str] = "normal"  # key of ulkanet.VARIANTS (Table 9 of the paper)
    config_class: ClassVar[type] = ULKANetConfig
    # Config field overrides on top of the variant (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = None, **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, **kwargs)

    def config(self):
        return self.config_class(**{**VARIANTS[self.variant], **self.arch_overrides})

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        return config_to_kwargs(self.config())

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        return self.config().total_stride

    def constraint(self) -> str:
        """The divisibility rule in words (for error messages)."""
        cfg = self.config()
        return (f"every patch axis must be divisible by the ULKANet total encoder stride {cfg.total_stride} "
                f"(patch-embedding strides {[list(s) for s in cfg.strides]})")

    def _check_fits_image(self, smallest, divisor, median) -> None:
        try:
            super()._check_fits_image(smallest, divisor, median)
        except NnsslError as e:
            raise NnsslError(f"{e} Constraint: {self.constraint()}.") from None


class ULKANetLargePlanner(ULKANetPlanner):
    """ULKANet-L (dims 96..768, depths 3, 3, 24, 3)."""

    default_plans_name: ClassVar[str] = "nnsslULKANetLargePlans"
    variant: ClassVar[str] = "large"


class LoGoNetPlanner(ULKANetPlanner):
    """LoGoNet: ULKANet's constraint plus the 2x2x2 split for the local ULKANets."""

    network_class_name: ClassVar[str] = "nnssl.architectures.logonet.LoGoNet"
    default_plans_name: ClassVar[str] = "nnsslLoGoNetPlans"
    config_class: ClassVar[type] = LoGoNetConfig

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        return required_divisor(self.config())

    def constraint(self) -> str:
        cfg = self.config()
        return (f"LoGoNet splits the patch 2x2x2, so every axis must be divisible by {required_divisor(cfg)}: by "
                f"the global ULKANet total stride {cfg.total_stride}, and each half by the local ULKANets' total "
                f"stride {cfg.local_config().total_stride} ({cfg.local_blocks} encoder blocks)")


class LoGoNetLargePlanner(LoGoNetPlanner):
    """LoGoNet-L."""

    default_plans_name: ClassVar[str] = "nnsslLoGoNetLargePlans"
    variant: ClassVar[str] = "large"
