"""Planner for UNETR (paper 003's fixed-size backbone): writes ``nnsslUNETRPlans.json``.

Patch constraint: every axis a multiple of the ViT patch, 16 (the decoder's four x2
deconvolutions undo exactly that). The planned patch is written into the plans' ``arch_kwargs``
as ``img_size``, because the learned position embedding has one entry per token of that grid.
Memory: the base planner shrinks the patch until ``UNETR.compute_conv_feature_map_size``
(token maps, attention matrices, conv outputs) fits nnU-Net's budget; UNETR at the paper's 96^3
fits the default 8 GB. Every hyper-parameter is written into the plans' ``arch_kwargs``.
"""
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.ulkanet import config_to_kwargs
from nnssl.architectures.unetr import VIT_PATCH, UNETRConfig
from nnssl.planning.planners import nnsslArchitecturePlanner


class UNETRPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with UNETR's divisibility (16 per axis) and memory estimate."""

    network_class_name: ClassVar[str] = "nnssl.architectures.unetr.UNETR"
    # UNETRConfig field overrides (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnsslUNETRPlans", **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name, **kwargs)

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        return config_to_kwargs(UNETRConfig(**{**self.arch_overrides, "img_size": tuple(patch_size)}))

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        return (VIT_PATCH,) * 3
