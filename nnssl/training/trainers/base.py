"""Base of the fine-tuning trainers: nnU-Net's defaults plus the nnssl fine-tuning options.

Each class only overrides nnU-Net hooks (``initialize``, ``configure_optimizers``,
``on_train_epoch_start``, ``_get_deep_supervision_scales``); the training loop, data loading, checkpoints and the final
validation stay nnU-Net's. Class names are stable: nnU-Net stores the trainer name in
``checkpoint_final.pth`` and in the result folder name (``Trainer__Plans__config``) and finds the
class again by that name at prediction time. Stock nnU-Net finds these classes when
``nnUNet_extTrainer`` points at the folder of this file (see ``trainer_lookup.py``).

Fine-tuning options common to all nnssl trainers (:class:`FinetuneOptionsMixin`), set as
attributes after construction and before ``initialize()``:

- ``nnssl_warmup_epochs``: linear learning-rate warm-up, lr(e) = schedule(e) * (e + 1) / N for
  the first N epochs;
- ``nnssl_freeze_encoder_epochs``: the ``encoder.`` parameters get ``requires_grad=False`` for
  the first N epochs (their gradients stay ``None``, so neither SGD nor Adam moves them, weight
  decay included), then they train with the rest. BatchNorm running statistics in the encoder
  still update while frozen (the network stays in train mode, as nnU-Net runs it).
"""
from typing import List, Optional

import torch
from torch import nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.training.trainer_registry import TRAINERS, register_trainer  # noqa: F401


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


class LinearWarmupLR:
    """Wraps an nnU-Net epoch scheduler: ``step(epoch)`` runs the wrapped schedule, then scales
    every group's lr by ``(epoch + 1) / warmup_epochs`` while ``epoch < warmup_epochs``.

    The wrapped scheduler must set the lr from the epoch alone (nnU-Net's ``PolyLRScheduler``
    and :class:`EpochStepLR` do), so scaling its output never feeds back into later epochs;
    this is also what makes ``--c`` resume on the same schedule.
    """

    def __init__(self, inner, optimizer: torch.optim.Optimizer, warmup_epochs: int):
        self.inner = inner
        self.optimizer = optimizer
        self.warmup_epochs = int(warmup_epochs)

    def step(self, epoch: int) -> None:
        self.inner.step(epoch)
        if epoch < self.warmup_epochs:
            factor = (epoch + 1) / self.warmup_epochs
            for group in self.optimizer.param_groups:
                group["lr"] *= factor

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


class EpochStepLR:
    """lr(epoch) = initial_lr * gamma ** (epoch // step_epochs), set from the epoch alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, step_epochs: int, gamma: float = 0.5):
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.step_epochs = max(1, int(step_epochs))
        self.gamma = float(gamma)

    def step(self, epoch: int) -> None:
        lr = self.initial_lr * self.gamma ** (int(epoch) // self.step_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


class FinetuneOptionsMixin:
    """LR warm-up and frozen-encoder warm-up as hooks; put it before ``nnUNetTrainer`` in the bases."""

    nnssl_warmup_epochs: int = 0
    nnssl_freeze_encoder_epochs: int = 0
    _nnssl_encoder_frozen: Optional[bool] = None

    def initialize(self):
        super().initialize()
        # Wrapped here rather than in configure_optimizers so that it applies on top of whatever
        # optimizer/schedule a subclass configures.
        if self.nnssl_warmup_epochs > 0:
            self.lr_scheduler = LinearWarmupLR(self.lr_scheduler, self.optimizer, self.nnssl_warmup_epochs)

    def on_train_epoch_start(self):
        if self.nnssl_freeze_encoder_epochs > 0:
            self._set_encoder_frozen(self.current_epoch < self.nnssl_freeze_encoder_epochs)
        super().on_train_epoch_start()

    def _set_encoder_frozen(self, frozen: bool) -> None:
        if frozen == self._nnssl_encoder_frozen:
            return
        for p in unwrap_network(self.network).encoder.parameters():
            p.requires_grad_(not frozen)
        self._nnssl_encoder_frozen = frozen
        self.print_to_log_file(f"nnssl: encoder {'frozen' if frozen else 'unfrozen'} from epoch {self.current_epoch} "
                               f"(--freeze_encoder_epochs {self.nnssl_freeze_encoder_epochs})")


@register_trainer
class nnsslTrainer(FinetuneOptionsMixin, nnUNetTrainer):
    """nnU-Net's defaults (SGD, poly schedule, Dice+CE, deep supervision) plus the nnssl options.
    Fine-tuning trainer of ``plainconvunet`` and ``resenc``."""
