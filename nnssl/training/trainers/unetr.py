"""Fine-tuning trainers of UNETR and UNETR++ (LWI paper 003, SPEC §7.5).

``nnsslTrainer_UNETR``: AdamW (weight decay 1e-5), lr 1e-4, linear warm-up then cosine, Dice + CE,
no deep supervision: UNETR's recipe, which is the LoGoNet trainer's (``logonet.py``, whose
scheduler and warm-up rule it reuses unchanged).

``nnsslTrainer_UNETRpp``: nnU-Net's own schedule (SGD, Nesterov momentum 0.99, lr 1e-2, poly
decay, weight decay 3e-5; the UNETR++ paper trains with it), Dice + CE with deep supervision over
UNETR++'s three outputs at the scales of its own strides (full, 1/(2, 4, 4), 1/(4, 8, 8) for the
default stem), not the plans' ``pool_op_kernel_sizes`` (those describe nnU-Net's U-Net).
Assumption: the three outputs are weighted 1, 1/2, 1/4 (normalised to sum 1; ``ds_weights``);
nnU-Net's own rule would give the coarsest output weight 0, so only two would be supervised.

Both networks have weights tied to the token count (position embeddings; UNETR++ also its spatial
projections), so both refuse to start when the plans' patch differs from the one the network was
planned for (``img_size`` in the arch_kwargs), e.g. after a hand-edited ``patch_size``.
"""
from typing import Tuple

import numpy as np

from nnssl.errors import NnsslError
from nnssl.training.trainers.base import nnsslTrainer, register_trainer
from nnssl.training.trainers.logonet import nnsslTrainer_LoGoNet


class FixedPatchMixin:
    """Refuses (NnsslError) plans whose ``patch_size`` is not the network's ``img_size``."""

    def initialize(self):
        cm = self.configuration_manager
        planned = tuple(int(s) for s in cm.network_arch_init_kwargs.get("img_size", cm.patch_size))
        if tuple(int(p) for p in cm.patch_size) != planned:
            raise NnsslError(
                f"{type(self).__name__}: the plans' patch_size {list(cm.patch_size)} differs from the patch the "
                f"network was planned for (arch_kwargs img_size {list(planned)}): its position embeddings are sized "
                f"for that token grid, so training, validation and prediction must use it. Restore patch_size "
                f"{list(planned)} in the plans, or re-plan (nnssl_plan_and_preprocess) and pretrain again.")
        super().initialize()


@register_trainer
class nnsslTrainer_UNETR(FixedPatchMixin, nnsslTrainer_LoGoNet):
    """UNETR fine-tuning: AdamW lr 1e-4 (weight decay 1e-5), warm-up + cosine, Dice + CE, no deep supervision."""


@register_trainer
class nnsslTrainer_UNETRpp(FixedPatchMixin, nnsslTrainer):
    """UNETR++ fine-tuning: nnU-Net's SGD + poly schedule, Dice + CE deep-supervised on its three outputs."""

    ds_weights: Tuple[float, ...] = (1.0, 0.5, 0.25)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        from nnssl.architectures.unetr_pp import UNETRppConfig, deep_supervision_scales

        return deep_supervision_scales(UNETRppConfig(**self.configuration_manager.network_arch_init_kwargs))

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            weights = np.asarray(self.ds_weights, dtype=np.float64)
            loss.weight_factors = tuple(weights / weights.sum())
        return loss
