"""Planner for SwinUNETR: writes ``nnsslSwinUNETRPlans.json``.

Patch constraint: every axis a multiple of 32 (the patch embedding's stride 2 times four 2x2x2
patch mergings; the decoder's five x2 up blocks must land exactly on the skips), and at least
32 x 64 x 64 (``min_patch_size``: a bottleneck of more than one voxel). The window size
adds none (a stage grid that is not a multiple of the window is padded, a shorter one shrinks the
window). Memory: the base planner shrinks the patch until the network's own
``compute_conv_feature_map_size`` (conv outputs, Swin activations and attention maps) fits
nnU-Net's budget. Every hyper-parameter is written into the plans' ``arch_kwargs``.
"""
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.swinunetr import TOTAL_STRIDE, SwinUNETRConfig
from nnssl.architectures.ulkanet import config_to_kwargs
from nnssl.planning.planners import nnsslArchitecturePlanner


class SwinUNETRPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with SwinUNETR's divisibility (32) and memory estimate."""

    network_class_name: ClassVar[str] = "nnssl.architectures.swinunetr.SwinUNETR"
    # At 32^3 the bottleneck is one voxel, which instance norm cannot normalise (MONAI fails on it
    # too): at least 64 along the two last axes (nnU-Net's transpose puts the thickest, usually the
    # shortest, axis first).
    min_patch_size: ClassVar[Tuple[int, int, int]] = (32, 64, 64)
    # SwinUNETRConfig field overrides (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnsslSwinUNETRPlans", **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name, **kwargs)

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        return config_to_kwargs(SwinUNETRConfig(**self.arch_overrides))

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        return TOTAL_STRIDE
