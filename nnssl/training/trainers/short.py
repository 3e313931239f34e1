"""Short-budget fine-tuning recipe: ``nnsslTrainer_Short`` (``-tr nnsslTrainer_Short``).

nnU-Net's recipe (SGD lr 1e-2, momentum 0.99, poly over 1000 x 250 iterations) is made for
250k iterations; in a run of a few hundred it barely leaves the background class (measured on
the demo data, issue 9: test mean Dice 0.06 after 600 iterations). This trainer keeps
everything else of nnU-Net (data, augmentation, Dice+CE with deep supervision, checkpoints,
validation) and replaces the optimizer and the schedule with :class:`ShortRecipe`:

- AdamW, the learning rate set before **every iteration** (not per epoch) from
  ``nnssl.training.schedules.LRSchedule``: linear warm-up over ``warmup_fraction`` of the
  run, then ``decay`` ("poly" = nnU-Net's exponent 0.9, or "cosine") to 0 at the last
  iteration. The lr is a function of the iteration index alone, so ``--c`` resumes on the
  same curve;
- three parameter groups, ``encoder``, ``decoder`` (without the output convolutions) and
  ``heads`` (``decoder.seg_layers``, always fresh). After pretrained weights are injected
  (``nnssl_on_pretrained``, called by ``nnssl.training.finetune.train``), a group whose
  parameters were all loaded gets ``pretrained_lr_scale`` times the lr (the "lower learning
  rate for transferred layers" of the SSL fine-tuning literature); from scratch every group
  runs at the full lr;
- ``--warmup_epochs N`` sets the warm-up to N epochs of iterations (instead of wrapping the
  schedule per epoch as the other nnssl trainers do); ``--freeze_encoder_epochs`` works as in
  every nnssl trainer.

How the values were chosen (scratch, 6 labeled synthetic cases, 3 test cases, tiny
plainconvunet, one seed; CPU shared with other jobs, load 11-16):

- issue 9, demo data 32x64x64, 600 iterations: nnU-Net's SGD recipe 0.061 test mean Dice (liver
  only); Adam lr 1e-3 constant 0.226;
- ``benchmarks/bench_short_recipe.py --shape 16 32 32 --epochs 10 --iterations_per_epoch 20``
  (200 iterations, this recipe with the given peak lr): training loss after epoch 3 / 10 and
  validation pseudo Dice (mean of 13 classes) after epoch 10: lr 1e-3: 1.62 / (stopped);
  lr 3e-3: 0.72 / 0.27, 0.044; lr 1e-2: 0.16 / 0.059, 0.065; test Dice 0.064 (3e-3) and
  0.065 (1e-2), liver 0.83-0.84, nothing else yet at that size and length. The highest lr
  trained fastest without instability, so it is the default.

``pretrained_lr_scale`` stays 1 (the same recipe for scratch and pretrained starts, which is
what ``nnssl_benchmark_ssl`` compares); lower it to protect transferred layers.

Use this trainer for runs of a few hundred to a few thousand iterations (demos,
``nnssl_benchmark_ssl``, quick experiments); for real training keep nnU-Net's recipe
(``nnsslTrainer``, the default).
"""
from dataclasses import dataclass
from typing import Dict, List

import torch

from nnssl.checkpoints import is_output_head
from nnssl.training.schedules import LRSchedule
from nnssl.training.trainers.base import nnsslTrainer, register_trainer, unwrap_network

GROUPS = ("encoder", "decoder", "heads")


@dataclass(frozen=True)
class ShortRecipe:
    lr: float = 1e-2  # peak lr, measured (module docstring)
    weight_decay: float = 3e-5  # Assumption: nnU-Net's own weight decay
    betas: tuple = (0.9, 0.999)
    warmup_fraction: float = 0.05  # Assumption: the 5 % of Masked LoGoNet's fine-tuning (50 of 1000 epochs)
    decay: str = "poly"  # "poly" | "cosine"
    pretrained_lr_scale: float = 1.0  # lr factor of fully transferred groups (1 = same lr as the fresh ones)
    # nnU-Net redraws progress.png after every epoch (~1 s on 2 busy cores, 5-10 % of a 20-iteration
    # epoch); here every N epochs and after the last one.
    plot_every_epochs: int = 5


RECIPE = ShortRecipe()


def parameter_groups(network: torch.nn.Module) -> Dict[str, List[torch.nn.Parameter]]:
    """{'encoder': [...], 'decoder': [...], 'heads': [...]}, each tensor once.

    nnU-Net's decoder holds a reference to the encoder (``decoder.encoder.*``), so a parameter
    is put in the group of the first name ``named_parameters`` gives it (which de-duplicates).
    """
    groups = {g: [] for g in GROUPS}
    for name, p in unwrap_network(network).named_parameters():
        if is_output_head(name):
            groups["heads"].append(p)
        elif name.startswith("encoder."):
            groups["encoder"].append(p)
        else:
            groups["decoder"].append(p)
    return groups


def transferred_groups(network: torch.nn.Module, loaded_names) -> List[str]:
    """Groups whose every parameter is in ``loaded_names`` (tensor names the injection loaded)."""
    loaded = set(loaded_names)
    names = {id(p): n for n, p in unwrap_network(network).named_parameters()}
    return [g for g, params in parameter_groups(network).items()
            if params and all(names[id(p)] in loaded for p in params)]


class IterationLR:
    """Sets each group's lr to ``schedule.lr(iteration) * group['lr_scale']``.

    ``step(epoch)`` (what nnU-Net calls at the start of an epoch) sets the lr of the epoch's
    first iteration; the trainer calls :meth:`set_iteration` before every training step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, iterations_per_epoch: int):
        self.optimizer = optimizer
        self.schedule = schedule
        self.iterations_per_epoch = int(iterations_per_epoch)

    def set_iteration(self, iteration: int) -> None:
        lr = self.schedule.lr(min(iteration, self.schedule.total_iterations - 1))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def step(self, epoch: int) -> None:
        self.set_iteration(int(epoch) * self.iterations_per_epoch)

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


@register_trainer
class nnsslTrainer_Short(nnsslTrainer):
    """AdamW with per-iteration warm-up + poly decay and per-group lrs (:class:`ShortRecipe`)."""

    recipe: ShortRecipe = RECIPE

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.recipe.lr
        self.weight_decay = self.recipe.weight_decay
        self._nnssl_step_in_epoch = 0

    def initialize(self):
        # The warm-up is ours (per iteration); keep the mixin from also wrapping it per epoch.
        warmup_epochs, self.nnssl_warmup_epochs = self.nnssl_warmup_epochs, 0
        self._nnssl_warmup_epochs_asked = warmup_epochs
        try:
            super().initialize()
        finally:
            self.nnssl_warmup_epochs = warmup_epochs

    def warmup_iterations(self) -> int:
        total = self.num_epochs * self.num_iterations_per_epoch
        asked = getattr(self, "_nnssl_warmup_epochs_asked", self.nnssl_warmup_epochs)
        if asked:
            return min(total - 1, int(asked) * self.num_iterations_per_epoch)
        return min(total - 1, max(1, round(self.recipe.warmup_fraction * total)))  # a 1-iteration run: none

    def configure_optimizers(self):
        r = self.recipe
        groups = [{"params": params, "name": name, "lr_scale": 1.0}
                  for name, params in parameter_groups(self.network).items() if params]
        optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
        total = self.num_epochs * self.num_iterations_per_epoch
        schedule = LRSchedule(r.decay, r.lr, total, self.warmup_iterations())
        self.print_to_log_file(f"nnssl: short recipe (AdamW, weight decay {r.weight_decay}, lr set every "
                               f"iteration): {schedule.describe()}")
        return optimizer, IterationLR(optimizer, schedule, self.num_iterations_per_epoch)

    def nnssl_on_pretrained(self, report) -> None:
        """Called after weight injection: fully transferred groups get ``pretrained_lr_scale``."""
        if self.recipe.pretrained_lr_scale == 1.0:
            return
        moved = transferred_groups(self.network, report.keys("loaded"))
        for group in self.optimizer.param_groups:
            if group["name"] in moved:
                group["lr_scale"] = self.recipe.pretrained_lr_scale
        self.print_to_log_file(f"nnssl: lr x {self.recipe.pretrained_lr_scale} for the transferred groups {moved}")

    def on_epoch_end(self):
        last = self.current_epoch == self.num_epochs - 1
        if not last and (self.current_epoch + 1) % max(1, self.recipe.plot_every_epochs):
            self.logger.plot_progress_png = lambda *args, **kwargs: None  # this epoch only (instance attribute)
        try:
            super().on_epoch_end()
        finally:
            self.logger.__dict__.pop("plot_progress_png", None)

    def on_train_epoch_start(self):
        self._nnssl_step_in_epoch = 0
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        self.lr_scheduler.set_iteration(self.current_epoch * self.num_iterations_per_epoch + self._nnssl_step_in_epoch)
        self._nnssl_step_in_epoch += 1
        return super().train_step(batch)
