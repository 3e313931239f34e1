"""Experiment tracking of pretraining runs: Weights & Biases and TensorBoard (optional extras).

Switched on as in nnU-Net, so one setting covers ``nnssl_pretrain`` and ``nnssl_train`` (whose
trainer is nnU-Net's and logs through nnU-Net's own W&B logger):

- W&B: ``nnUNet_wandb_enabled=1``; project ``nnUNet_wandb_project`` (default ``nnunet``, as
  nnU-Net); mode ``nnUNet_wandb_mode`` if set, else wandb's own ``WANDB_MODE`` (``offline``
  writes the run under the output folder only). Files go to ``<output folder>/wandb/``; ``--c``
  resumes the same W&B run (its id is read back from ``wandb/latest-run``, as nnU-Net does).
- TensorBoard: ``nnssl_pretrain --tensorboard`` or ``nnssl_tensorboard=1``; event files go to
  ``<output folder>/tensorboard/``.

Logged per iteration (the W&B/TensorBoard step is the iteration index, 0-based): every scalar
loss term the method returns as ``loss/<term>``, ``lr`` and ``data_wait_s`` (time blocked on the
loader for that batch); per epoch, at its last iteration: ``epoch/time_s`` and
``epoch/data_wait_fraction``. Only rank 0 logs.
"""
import os
from typing import Dict, List, Optional

from nnssl.errors import NnsslError

WANDB_SWITCH, WANDB_PROJECT, WANDB_MODE = "nnUNet_wandb_enabled", "nnUNet_wandb_project", "nnUNet_wandb_mode"
TENSORBOARD_SWITCH = "nnssl_tensorboard"
WANDB_DIR, TENSORBOARD_DIR = "wandb", "tensorboard"


def switch_on(var: str) -> bool:
    """nnU-Net's reading of its logger switches: 1/true on, unset/0/false off, anything else refused."""
    value = os.getenv(var, "0")
    if value.lower() in ("0", "false"):
        return False
    if value.lower() in ("1", "true"):
        return True
    raise NnsslError(f"Environment variable {var}={value!r} is not 0/1 (or false/true); set {var}=1 to switch "
                     f"the logger on, unset it to switch it off.")


def wanted(tensorboard: bool = False) -> List[str]:
    """The trackers asked for (by the flag and the environment); NnsslError when one is not installed."""
    names = (["wandb"] if switch_on(WANDB_SWITCH) else []) + (
        ["tensorboard"] if tensorboard or switch_on(TENSORBOARD_SWITCH) else [])
    for name in names:
        try:
            __import__(name)
        except ImportError:
            how = f"{WANDB_SWITCH}=1" if name == "wandb" else f"--tensorboard / {TENSORBOARD_SWITCH}=1"
            raise NnsslError(f"{how} needs the '{name}' package, which is not installed: pip install {name} "
                             f"(or unset the switch).") from None
    return names


class WandbTracker:
    def __init__(self, folder: str, config: dict, resume: bool):
        import wandb

        run_id = None
        latest = os.path.join(folder, WANDB_DIR, "latest-run")
        if resume and os.path.isdir(latest):  # the run file is run-<id>.wandb
            run_id = next((f[4:-6] for f in os.listdir(latest) if f.startswith("run-") and f.endswith(".wandb")),
                          None)
        os.makedirs(os.path.join(folder, WANDB_DIR), exist_ok=True)
        self.run = wandb.init(project=os.getenv(WANDB_PROJECT, "nnunet"), dir=folder,
                              name=os.path.basename(folder), config=config, id=run_id,
                              resume="allow" if run_id else None, mode=os.getenv(WANDB_MODE) or None)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    def __init__(self, folder: str, config: dict, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(folder, TENSORBOARD_DIR))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class Trackers:
    """The trackers of one run (none when ``enabled`` is False, i.e. on ranks > 0)."""

    def __init__(self, names: List[str], folder: str, config: dict, resume: bool, enabled: bool = True):
        classes = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}
        self.trackers = [classes[n](folder, config, resume) for n in names] if enabled else []

    def iteration(self, it: int, losses: Dict[str, float], lr: float, data_wait: float) -> None:
        self._log({**{f"loss/{k}": v for k, v in losses.items()}, "lr": lr, "data_wait_s": data_wait}, it)

    def epoch(self, last_iteration: int, epoch_time: float, data_wait_fraction: float) -> None:
        self._log({"epoch/time_s": epoch_time, "epoch/data_wait_fraction": data_wait_fraction}, last_iteration)

    def _log(self, metrics: Dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

