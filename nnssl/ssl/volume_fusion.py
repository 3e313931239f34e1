"""Volume Fusion (MIS-FM, paper 004): a pseudo-segmentation pretext task.

Each crop (background) is fused with the next crop of the batch (foreground) through a
random map of boxes with fusion coefficients α ∈ {0, 1/K, ..., 1}; the network segments the
K + 1 coefficient classes with ½(Dice + CE). The two crops always come from different scans
(:meth:`VolumeFusion.draw_cases`), each is flipped at random along every axis first, and voxels
where either crop is padding carry no loss. Encoder and decoder are both pretrained; only the
output layer is replaced at fine-tuning. The fusion itself lives in
:mod:`nnssl.transforms.volume_fusion`.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, SSLMethod, check_common_fields, float32_loss
from nnssl.transforms.volume_fusion import draw_fusion_cases, fusion_with_inputs


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
    # Assumption: the paper does not say how its 2-GPU runs reduce the batch Dice; False = per
    # process (no all-gather), True = over all processes (nnU-Net's ddp Dice).
    dice_across_processes: bool = False
    # Data (authors' code, SPEC §7.1): each crop is flipped at random along each axis before
    # fusion (their only pretraining augmentation). Assumption: with probability 0.5 per axis,
    # drawn independently (the SPEC says "at random"); 0 turns flipping off ...
    flip_prob: float = 0.5
    # ... and voxels where background or foreground is padding (a volume smaller than the
    # crop) carry no loss.
    ignore_padding: bool = True
    # Fine-tuning hand-over: the whole network is pretrained (only the output layer differs).
    transfer: str = "encoder+decoder"
    grad_clip: Optional[float] = None  # max gradient norm; the paper clips nothing
    # Pretraining schedule (paper: Adam, lr 1e-3, wd 1e-5, batch 4; lr halved every 20k of 100k
    # iterations (PData-1k), 40k of 200k (PData-10k), 50k of 400k (PData-110k)). The halving period
    # is a share of --iterations, so any run length gets the PData-1k/10k shape (lr/16 at the end).
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_schedule: str = "step"
    lr_step_fraction: float = 0.2  # PData-1k and -10k; 0.125 for PData-110k
    lr_step_iterations: Optional[int] = None  # absolute halving period; None = lr_step_fraction of the run
    lr_gamma: float = 0.5
    batch_size: int = 4

    def __post_init__(self):
        for name in ("box_size_min", "box_size_max", "reference_patch"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 1:
                raise NnsslError(f"volume_fusion: {name}={value} must be three positive integers (D, H, W); "
                                 f"fix it with --set {name}=D,H,W.")
            setattr(self, name, value)
        if not 1 <= self.K <= 254:
            raise NnsslError(f"volume_fusion: K={self.K} must be in 1..254 (the label map is uint8 and K + 1 "
                             "marks padding; the paper uses K=4); fix it with --set K=4.")
        if not 0 <= self.flip_prob <= 1:
            raise NnsslError(f"volume_fusion: flip_prob={self.flip_prob} must be in [0, 1] (authors: 0.5); fix it "
                             "with --set flip_prob=0.5.")
        check_common_fields("volume_fusion", self)
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise NnsslError(f"volume_fusion: need 0 <= min_boxes <= max_boxes, got {self.min_boxes} and "
                             f"{self.max_boxes}; fix them with --set min_boxes=10 --set max_boxes=40.")
        if any(a > b for a, b in zip(self.box_size_min, self.box_size_max)):
            raise NnsslError(f"volume_fusion: box_size_min={self.box_size_min} exceeds box_size_max="
                             f"{self.box_size_max} on some axis; fix them with --set.")


@METHODS.register("volume_fusion")
class VolumeFusion(SSLMethod):
    """Batch: ``data`` [B, C, D, H, W] float32 (fused crops), ``target`` [B, 1, D, H, W] uint8
    (class k ⇔ α = k / K; K + 1 = padding, no loss). The target stays uint8 to keep worker →
    device traffic 8x smaller; the losses cast it themselves."""

    name = "volume_fusion"
    config_class = VolumeFusionConfig
    transfer = VolumeFusionConfig.transfer
    min_batch_size = 2

    def __init__(self, cfg: VolumeFusionConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        # Dice over all K + 1 classes, background included: eq. 3 sums c = 0..C-1 (and class 0
        # is a real pretext class here, not "nothing").
        ddp = cfg.dice_across_processes and dist.is_available() and dist.is_initialized()
        self.ignore = cfg.K + 1
        self.loss = DC_and_CE_loss(
            {"batch_dice": cfg.batch_dice, "smooth": 1e-5, "do_bg": True, "ddp": ddp}, {},
            weight_ce=cfg.weight_ce, weight_dice=cfg.weight_dice, dice_class=MemoryEfficientSoftDiceLoss)

    @classmethod
    def network_output_channels(cls, cfg: VolumeFusionConfig) -> int:
        return cfg.K + 1

    @classmethod
    def prepare(cls, cfg: VolumeFusionConfig, data_folder: str, identifiers: List[str], seed: int):
        """Refuse (NnsslError) pretraining data that cannot give two different scans per fused pair
        before anything is written; ``cfg`` unchanged."""
        draw_fusion_cases(np.random.default_rng(0), len(identifiers), max(2, cfg.batch_size))
        return cfg

    @classmethod
    def draw_cases(cls, cfg: VolumeFusionConfig, n_cases: int, batch_size: int,
                   rng: np.random.Generator) -> np.ndarray:
        """Background and foreground from two different scans: see
        :func:`nnssl.transforms.volume_fusion.draw_fusion_cases` (all distinct when n_cases >= B)."""
        return draw_fusion_cases(rng, n_cases, batch_size)

    @classmethod
    def _fuse(cls, cfg: VolumeFusionConfig, images: np.ndarray, rng: np.random.Generator, meta: Optional[dict]):
        if images.ndim != 5:
            raise NnsslError(f"volume_fusion works on 3D crops [B, C, D, H, W]; got an array of shape "
                             f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
        regions = None
        if cfg.ignore_padding and meta is not None and "image_region" in meta:
            regions = np.asarray(meta["image_region"], dtype=np.int64)
        return fusion_with_inputs(images, rng, cfg, regions)

    @classmethod
    def make_batch(cls, cfg: VolumeFusionConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, D, H, W] float32 normalized crops, B >= 2 -> {"data", "target"}.

        meta: the loader's; its ``image_region`` (crop voxels holding image data) marks padding as
        K + 1 when ``cfg.ignore_padding`` (without meta, nothing is padding)."""
        _, fused, labels = cls._fuse(cfg, images, rng, meta)
        return {"data": torch.from_numpy(fused), "target": torch.from_numpy(labels)}

    @classmethod
    def preview(cls, cfg: VolumeFusionConfig, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Sample 0, channel 0: the fused input [D, H, W] and its label map [D, H, W] (K + 1 = padding)."""
        return [("fused input", batch["data"][0, 0].detach().cpu().numpy()),
                ("label map (k = α·K)", batch["target"][0, 0].detach().cpu().numpy())]

    @classmethod
    def preview_from_images(cls, cfg: VolumeFusionConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Like :meth:`preview` but from the raw crops [B, C, D, H, W], so the mosaic can also show
        the (flipped) background (sample 0) and foreground (sample 1) that were fused; same draws as
        :meth:`make_batch` for the same rng state."""
        flipped, fused, labels = cls._fuse(cfg, images, rng, meta)
        batch = {"data": torch.from_numpy(fused), "target": torch.from_numpy(labels)}
        return [("background", flipped[0][0]), ("foreground", flipped[1][0])] + \
            cls.preview(cfg, batch)

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"ce", "dice", "loss"}: loss = weight_ce·CE + weight_dice·(1 − soft Dice), both over
        the voxels whose target is not K + 1 (padding).

        Algorithm 1 has one loss, on the full-resolution prediction; the engine builds the network
        without deep supervision, so a list output (a network that always returns one) contributes
        its first entry only. The Dice term is 1 + nnU-Net's (negative) soft Dice, as in eq. 3, so
        a perfect prediction gives a loss near 0. CE is the mean over the counted voxels (0 if none).
        """
        out = network(batch["data"])
        if isinstance(out, (list, tuple)):
            out = out[0]
        target = batch["target"]
        mask = target != self.ignore  # [B, 1, D, H, W]
        with float32_loss(out):
            out = out.float()
            ce = F.cross_entropy(out, target[:, 0].long(), ignore_index=self.ignore, reduction="sum")
            ce = ce / mask.sum().clamp(min=1)
            dice = 1 + self.loss.dc(out, torch.where(mask, target, torch.zeros_like(target)), loss_mask=mask)
            loss = self.loss.weight_ce * ce + self.loss.weight_dice * dice
        return {"ce": ce, "dice": dice, "loss": loss}
