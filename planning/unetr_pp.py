"""Planner for UNETR++ (paper 003's hierarchical backbone): writes ``nnsslUNETRppPlans.json``.

Patch constraint: every axis divisible by the stem stride times 2 per down-sampling,
(2, 4, 4) x 2^3 = (16, 32, 32), so every stage's token grid is whole. The patch is fixed here:
position embeddings and the EPA spatial projections are sized for the token count, so the planned
patch goes into the plans' ``arch_kwargs`` (``img_size``), pretraining checkpoints record it,
and the network and its fine-tuning trainer refuse any other patch. Memory: the base planner
shrinks the patch until ``UNETRpp.compute_conv_feature_map_size`` (token maps, attention
matrices, conv outputs) fits nnU-Net's budget; the paper's 64 x 128 x 128 fits the default 8 GB.

Assumption: the stem's (2, 4, 4) treats axis 0 as the thick one, as nnU-Net's transpose orders
CT (slices first; the paper's Synapse patch is 64 x 128 x 128); ``stem_stride`` is a config field
for other data.
"""
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.ulkanet import config_to_kwargs
from nnssl.architectures.unetr_pp import UNETRppConfig, required_divisor
from nnssl.planning.planners import nnsslArchitecturePlanner


class UNETRppPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with UNETR++'s divisibility and memory estimate; records the patch in arch_kwargs."""

    network_class_name: ClassVar[str] = "nnssl.architectures.unetr_pp.UNETRpp"
    # UNETRppConfig field overrides (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnsslUNETRppPlans", **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name, **kwargs)

    def config(self, patch_size: Tuple[int, int, int]) -> UNETRppConfig:
        return UNETRppConfig(**{**self.arch_overrides, "img_size": tuple(patch_size)})

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        return config_to_kwargs(self.config(patch_size))

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        defaults = UNETRppConfig()
        return required_divisor(self.arch_overrides.get("stem_stride", defaults.stem_stride),
                                len(self.arch_overrides.get("dims", defaults.dims)))
