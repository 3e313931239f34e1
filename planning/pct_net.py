"""Planner for PCT-Net (MIS-FM): writes ``nnsslPCTNetPlans.json``.

The patch must be divisible by the network's total pooling (``required_divisor``): (8, 16, 16)
with the anisotropic embedding, (16, 16, 16) with the isotropic one. The window size adds no
constraint (window attention pads). Every PCT-Net hyper-parameter is written into the plans'
``arch_kwargs``, so a plans file keeps building the same network if defaults ever change.
"""
from dataclasses import asdict
from typing import ClassVar, Dict, Tuple

from nnssl.architectures.pct_net import PCTNetConfig, required_divisor
from nnssl.planning.planners import nnsslArchitecturePlanner

# Assumption: "thick slices" means the largest spacing is more than twice the smallest;
# the paper uses the anisotropic (2D first level) embedding for such CT.
ANISO_RATIO = 2.0


def choose_embedding(spacing: Tuple[float, float, float]) -> str:
    """'aniso' when axis 0 (where nnU-Net's transpose puts the largest spacing) is more than
    ANISO_RATIO x the finest spacing, else 'iso' (the 2D level only makes sense when the
    thick axis is the first one)."""
    thick = spacing[0] == max(spacing) and max(spacing) > ANISO_RATIO * min(spacing)
    return "aniso" if thick else "iso"


class PCTNetPlanner(nnsslArchitecturePlanner):
    """nnU-Net planning with PCT-Net's divisibility, memory estimate and embedding choice."""

    network_class_name: ClassVar[str] = "nnssl.architectures.pct_net.PCTNet"
    # PCTNetConfig field overrides (e.g. smaller widths); presets set this attribute.
    arch_overrides: Dict[str, object] = {}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnsslPCTNetPlans", **kwargs):
        # The registered plans name, also when the planner is built directly.
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name, **kwargs)

    def _config(self, spacing) -> PCTNetConfig:
        kwargs = {"embedding": choose_embedding(spacing), **self.arch_overrides}
        return PCTNetConfig(**kwargs)

    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        # JSON-friendly (lists, not tuples), as nnU-Net will read them back.
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self._config(spacing)).items()}

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        cfg = self._config(spacing)
        return required_divisor(cfg.embedding, len(cfg.channels) - 2)
