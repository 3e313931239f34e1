"""Volume Fusion (MIS-FM, paper 004): a pseudo-segmentation pretext task.

Each crop (background) is fused with the next crop of the batch (foreground) through a
random map of boxes with fusion coefficients α ∈ {0, 1/K, ..., 1}; the network segments the
K + 1 coefficient classes with ½(Dice + CE). Encoder and decoder are both pretrained; only the
output layer is replaced at fine-tuning. The fusion itself lives in
:mod:`nnssl.transforms.volume_fusion`.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, SSLMethod
from nnssl.transforms.volume_fusion import volume_fusion_batch


@dataclass
class VolumeFusionConfig:
    """Paper defaults (MIS-FM §4.2); override with ``--set key=value``."""

    K: int = 4  # non-zero fusion classes; the network segments K + 1 classes
    min_boxes: int = 10  # M ~ U{min_boxes..max_boxes}
    max_boxes: int = 40
    box_size_min: Tuple[int, int, int] = (8, 8, 8)  # (D, H, W) for reference_patch, inclusive
    box_size_max: Tuple[int, int, int] = (40, 80, 80)
    reference_patch: Tuple[int, int, int] = (64, 128, 128)  # box ranges scale with patch / this
    weight_dice: float = 0.5  # L = ½(L_dice + L_ce), eq. 2
    weight_ce: float = 0.5
    # Assumption: the paper does not say whether Dice is computed per sample or over the
    # batch; batch Dice (nnU-Net's 3d default) is stabler with small boxes of a rare class.
    batch_dice: bool = True
    # Pretraining schedule (paper: Adam, lr 1e-3, wd 1e-5, batch 4, lr halved every 20k-50k).
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_schedule: str = "step"
    lr_step_iterations: int = 20000  # PData-1k setting; 40k / 50k for the larger sets
    lr_gamma: float = 0.5
    batch_size: int = 4

    def __post_init__(self):
        for name in ("box_size_min", "box_size_max", "reference_patch"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 1:
                raise NnsslError(f"volume_fusion: {name}={value} must be three positive integers (D, H, W); "
                                 f"fix it with --set {name}=D,H,W.")
            setattr(self, name, value)
        if not 1 <= self.K <= 255:
            raise NnsslError(f"volume_fusion: K={self.K} must be in 1..255 (the label map is uint8; the paper "
                             "uses K=4); fix it with --set K=4.")
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise NnsslError(f"volume_fusion: need 0 <= min_boxes <= max_boxes, got {self.min_boxes} and "
                             f"{self.max_boxes}; fix them with --set min_boxes=10 --set max_boxes=40.")
        if any(a > b for a, b in zip(self.box_size_min, self.box_size_max)):
            raise NnsslError(f"volume_fusion: box_size_min={self.box_size_min} exceeds box_size_max="
                             f"{self.box_size_max} on some axis; fix them with --set.")


@METHODS.register("volume_fusion")
class VolumeFusion(SSLMethod):
    """Batch: ``data`` [B, C, D, H, W] float32 (fused crops), ``target`` [B, 1, D, H, W] uint8
    (class k ⇔ α = k / K). The target stays uint8 to keep worker → device traffic 8x smaller;
    nnU-Net's losses cast it to long themselves."""

    name = "volume_fusion"
    config_class = VolumeFusionConfig
    transfer = "encoder+decoder"
    min_batch_size = 2

    def __init__(self, cfg: VolumeFusionConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        # Dice over all K + 1 classes, background included: eq. 3 sums c = 0..C-1 (and class 0
        # is a real pretext class here, not "nothing"). ddp=False: batch Dice per rank (Assumption:
        # the paper does not say how its 2-GPU runs reduce the Dice; per rank needs no all-gather).
        self.loss = DC_and_CE_loss(
            {"batch_dice": cfg.batch_dice, "smooth": 1e-5, "do_bg": True, "ddp": False}, {},
            weight_ce=cfg.weight_ce, weight_dice=cfg.weight_dice, dice_class=MemoryEfficientSoftDiceLoss)

    @classmethod
    def network_output_channels(cls, cfg: VolumeFusionConfig) -> int:
        return cfg.K + 1

    @classmethod
    def make_batch(cls, cfg: VolumeFusionConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, D, H, W] float32 normalized crops, B >= 2 -> {"data", "target"} (meta unused)."""
        if images.ndim != 5:
            raise NnsslError(f"volume_fusion works on 3D crops [B, C, D, H, W]; got an array of shape "
                             f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
        fused, labels = volume_fusion_batch(images, rng, cfg)
        return {"data": torch.from_numpy(fused), "target": torch.from_numpy(labels)}

    @classmethod
    def preview(cls, cfg: VolumeFusionConfig, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Sample 0, channel 0: the fused input [D, H, W] and its label map [D, H, W]."""
        return [("fused input", batch["data"][0, 0].detach().cpu().numpy()),
                ("label map (k = α·K)", batch["target"][0, 0].detach().cpu().numpy())]

    @classmethod
    def preview_from_images(cls, cfg: VolumeFusionConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Like :meth:`preview` but from the raw crops [B, C, D, H, W], so the mosaic can also show
        the background (sample 0) and foreground (sample 1) that were fused; same draws as
        :meth:`make_batch` for the same rng state."""
        batch = cls.make_batch(cfg, images, rng)
        return [("background", np.asarray(images[0, 0])), ("foreground", np.asarray(images[1, 0]))] + \
            cls.preview(cfg, batch)

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"ce", "dice", "loss"}: loss = weight_ce·CE + weight_dice·(1 − soft Dice).

        With deep supervision on, only the full-resolution output is used (Assumption: Algorithm 1
        has one loss on the prediction; the lower-resolution heads are not trained in pretraining).
        The Dice term is 1 + nnU-Net's (negative) soft Dice, as in eq. 3, so a perfect
        prediction gives a loss near 0.
        """
        out = network(batch["data"])
        if isinstance(out, (list, tuple)):
            out = out[0]
        target = batch["target"]
        ce = self.loss.ce(out, target[:, 0])
        dice = 1 + self.loss.dc(out, target)
        loss = self.loss.weight_ce * ce + self.loss.weight_dice * dice
        return {"ce": ce, "dice": dice, "loss": loss}
