"""Fine-tuning trainers of QT-UNet T / S / B (paper 001, Table 5; SPEC §7.3).

``nnsslTrainer_QTUNet``: Adam, lr 4e-4, cosine annealing to 0 over the run, Dice loss (the
paper's), no deep supervision (QT-UNet has one output). ``nnsslTrainer_QTUNet_DiceCE``: the same
with nnU-Net's Dice + CE (the option; pick it with ``-tr nnsslTrainer_QTUNet_DiceCE``). Data
loading, augmentation, sliding-window validation (overlap 0.5, as the paper) and checkpoints
stay nnU-Net's.

Table 5 of the paper's text extraction reads "0.4 x 10^-4" and a drop path of "02"; SPEC §7.3 (checked
against the authors' code) gives lr 4e-4 and stochastic depth 0.1, which are used here.

Assumptions:
- nnU-Net's epoch length and count (1000 x 250 iterations) replace the paper's 350 epochs of
  batch 1 (a dataset-size-dependent length); ``--epochs`` changes it and the cosine follows.
- No weight decay: Table 5 lists none (torch's Adam default, 0).
- The Dice loss is nnU-Net's soft Dice (``nnUNetTrainerDiceLoss``: batch Dice as planned, no
  background, smooth 1e-5) rather than MONAI's ``DiceLoss``.
"""
import torch
from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceLoss

from nnssl.training.trainers.base import nnsslTrainer, register_trainer
from nnssl.training.trainers.logonet import EpochWarmupCosineLR

QTUNET_INITIAL_LR = 4e-4
QTUNET_WEIGHT_DECAY = 0.0


@register_trainer
class nnsslTrainer_QTUNet_DiceCE(nnsslTrainer):
    """QT-UNet fine-tuning: Adam lr 4e-4, cosine annealing to 0, nnU-Net's Dice + CE, no deep supervision."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = QTUNET_INITIAL_LR
        self.weight_decay = QTUNET_WEIGHT_DECAY
        self.enable_deep_supervision = False  # one output; nnU-Net then builds the unwrapped loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        self.print_to_log_file(f"nnssl: Adam lr {self.initial_lr}, cosine annealing to 0 at epoch {self.num_epochs}")
        return optimizer, EpochWarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, 0)


@register_trainer
class nnsslTrainer_QTUNet(nnsslTrainer_QTUNet_DiceCE, nnUNetTrainerDiceLoss):
    """QT-UNet fine-tuning as in the paper: the same optimizer and schedule, Dice loss only
    (``_build_loss`` of nnU-Net's ``nnUNetTrainerDiceLoss``)."""
