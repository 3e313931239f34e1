"""PCT-Net fine-tuning trainer (MIS-FM, paper 004)."""
import math

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.training.trainers.base import EpochStepLR, FinetuneOptionsMixin, register_trainer

# MIS-FM (paper 004) fine-tuning: Adam lr 1e-3 halved every 5k iterations, 30k iterations, Dice+CE.
PCT_INITIAL_LR = 1e-3
PCT_HALVE_EVERY_ITERATIONS = 5000
PCT_TOTAL_ITERATIONS = 30000
# The halving period as a share of the run (5k of 30k), so that any --epochs gets the paper's five
# halvings at 1/6, 2/6, ... of the run.
PCT_HALVE_FRACTION = PCT_HALVE_EVERY_ITERATIONS / PCT_TOTAL_ITERATIONS
# Assumption: the paper gives no fine-tuning weight decay; use its pretraining value.
PCT_WEIGHT_DECAY = 1e-5


@register_trainer
class nnsslTrainer_PCTNet(FinetuneOptionsMixin, nnUNetTrainer):
    """PCT-Net fine-tuning: Adam, lr 1e-3 halved every 5k iterations, Dice+CE with deep
    supervision over all four outputs weighted 1, 1/2, 1/4, 1/8 (normalised), as the authors do
    (nnU-Net's own weights give the coarsest output 0).

    Iterations -> epochs: nnU-Net schedules per epoch; the default length is 30k iterations = 120
    epochs of nnU-Net's 250 iterations, and the lr is halved every 1/6 of ``num_epochs`` (every 20
    epochs by default; every 10 / 6 epochs with ``--epochs 10``), the paper's shape at any length.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = PCT_INITIAL_LR
        self.weight_decay = PCT_WEIGHT_DECAY
        self.num_epochs = math.ceil(PCT_TOTAL_ITERATIONS / self.num_iterations_per_epoch)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        step_epochs = PCT_HALVE_FRACTION * self.num_epochs
        self.print_to_log_file(f"nnssl: Adam lr {self.initial_lr} halved every {step_epochs:.4g} epochs "
                               f"({PCT_HALVE_FRACTION:.4g} of the {self.num_epochs} epochs)")
        return optimizer, EpochStepLR(optimizer, self.initial_lr, step_epochs, gamma=0.5)

    def _build_loss(self):
        """nnU-Net's Dice+CE (and DeepSupervisionWrapper); with deep supervision the weights become
        2^-i over all outputs, normalised: (8, 4, 2, 1) / 15 for PCT-Net's four."""
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            weights = 0.5 ** np.arange(len(self._get_deep_supervision_scales()))
            loss.weight_factors = tuple(float(w) for w in weights / weights.sum())
        return loss

    def _get_deep_supervision_scales(self):
        """Scales of PCT-Net's outputs (full, 1/2, 1/4, 1/8 per axis) from its own pooling
        (the embedding's first pool is 1x2x2), so the targets match whatever the plans'
        ``pool_op_kernel_sizes`` say."""
        if not self.enable_deep_supervision:
            return None
        from nnssl.architectures.pct_net import PCTNetConfig

        pools = PCTNetConfig(**self.configuration_manager.network_arch_init_kwargs).pools
        return [list(s) for s in 1 / np.cumprod(np.vstack(pools), axis=0)][:-1]
