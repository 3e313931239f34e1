"""Fine-tuning trainer of ULKANet / LoGoNet and their large variants (Masked LoGoNet paper, Table 14).

``nnsslTrainer_LoGoNet``: AdamW (betas 0.9, 0.999; weight decay 1e-5), peak lr 1e-4, linear
warm-up then cosine annealing to 0, Dice + CE with equal weights (nnU-Net's ``DC_and_CE_loss``,
``weight_ce = weight_dice = 1``), no deep supervision. Everything else (data loading,
augmentation, checkpoints, validation) is nnU-Net's, through :class:`nnsslTrainer`.

Assumptions (the paper trains with MONAI for 5000 / 1000 epochs on 16 GPUs):
- nnU-Net's epoch length and count (1000 epochs of 250 iterations) stay; the warm-up is 5 % of
  the epochs (``WARMUP_FRACTION``), the paper's MSD setting (50 of 1000 epochs; BTCV: 100 of
  5000), at least one epoch and always shorter than the run (none in a 1-epoch run).
- Warm-up starts at lr / warmup epochs instead of MONAI's 0, so no epoch is wasted at lr 0
  (the same rule as ``nnssl.training.schedules``).
- The loss is nnU-Net's Dice+CE (soft Dice without background, smooth 1e-5) rather than MONAI's
  ``DiceCELoss``; both weigh Dice and CE 1:1, as the paper's Table 13 found best.
"""
import torch

from nnssl.training.schedules import LRSchedule
from nnssl.training.trainers.base import EpochLR, nnsslTrainer, register_trainer

LOGONET_INITIAL_LR = 1e-4
LOGONET_WEIGHT_DECAY = 1e-5
LOGONET_BETAS = (0.9, 0.999)
WARMUP_FRACTION = 0.05


class EpochWarmupCosineLR(EpochLR):
    """Linear warm-up over ``warmup_epochs``, then cosine to 0 at ``num_epochs`` (per epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int):
        super().__init__(optimizer)
        self.schedule = LRSchedule("cosine", float(initial_lr), int(num_epochs), int(warmup_epochs))

    def lr(self, epoch: int) -> float:
        return self.schedule.lr(epoch)


def warmup_epochs_for(num_epochs: int) -> int:
    """``WARMUP_FRACTION`` of the run, at least 1 epoch, at most ``num_epochs - 1``."""
    return min(max(1, round(WARMUP_FRACTION * num_epochs)), int(num_epochs) - 1)


@register_trainer
class nnsslTrainer_LoGoNet(nnsslTrainer):
    """ULKANet / LoGoNet fine-tuning: AdamW lr 1e-4, warm-up + cosine, Dice + CE 1:1, no deep supervision."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = LOGONET_INITIAL_LR
        self.weight_decay = LOGONET_WEIGHT_DECAY
        # The networks have one output; nnU-Net then builds the plain (unwrapped) Dice+CE loss.
        self.enable_deep_supervision = False

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, betas=LOGONET_BETAS,
                                      weight_decay=self.weight_decay)
        warmup = warmup_epochs_for(self.num_epochs)
        self.print_to_log_file(f"nnssl: AdamW lr {self.initial_lr}, linear warm-up over {warmup} epochs, then cosine "
                               f"to 0 at epoch {self.num_epochs}")
        return optimizer, EpochWarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)

