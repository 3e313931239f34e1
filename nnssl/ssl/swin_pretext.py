"""Swin-UNETR-style SSL as QT-UNet pretrains its encoder (paper 001 §III-H, SPEC §7.3).

Per crop x, two views (``make_views``): rotation by k·90° in the axial plane, k ~ U{0..3}, then
1-3 cutout boxes with sides 32-64 voxels (at 96³, scaled to the crop) filled with uniform noise
(:mod:`nnssl.transforms.rotation_cutout`). Both views go through the encoder as one batch of 2B;
three heads work on its bottleneck ``network.encoder(x)[-1]`` ([2B, C, d, h, w]):

- reconstruction: one transposed conv (kernel = stride = crop / bottleneck per axis) back to the
  input resolution; L1 against the un-augmented crop;
- rotation: pooled bottleneck -> Linear -> BN -> ReLU -> Linear to 4 classes; cross-entropy;
- BYOL: projector and predictor (Linear -> BN -> ReLU -> Linear, hidden 4096, out 256); a
  momentum target (encoder + projector, EMA with τ from 0.996 to 1 by cosine, :meth:`after_step`);
  loss 2 − 2·cos(prediction of view a, target projection of view b), symmetrized (summed over
  both directions, as BYOL).

Loss = L1(v1) + L1(v2) + CE(v1) + CE(v2) + BYOL(p(v1), z'(v2)) + BYOL(p(v2), z'(v1)) (weights 1): each term
summed over the two views, as the authors' code (``SSLHarness.shared_step``; the paper names the three
losses without weights), so the three tasks weigh alike. Only the encoder transfers. The EMA target is a submodule of
the method, so it is in the method's ``state_dict`` and ``--c`` resumes it bit-exactly.

Assumptions (each a config field):
- ``byol_pool`` = True: the projector reads the globally average-pooled bottleneck, as the BYOL
  of PyTorch Lightning Bolts the paper builds on (pooled encoder features): 768 x 4096 inputs for
  QT-UNet-B, the same at any patch. The authors' code flattens the bottleneck instead
  (``--set byol_pool=false``): 768·3³ x 4096 ≈ 85 M projector parameters for B at 96³, plus its
  EMA copy and Adam state (1.7 GB; ``benchmarks/bench_qt_unet.py``), growing with the patch
  (≈ 200 M at 128³) and tying the weights to one patch size.
- ``recon_target`` = "original": the un-augmented, un-rotated crop (the paper's wording);
  "rotated" reconstructs each view's rotated crop without the cutouts (Swin-UNETR's code).
- The rotation head pools the bottleneck (global average) and has ``rotation_hidden`` = 512.
- BatchNorm in the heads normalises over both views together (2B rows), which is also what makes
  a batch of 1 work (BN needs more than one row); with B = 1 the statistics come from the two
  views of one crop only, which is weak: a warning says so.
- The rotation plane is spatial axes (1, 2) (``rotation_plane``): axis 0 is the slice axis.
  Crops that are not square in that plane are cut to the smaller side (``square_crop``).
- The target network runs in training mode (batch statistics, stochastic depth), like BYOL's.
- Collapse watch: ``monitor_proj_std`` is the std over the batch of the L2-normalised online
  projections, times √256 (≈ 1 for spread-out projections, 0 when every sample maps to the same
  point); an epoch mean below ``collapse_warn_std`` logs a warning.
- Schedule: Adam lr 4e-4, wd 1.5e-6, then cosine after a warm-up of ``warmup_fraction`` = 10 %
  of ``--iterations`` (10 warm-up epochs read as 10 of 100; the paper's Tables 2-4, which give
  the epochs per dataset and GPU-specific batch sizes, are not in the text); ``iterations`` =
  100k and ``batch_size`` = 2; no gradient clipping (none in the paper).
"""
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.spec import probe_level_shapes
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, SSLMethod, check_common_fields, float32_loss
from nnssl.transforms.rotation_cutout import (N_ROTATIONS, apply_cutouts, box_mask, draw_cutouts, draw_rotation,
                                              rotate)

RECON_TARGETS = ("original", "rotated")


@dataclass
class SwinPretextConfig:
    """Paper defaults (SPEC §7.3); override with ``--set key=value``."""

    # views
    rotation_plane: Tuple[int, int] = (1, 2)  # spatial axes; Assumption: axis 0 = slice axis
    square_crop: bool = True  # Assumption: cut a non-square in-plane crop to its smaller side
    cutout_min_boxes: int = 1
    cutout_max_boxes: int = 3
    cutout_side_min: int = 32  # at cutout_reference voxels, scaled to the crop
    cutout_side_max: int = 64
    cutout_reference: int = 96
    noise_low: Optional[float] = None  # Assumption: None = the crop's min / max
    noise_high: Optional[float] = None
    recon_target: str = "original"  # Assumption, see the module docstring
    # heads
    rotation_hidden: int = 512  # Assumption
    byol_hidden: int = 4096
    byol_out: int = 256
    byol_pool: bool = True  # Assumption: pooled (Bolts' BYOL); False = flattened, as the authors' code
    tau_base: float = 0.996
    weight_recon: float = 1.0
    weight_rotation: float = 1.0
    weight_byol: float = 1.0
    collapse_warn_std: float = 0.1  # Assumption: warn when monitor_proj_std's epoch mean is below
    # Fine-tuning hand-over: only the encoder is pretrained (the paper).
    transfer: str = "encoder"
    grad_clip: Optional[float] = None  # max gradient norm; the paper clips nothing
    # pretraining schedule (paper: Adam, lr 4e-4, wd 1.5e-6, 10 warm-up epochs, then cosine)
    optimizer: str = "adam"
    lr: float = 4e-4
    weight_decay: float = 1.5e-6
    lr_schedule: str = "cosine"
    iterations: int = 100_000  # Assumption
    warmup_fraction: float = 0.1  # Assumption: 10 warm-up epochs of a 100-epoch run
    warmup_iterations: Optional[int] = None  # absolute warm-up; None = warmup_fraction of the run
    batch_size: int = 2  # Assumption

    def __post_init__(self):
        self.rotation_plane = tuple(int(a) for a in self.rotation_plane)
        checks = [
            (len(self.rotation_plane) == 2 and len(set(self.rotation_plane)) == 2
             and all(0 <= a <= 2 for a in self.rotation_plane), "rotation_plane must be two different spatial axes "
                                                                 "out of 0, 1, 2 (default 1,2)"),
            (1 <= self.cutout_min_boxes <= self.cutout_max_boxes, "need 1 <= cutout_min_boxes <= cutout_max_boxes "
                                                                  "(paper: 1 and 3)"),
            (1 <= self.cutout_side_min <= self.cutout_side_max and self.cutout_reference >= 1,
             "need 1 <= cutout_side_min <= cutout_side_max and cutout_reference >= 1 (paper: 32, 64 at 96)"),
            (self.recon_target in RECON_TARGETS, f"recon_target must be one of {RECON_TARGETS}"),
            (min(self.rotation_hidden, self.byol_hidden, self.byol_out) >= 1, "head widths must be >= 1"),
            (0 <= self.tau_base <= 1, "tau_base must be in [0, 1] (paper: 0.996)"),
            ((self.noise_low is None) == (self.noise_high is None) and
             (self.noise_low is None or self.noise_low < self.noise_high),
             "set both noise_low < noise_high, or neither (the crop's range)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise NnsslError(f"swin_pretext: {msg}; fix it with --set key=value.")
        check_common_fields("swin_pretext", self)


def mlp_head(in_features: int, hidden: int, out: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear (BYOL's projector / predictor, the rotation head)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 2 − 2·cos(p, z) = ||p/|p| − z/|z|||²; p, z: [N, D]."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


def ema_tau(iteration: int, total: int, tau_base: float) -> float:
    """BYOL's τ after step ``iteration`` of ``total``: 1 − (1 − τ_base)·(cos(π·it/total) + 1)/2."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * iteration / max(1, total)) + 1) / 2


def make_views(cfg: SwinPretextConfig, images: np.ndarray, rng: np.random.Generator):
    """images [B, C, D, H, W] -> (views [2B, C, D, H, W], k [2B], boxes per view, targets [2B, C, D, H, W]).

    Rows 0..B-1 are view 1 of each crop, rows B..2B-1 view 2. Per view and sample: k, boxes, noise.
    """
    if images.ndim != 5:
        raise NnsslError(f"swin_pretext works on 3D crops [B, C, D, H, W]; got an array of shape "
                         f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
    views, ks, boxes, targets = [], [], [], []
    for _ in range(2):
        for x in images:
            k = draw_rotation(rng)
            rotated = rotate(x, k, cfg.rotation_plane)
            b = draw_cutouts(rng, rotated.shape[1:], cfg.cutout_min_boxes, cfg.cutout_max_boxes,
                             cfg.cutout_side_min, cfg.cutout_side_max, cfg.cutout_reference)
            views.append(apply_cutouts(rotated, b, rng, cfg.noise_low, cfg.noise_high))
            ks.append(k)
            boxes.append(b)
            targets.append(np.asarray(x, dtype=np.float32) if cfg.recon_target == "original" else rotated)
    return np.stack(views), np.asarray(ks, dtype=np.int64), boxes, np.stack(targets).astype(np.float32)


@METHODS.register("swin_pretext")
class SwinPretext(SSLMethod):
    """Batch: ``views`` [2B, C, D, H, W] float32, ``rotations`` [2B] int64 (k of each view),
    ``target`` [2B, C, D, H, W] float32 (what each view reconstructs)."""

    name = "swin_pretext"
    config_class = SwinPretextConfig
    transfer = SwinPretextConfig.transfer
    min_batch_size = 1
    requires = frozenset({"bottleneck"})

    def __init__(self, cfg: SwinPretextConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        if cfg.batch_size < 2:
            warnings.warn("swin_pretext with batch size 1: the BatchNorm layers of the rotation/BYOL heads then "
                          "normalise over the two views of a single crop only, which gives weak statistics; use "
                          "--batch_size 2 or more if memory allows.")
        channels, *grid = probe_level_shapes(network, self.patch_size, num_input_channels)[-1]
        grid = tuple(grid)
        stride = tuple(p // g for p, g in zip(self.patch_size, grid))
        if any(p != s * g for p, s, g in zip(self.patch_size, stride, grid)):
            raise NnsslError(f"swin_pretext: the crop {self.patch_size} is not a whole multiple of the bottleneck grid "
                             f"{grid}, so one transposed conv cannot map the bottleneck back to it. Use a patch "
                             f"divisible by the network's total downsampling (re-run planning).")
        self.recon_head = nn.ConvTranspose3d(channels, num_input_channels, stride, stride=stride)
        self.rotation_head = mlp_head(channels, cfg.rotation_hidden, N_ROTATIONS)
        proj_in = channels if cfg.byol_pool else channels * int(np.prod(grid))
        self.projector = mlp_head(proj_in, cfg.byol_hidden, cfg.byol_out)
        self.predictor = mlp_head(cfg.byol_out, cfg.byol_hidden, cfg.byol_out)
        self.target_encoder = copy.deepcopy(network.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self._online = (network,)  # a tuple, so the online network is not registered as a submodule twice

    @classmethod
    def crop_requirement(cls, cfg: SwinPretextConfig) -> str:
        return f"equal sizes in the rotation plane (spatial axes {tuple(cfg.rotation_plane)}) for its 90-degree rotations"

    @classmethod
    def crop_joint_ok(cls, cfg: SwinPretextConfig, crop) -> bool:
        a, b = cfg.rotation_plane
        return len(crop) != 3 or crop[a] == crop[b]

    @classmethod
    def choose_crop(cls, cfg: SwinPretextConfig, planned_patch_size, rule=None):
        """The largest crop that is square in the rotation plane (90° rotations need it): the planned patch
        cut to the smaller in-plane side where the network takes that (``square_crop``)."""
        size = [int(p) for p in planned_patch_size]
        a, b = cfg.rotation_plane
        if len(size) == 3 and size[a] != size[b] and not cfg.square_crop:
            raise NnsslError(f"swin_pretext rotates by 90 degrees in spatial axes {cfg.rotation_plane}, which "
                             f"needs equal sizes there, but the planned patch is {tuple(size)}. Drop "
                             f"--set square_crop=false (crops are then cut to the smaller side).")
        return super().choose_crop(cfg, planned_patch_size, rule)

    @classmethod
    def make_batch(cls, cfg: SwinPretextConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, D, H, W] float32 normalized crops -> {"views", "rotations", "target"} (meta unused)."""
        views, ks, _, targets = make_views(cfg, images, rng)
        return {"views": torch.from_numpy(views), "rotations": torch.from_numpy(ks),
                "target": torch.from_numpy(targets)}

    @classmethod
    def preview(cls, cfg: SwinPretextConfig, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: view 1, view 2 (titles give k) and view 1's reconstruction target (channel 0)."""
        b = batch["views"].shape[0] // 2
        k = batch["rotations"].tolist()
        return [(f"view 1 (rotation k={k[0]}, {90 * k[0]} deg)", batch["views"][0, 0].numpy()),
                (f"view 2 (rotation k={k[b]}, {90 * k[b]} deg)", batch["views"][b, 0].numpy()),
                (f"reconstruction target ({cfg.recon_target})", batch["target"][0, 0].numpy())]

    @classmethod
    def preview_from_images(cls, cfg: SwinPretextConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: the crop, each view with its rotation label and its cutout boxes, and the
        reconstruction target; the same draws as :meth:`make_batch` for the same rng state."""
        views, ks, boxes, targets = make_views(cfg, images, rng)
        b, shape = images.shape[0], views.shape[2:]
        panels = [("crop (un-augmented)", np.asarray(images[0, 0], dtype=np.float32))]
        for v, row in ((1, 0), (2, b)):
            panels.append((f"view {v} (rotation k={ks[row]}, {90 * ks[row]} deg, {len(boxes[row])} cutouts)",
                           views[row, 0]))
            panels.append((f"view {v} cutout boxes", box_mask(shape, boxes[row]).astype(np.float32)))
        panels.append((f"reconstruction target of view 1 ({cfg.recon_target})", targets[0, 0]))
        return panels

    # --- training ---
    def _projector_input(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return bottleneck.mean(dim=(2, 3, 4)) if self.cfg.byol_pool else bottleneck.flatten(1)

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"recon", "rotation", "byol", "monitor_proj_std", "loss"} (monitor_proj_std is not trained);
        recon, rotation and byol are each the sum over the two views (directions)."""
        views, cfg = batch["views"], self.cfg
        b = views.shape[0] // 2
        feats = network.encoder(views)[-1]  # [2B, C, d, h, w]
        recon_out, rotation_logits = self.recon_head(feats), self.rotation_head(feats.mean(dim=(2, 3, 4)))
        z = self.projector(self._projector_input(feats))
        p = self.predictor(z)
        with torch.no_grad():
            z_target = self.target_projector(self._projector_input(self.target_encoder(views)[-1]))
        with float32_loss(feats):
            # Summed over the views, like BYOL's two directions (the authors' weighting, module docstring).
            recon_out, target = recon_out.float(), batch["target"].float()
            recon = F.l1_loss(recon_out[:b], target[:b]) + F.l1_loss(recon_out[b:], target[b:])
            logits, k = rotation_logits.float(), batch["rotations"]
            rotation = F.cross_entropy(logits[:b], k[:b]) + F.cross_entropy(logits[b:], k[b:])
            p, z_target = p.float(), z_target.float()
            byol = byol_loss(p[:b], z_target[b:]) + byol_loss(p[b:], z_target[:b])
            spread = F.normalize(z.float().detach(), dim=1).std(dim=0).mean() * math.sqrt(z.shape[1])
            loss = cfg.weight_recon * recon + cfg.weight_rotation * rotation + cfg.weight_byol * byol
        return {"recon": recon, "rotation": rotation, "byol": byol, "monitor_proj_std": spread, "loss": loss}

    @torch.no_grad()
    def after_step(self, iteration: int, total_iterations: int) -> None:
        """EMA of the target: θ_t ← τ·θ_t + (1 − τ)·θ_online, τ = :func:`ema_tau` (parameters only;
        the target's BatchNorm statistics follow its own forward passes)."""
        tau = ema_tau(iteration, total_iterations, self.cfg.tau_base)
        for target, online in ((self.target_encoder, self._online[0].encoder),
                               (self.target_projector, self.projector)):
            t_params, o_params = list(target.parameters()), list(online.parameters())
            torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1 - tau)

    def epoch_messages(self, record: dict) -> List[str]:
        """The collapse warning, from the epoch means the engine logged."""
        spread = record["losses"].get("monitor_proj_std")
        if spread is not None and spread < self.cfg.collapse_warn_std:
            return [f"WARNING swin_pretext: the BYOL projections are collapsing (monitor_proj_std {spread:.3g} < "
                    f"{self.cfg.collapse_warn_std}; about 1 when spread out, 0 when every crop maps to one point). "
                    f"Try a lower lr (--set lr=...), a larger batch, or --set weight_byol=0 to train without BYOL."]
        return []
