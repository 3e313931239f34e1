"""Learning curves of an nnU-Net training, read from its fold folder.

:func:`learning_curves` is the one parser the comparison report, the demo and the benchmarks
use. nnU-Net's logger (``nnUNetLogger`` / ``LocalLogger``) keeps, per epoch, ``train_losses``,
``val_losses``, ``mean_fg_dice`` (the validation pseudo Dice, mean over foreground classes),
``ema_fg_dice`` (its moving average), ``dice_per_class_or_region`` and ``lrs``; it is saved
under the checkpoint's ``logging`` key. Sources, first found wins:

1. ``checkpoint_final.pth`` (a finished training);
2. the text logs ``training_log_*.txt`` (a running or interrupted training: nnU-Net writes them
   every epoch, a new file per start, so the files are read oldest first and a later file's
   epochs replace an earlier one's; ``ema_fg_dice`` is recomputed with nnU-Net's 0.9 / 0.1 rule);
3. ``checkpoint_latest.pth`` (written every 50 epochs).

Checkpoints are opened with ``torch.load(weights_only=True)`` (numpy scalars allowed), so
reading curves never runs code from the file.

The x axis in iterations: the values of epoch ``e`` are logged at its end, after
``(e + 1) * iterations_per_epoch`` training iterations. ``iterations_per_epoch`` is the
argument, else ``num_iterations_per_epoch`` from nnU-Net's ``debug.json`` in the fold
folder, else nnssl's ``nnssl_training_options.json``, else nnU-Net's default 250.
"""
import glob
import json
import os
import re
from typing import Dict, List, Optional

import numpy as np

from nnssl.errors import NnsslError

CURVES = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs")
NNUNET_ITERATIONS_PER_EPOCH = 250  # nnUNetTrainer's default
EMA_KEEP = 0.9  # nnU-Net's moving average of the pseudo Dice: ema = 0.9 * ema + 0.1 * value
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan"
_LINE = re.compile(r"^[\d\-: .]+: (Epoch (?P<epoch>\d+)|(?P<key>train_loss|val_loss) (?P<value>\S+)|"
                   r"Pseudo dice (?P<dice>\[.*\])|Current learning rate: (?P<lr>\S+))\s*$")


def learning_curves(fold_folder: str, iterations_per_epoch: Optional[int] = None) -> Dict[str, object]:
    """Per-epoch curves of the training in ``fold_folder`` (nnU-Net's ``.../Trainer__Plans__config/fold_X``).

    Returns ``{"epoch": [0, 1, ...], "iteration": [(e + 1) * ipe, ...], "iterations_per_epoch": ipe,
    "source": path read, "dice_per_class_or_region": [[...], ...]}`` plus one list of floats per
    name in :data:`CURVES` (NaN where an epoch has no value), all as long as ``"epoch"``.
    Raises NnsslError naming the folder when it holds no curves.
    """
    folder = os.path.abspath(fold_folder)
    final, latest = os.path.join(folder, "checkpoint_final.pth"), os.path.join(folder, "checkpoint_latest.pth")
    logs = sorted(glob.glob(os.path.join(folder, "training_log_*.txt")), key=os.path.getmtime)
    if os.path.isfile(final):
        raw, source = _from_checkpoint(final), final
    elif logs:
        raw, source = _from_text_logs(logs), logs[-1]
    elif os.path.isfile(latest):
        raw, source = _from_checkpoint(latest), latest
    else:
        raise NnsslError(f"'{folder}' has no checkpoint_final.pth, training_log_*.txt or checkpoint_latest.pth, so "
                         f"it holds no learning curves; pass the fold folder of an nnU-Net training "
                         f"(.../Trainer__Plans__config/fold_X).")
    n = max((len(raw.get(k) or []) for k in CURVES), default=0)
    out: Dict[str, object] = {k: _padded(raw.get(k), n) for k in CURVES}
    out["dice_per_class_or_region"] = [list(map(float, d)) for d in (raw.get("dice_per_class_or_region") or [])]
    ipe = int(iterations_per_epoch or _iterations_per_epoch(folder))
    out.update(epoch=list(range(n)), iteration=[(e + 1) * ipe for e in range(n)], iterations_per_epoch=ipe,
               source=source)
    return out


def _padded(values, n: int) -> List[float]:
    values = [float(v) for v in (values or [])]
    return values + [float("nan")] * (n - len(values))


def _from_checkpoint(path: str) -> dict:
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which one
        raise NnsslError(f"Cannot read the learning curves from {path} ({type(e).__name__}: {str(e)[:200]}); "
                         f"the file is damaged or not an nnU-Net checkpoint.") from None
    logging = ckpt.get("logging") if isinstance(ckpt, dict) else None
    if not isinstance(logging, dict):
        raise NnsslError(f"{path} has no 'logging' entry (nnU-Net's logger); it is not an nnU-Net training "
                         f"checkpoint.")
    return logging


def _numpy_scalar_globals() -> list:
    """What a pickled numpy float32/float64 needs under weights_only loading (numpy 1 and 2 names)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def _from_text_logs(paths: List[str]) -> dict:
    per_epoch: Dict[int, dict] = {}
    for path in paths:
        epoch = None
        with open(path, errors="replace", encoding="utf-8") as f:
            for line in f:
                m = _LINE.match(line.rstrip("\n"))
                if not m:
                    continue
                if m["epoch"] is not None:
                    epoch = int(m["epoch"])
                    per_epoch[epoch] = {}
                elif epoch is None:
                    continue
                elif m["key"]:
                    per_epoch[epoch][m["key"] + "es"] = _number(m["value"])
                elif m["dice"]:
                    dice = [float(v) for v in re.findall(_NUMBER, re.sub(r"np\.float\d+\(", "(", m["dice"]))]
                    per_epoch[epoch]["dice_per_class_or_region"] = dice
                    per_epoch[epoch]["mean_fg_dice"] = float(np.nanmean(dice)) if dice else float("nan")
                else:
                    per_epoch[epoch]["lrs"] = _number(m["lr"])
    n = max(per_epoch) + 1 if per_epoch else 0
    out = {k: [per_epoch.get(e, {}).get(k, float("nan")) for e in range(n)]
           for k in ("train_losses", "val_losses", "mean_fg_dice", "lrs")}
    out["dice_per_class_or_region"] = [per_epoch.get(e, {}).get("dice_per_class_or_region", []) for e in range(n)]
    ema: List[float] = []
    for v in out["mean_fg_dice"]:
        ema.append(v if not ema or np.isnan(ema[-1]) else EMA_KEEP * ema[-1] + (1 - EMA_KEEP) * v)
    out["ema_fg_dice"] = ema
    return out


def _number(text: str) -> float:
    m = re.search(_NUMBER, re.sub(r"np\.float\d+\(", "(", text))
    return float(m.group(0)) if m else float("nan")


def _iterations_per_epoch(folder: str) -> int:
    for name, get in (("debug.json", lambda d: d.get("num_iterations_per_epoch")),
                      ("nnssl_training_options.json", lambda d: (d.get("options") or {}).get("iterations_per_epoch"))):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    value = get(json.load(f))
            except (OSError, ValueError, AttributeError):
                value = None
            if value not in (None, "None"):
                return int(value)
    return NNUNET_ITERATIONS_PER_EPOCH
