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
  the first N epochs; refused unless N < ``num_epochs`` (``--warmup_epochs`` / ``--epochs``);
- ``nnssl_freeze_encoder_epochs``: for the first N epochs the ``encoder.`` parameters do not
  move: just before every optimizer step (an optimizer step pre-hook) their gradients are set to
  ``None``, so neither SGD nor Adam touches them (no weight decay, no momentum or moment updates),
  then they train with the rest. ``requires_grad`` never changes: DDP (``torchrun``) builds its
  gradient reduction once for the parameters that require grad, and changing that set after
  wrapping breaks it; so the encoder's gradients are still computed and all-reduced while frozen,
  and nnU-Net's gradient clipping (before the step) sees them in its total norm. BatchNorm running
  statistics in the encoder still update while frozen (the network stays in train mode, as
  nnU-Net runs it). Works for every architecture: it only needs ``network.encoder``;
- ``nnssl_cpu_autocast``: on the CPU, training and validation steps run under ``torch.autocast``
  with this dtype (bf16; set from ``--cpu_precision`` by ``nnssl.devices.cpu_autocast_dtype``),
  the CPU counterpart of the fp16 AMP nnU-Net uses on CUDA. The network's outputs are cast back
  to float32 (a forward hook), so the loss, the pseudo Dice and everything after the network are
  computed in float32; weights, optimizer state and checkpoints stay float32.
"""
import contextlib
import math
from typing import List, Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.checkpoints import unwrap_network  # noqa: F401  (the one copy; trainers import it from here)
from nnssl.errors import NnsslError
from nnssl.training.schedules import format_lr_summary, summarize_lrs
from nnssl.training.trainer_registry import TRAINERS, register_trainer  # noqa: F401


class EpochLR:
    """Base of nnssl's nnU-Net-style epoch schedulers: ``step(epoch)`` sets every parameter group's
    lr to ``lr(epoch)``, a function of the epoch alone, so a resumed run (``--c``) and the
    :class:`LinearWarmupLR` wrapper see the same values as an uninterrupted one."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def lr(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self, epoch: int) -> None:
        lr = self.lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


class LinearWarmupLR(EpochLR):
    """Wraps an nnU-Net epoch scheduler: ``step(epoch)`` runs the wrapped schedule, then scales
    every group's lr by ``(epoch + 1) / warmup_epochs`` while ``epoch < warmup_epochs``.

    The wrapped scheduler must set the lr from the epoch alone (nnU-Net's ``PolyLRScheduler``
    and :class:`EpochStepLR` do), so scaling its output never feeds back into later epochs;
    this is also what makes ``--c`` resume on the same schedule.
    """

    def __init__(self, inner, optimizer: torch.optim.Optimizer, warmup_epochs: int):
        super().__init__(optimizer)
        self.inner = inner
        self.warmup_epochs = int(warmup_epochs)

    def step(self, epoch: int) -> None:  # scales per group: the wrapped schedule may set several lrs
        self.inner.step(epoch)
        if epoch < self.warmup_epochs:
            factor = (epoch + 1) / self.warmup_epochs
            for group in self.optimizer.param_groups:
                group["lr"] *= factor


class EpochStepLR(EpochLR):
    """lr(epoch) = initial_lr * gamma ** floor(epoch / step_epochs), set from the epoch alone.

    ``step_epochs`` may be fractional (a share of a short run, e.g. 10 epochs / 6), so the lr is
    lowered at the same fractions of the run whatever ``--epochs`` is."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, step_epochs: float, gamma: float = 0.5):
        if step_epochs <= 0:
            raise ValueError(f"step_epochs must be > 0, got {step_epochs}")
        super().__init__(optimizer)
        self.initial_lr = float(initial_lr)
        self.step_epochs = float(step_epochs)
        self.gamma = float(gamma)

    def lr(self, epoch: int) -> float:
        # + 1e-9: epoch / step_epochs of an exact boundary (e.g. 20 / (120 / 6)) must not round below it
        return self.initial_lr * self.gamma ** math.floor(int(epoch) / self.step_epochs + 1e-9)


def epoch_lrs(trainer) -> List[float]:
    """The lr of every epoch of ``trainer``'s run (first parameter group), read by stepping its
    scheduler through the epochs; it is left at the trainer's current epoch. Valid for schedulers
    that set the lr from the epoch alone, as every nnssl scheduler and nnU-Net's poly do."""
    lrs = []
    for epoch in range(trainer.num_epochs):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.lr_scheduler.step(min(trainer.current_epoch, trainer.num_epochs - 1))
    return lrs


class FinetuneOptionsMixin:
    """LR warm-up and frozen-encoder warm-up as hooks; put it before ``nnUNetTrainer`` in the bases."""

    nnssl_warmup_epochs: int = 0
    nnssl_freeze_encoder_epochs: int = 0
    nnssl_cpu_autocast: Optional[torch.dtype] = None
    _nnssl_encoder_frozen: Optional[bool] = None

    def initialize(self):
        if self.nnssl_warmup_epochs > 0 and self.nnssl_warmup_epochs >= self.num_epochs:
            raise NnsslError(f"--warmup_epochs {self.nnssl_warmup_epochs} is not shorter than the run (--epochs "
                             f"{self.num_epochs}), so the lr would never reach its peak. Lower --warmup_epochs "
                             f"or raise --epochs.")
        super().initialize()
        # Wrapped here rather than in configure_optimizers so that it applies on top of whatever
        # optimizer/schedule a subclass configures.
        if self.nnssl_warmup_epochs > 0:
            self.lr_scheduler = LinearWarmupLR(self.lr_scheduler, self.optimizer, self.nnssl_warmup_epochs)
        self.print_to_log_file("nnssl: lr schedule (the lr at the start of each epoch): "
                               + format_lr_summary(summarize_lrs(epoch_lrs(self)), "epoch"))
        if self.nnssl_freeze_encoder_epochs > 0:
            self._nnssl_install_encoder_freeze()
        if self._nnssl_autocast_on():
            self.network.register_forward_hook(_outputs_to_float32)
            self.print_to_log_file(f"nnssl: CPU mixed precision, {self.nnssl_cpu_autocast} autocast in the training "
                                   f"and validation steps (--cpu_precision fp32 turns it off)")

    def _nnssl_autocast_on(self) -> bool:
        return self.nnssl_cpu_autocast is not None and self.device.type == "cpu"

    def _nnssl_autocast(self):
        if not self._nnssl_autocast_on():
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.nnssl_cpu_autocast)

    def train_step(self, batch: dict) -> dict:
        with self._nnssl_autocast():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._nnssl_autocast():
            return super().validation_step(batch)

    def on_train_epoch_start(self):
        if self.nnssl_freeze_encoder_epochs > 0:
            self._set_encoder_frozen(self.current_epoch < self.nnssl_freeze_encoder_epochs)
        super().on_train_epoch_start()

    def _set_encoder_frozen(self, frozen: bool) -> None:
        if frozen == self._nnssl_encoder_frozen:
            return
        self._nnssl_encoder_frozen = frozen
        self.print_to_log_file(f"nnssl: encoder {'frozen' if frozen else 'unfrozen'} from epoch {self.current_epoch} "
                               f"(--freeze_encoder_epochs {self.nnssl_freeze_encoder_epochs})")

    def _nnssl_install_encoder_freeze(self) -> None:
        """Register the step pre-hook on ``self.optimizer`` (once, after the optimizer exists)."""
        self.optimizer.register_step_pre_hook(self._nnssl_drop_frozen_gradients)

    def _nnssl_drop_frozen_gradients(self, optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook: while frozen, the encoder has no gradient for this step."""
        if self._nnssl_encoder_frozen:
            for p in unwrap_network(self.network).encoder.parameters():
                p.grad = None


def _outputs_to_float32(module, args, output):
    """Forward hook: the network's output (a tensor or nnU-Net's deep-supervision list) as float32."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() for o in output)
    return output.float()


@register_trainer
class nnsslTrainer(FinetuneOptionsMixin, nnUNetTrainer):
    """nnU-Net's defaults (SGD, poly schedule, Dice+CE, deep supervision) plus the nnssl options.
    Fine-tuning trainer of ``plainconvunet`` and ``resenc``."""
