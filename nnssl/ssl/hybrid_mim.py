"""HybridMIM (paper 002, SPEC §7.4): two-level masked image modelling with three proxy tasks.

Per batch (:meth:`HybridMIM.make_batch`, loader workers): the two-level masking of
:mod:`nnssl.transforms.hybrid_masking` (sub-volumes of 32³, their 2x2x2 patches of 16³, ratio 0.4,
masked voxels 0), the per-sub-volume counts and locations, and a coin for the region's placement.
Per step (:meth:`HybridMIM.forward_loss`):

- **partial region prediction** (pixel level, eq. 1): the encoder runs on the whole masked crop;
  every encoder level is cropped to the centred reconstruction region (64³ for 96³) scaled by its
  stride, and ``network.decoder`` runs on the cropped levels only (capability ``cropped_decoder``),
  which is where the paper's speed comes from. L_PR = mean squared error over the masked voxels of
  the region. The partial output equals the centre crop of a full decoding only away from the
  decoder's receptive-field margin and only for per-voxel norms: the instance norms of nnU-Net's
  U-Net and SwinUNETR normalise each decoder map over the region, so pretraining trains the
  decoder on region statistics (tests/test_hybrid_mim.py shows both);
- **patch-masking perception** (region level, eq. 2-5): the bottleneck is average-pooled per
  sub-volume; a linear number head (K + 1 = 9 classes, cross-entropy) and a linear location head
  (K = 8 outputs, binary cross-entropy summed over the patches and averaged over the sub-volumes,
  eq. 4: 8x the authors' code, whose ``BCEWithLogitsLoss`` also averages over the patches; nnssl
  keeps the paper) read it; the consistency loss (eq. 5) is ½(CE(number logits, #[p > 0.5]) +
  MSE(Σ p, argmax number));
- **dropout contrastive** (sample level, eq. 6, SimCSE): the masked input is encoded twice with
  dropout active *inside* the encoder; the two global averages of the bottleneck are a sample's
  positive pair, the other samples of the batch (of every process under DDP,
  :mod:`nnssl.ssl.distributed`) its negatives; NT-Xent (τ = 0.5). The first pass is the one every
  other term uses; the second runs without gradient, as the authors' code
  (``second_pass_grad``). Dropout (``encoder_dropout`` = the authors' 0.1,
  :mod:`nnssl.ssl.encoder_dropout`): SwinUNETR's ``drop_rate``, as the authors pretrain it; nnU-Net's
  U-Nets get functional dropout on the output of every encoder stage (forward hooks, so the saved
  state dict is the planned network's). ``cl_pos_cos`` (logged every epoch, not trained) is the
  mean cosine of the positive pairs: exactly 1 would mean two identical views (the term could then
  only push negatives apart). The pooled features of an untrained U-Net are nearly parallel for
  any two crops (non-negative activations), so expect values near 1 at the start.

L = L_PR + 0.1·L_num + 0.1·L_loc + 0.01·L_con + 0.1·L_CL (eq. 7; each weight a field). Encoder and
decoder transfer. The network is built with one output per input channel (the reconstruction).

Assumptions (each a config field):
- ``crop_size`` None: the largest crop inside the planned patch that divides into whole sub-volumes
  with the region on the network's stride grid (:meth:`HybridMIM.crop_axis_ok`; the planned patch
  itself where it does, e.g. 96³ or 128³, the paper's crops; 32 x 96 x 96 from a 40 x 96 x 96 plan);
- ``region_size`` None: the crop less one sub-volume per axis (the paper's 64 of 96 and 96 of 128).
  The region's start is snapped to the network's coarsest stride (levels are cropped by whole
  voxels): where the centred start is not a multiple (16 for a 64³ region in a 96³ crop under
  stride 32), a per-batch coin picks one of the two nearest starts (0 or 32), centred in expectation;
- L_PR as a voxel mean (eq. 1 averages per-sub-volume L2 norms; a mean keeps the scale independent
  of sizes); 0 when the region holds no masked voxel;
- ``mask_sampling`` "exact": round(0.4 · patches) masked per crop, chosen without replacement;
- ``con_reduction`` "mean": eq. 5's CE is averaged over sub-volumes like eq. 2 ("sum" = eq. 5 as
  printed, summed over the R sub-volumes);
- ``ntxent_denominator`` "all": SimCLR's NT-Xent (the positive is in the denominator, as eq. 6's
  text says "k ≠ i"); "negatives" = eq. 6 as printed (k ≠ i, j);
- ``encoder_dropout_stages`` "all": dropout after every encoder stage of nnU-Net's U-Nets, like
  SimCSE's dropout throughout its encoder. The authors' U-Net drops only in its first stage (and
  its decoder): "first" follows them (tiny preset, random input: positive-pair cosine 0.9989 with
  "first", 0.992 with "all");
- ``second_pass_grad`` False: the second contrastive pass runs without gradient (the authors'
  ``torch.no_grad()``; SimCSE back-propagates through both);
- the warm-up (paper: 50 epochs of an unspecified length in 100k steps) is ``warmup_fraction`` =
  5 % of the run; batch 4 (the paper's per-GPU batch).
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, SSLMethod, check_common_fields, float32_loss
from nnssl.ssl.crops import CropChoice
from nnssl.ssl.distributed import gather_with_grad
from nnssl.ssl.encoder_dropout import STAGE_CHOICES, enable_encoder_dropout
from nnssl.transforms.hybrid_masking import (SAMPLING, check_region, default_region, hybrid_mask, mask_geometry,
                                             region_offsets, voxel_mask)


@dataclass
class HybridMIMConfig:
    """Paper defaults (§III, §IV-C); override with ``--set key=value``."""

    # two-level masking
    sub_volume_size: Tuple[int, int, int] = (32, 32, 32)
    patch_size: Tuple[int, int, int] = (16, 16, 16)
    mask_ratio: float = 0.4
    mask_value: float = 0.0
    mask_sampling: str = "exact"  # Assumption (see the module docstring)
    crop_size: Optional[Tuple[int, int, int]] = None  # Assumption: None = the largest valid crop in the planned patch
    # partial region prediction
    region_size: Optional[Tuple[int, int, int]] = None  # Assumption: None = crop less one sub-volume
    # loss weights (eq. 7) and terms
    weight_pr: float = 1.0
    weight_num: float = 0.1
    weight_loc: float = 0.1  # on eq. 4's L_loc: summed over the 8 patches (8x the authors' per-patch mean)
    weight_con: float = 0.01
    weight_cl: float = 0.1
    temperature: float = 0.5
    encoder_dropout: float = 0.1  # the authors' 0.1, inside the encoder (module docstring); 0: as planned
    encoder_dropout_stages: str = "all"  # Assumption: nnU-Net U-Nets, after every stage ("first": the authors)
    second_pass_grad: bool = False  # Assumption: the authors' second contrastive pass has no gradient
    con_reduction: str = "mean"  # Assumption
    ntxent_denominator: str = "all"  # Assumption
    # set by configure() from the data and the network (not settings)
    reconstruct_channels: int = 1
    region_alignment: Optional[Tuple[int, int, int]] = None
    # pretraining schedule (paper: AdamW, lr 1e-4, decay 1e-5, cosine with warm-up, 100k steps, batch 4)
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"
    iterations: int = 100_000
    warmup_fraction: float = 0.05  # Assumption
    warmup_iterations: Optional[int] = None  # absolute warm-up; None = warmup_fraction of the run
    batch_size: int = 4
    transfer: str = "encoder+decoder"
    grad_clip: Optional[float] = None  # max gradient norm; the paper clips nothing

    def __post_init__(self):
        for name in ("sub_volume_size", "patch_size", "crop_size", "region_size", "region_alignment"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)
                if len(value) != 3 or min(value) < 1:
                    raise NnsslError(f"hybrid_mim: {name}={value} must be three positive integers (D, H, W); fix it "
                                     f"with --set {name}=D,H,W.")
                setattr(self, name, value)
        checks = [
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1) (paper: 0.4)"),
            (self.mask_sampling in SAMPLING, f"mask_sampling must be one of {SAMPLING}"),
            (min(self.weight_pr, self.weight_num, self.weight_loc, self.weight_con, self.weight_cl) >= 0,
             "loss weights must be >= 0 (paper: 1, 0.1, 0.1, 0.01, 0.1)"),
            (self.temperature > 0, "temperature must be > 0 (paper: 0.5)"),
            (0 <= self.encoder_dropout < 1, "encoder_dropout must be in [0, 1) (the authors: 0.1)"),
            (self.encoder_dropout_stages in STAGE_CHOICES, f"encoder_dropout_stages must be one of {STAGE_CHOICES}"),
            (self.con_reduction in ("mean", "sum"), "con_reduction must be mean or sum"),
            (self.ntxent_denominator in ("all", "negatives"), "ntxent_denominator must be all or negatives"),
            (self.reconstruct_channels >= 1, "reconstruct_channels must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise NnsslError(f"hybrid_mim: {msg}; fix it with --set key=value.")
        check_common_fields("hybrid_mim", self)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, exclude_positive: bool = False) -> torch.Tensor:
    """NT-Xent over N pairs (z1[i], z2[i]): z1, z2 [N, F] -> mean over the 2N anchors of
    -log(exp(cos(i, j) / τ) / Σ_{k ≠ i} exp(cos(i, k) / τ)), j = the anchor's pair
    (``exclude_positive``: the sum also skips k = j, eq. 6 as printed).

    Under DDP, z1 and z2 are this process's n pairs: the candidates k are the pairs of every process
    (:func:`~nnssl.ssl.distributed.gather_with_grad`), the anchors this process's 2n rows, so the mean
    over the processes is the loss of the global batch."""
    n = z1.shape[0]
    a, offset = gather_with_grad(z1.float())
    b, _ = gather_with_grad(z2.float())
    total = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)  # [2N, F]
    mine = torch.arange(offset, offset + n, device=z.device)
    anchors = torch.cat([mine, mine + total])  # this process's rows of z
    pair = torch.cat([mine + total, mine])
    sim = z[anchors] @ z.t() / temperature  # [2n, 2N]
    positive = sim[torch.arange(2 * n, device=z.device), pair]
    excluded = F.one_hot(anchors, 2 * total).bool()
    if exclude_positive:
        excluded |= F.one_hot(pair, 2 * total).bool()
    return (torch.logsumexp(sim.masked_fill(excluded, float("-inf")), dim=1) - positive).mean()


def level_strides(crop: Sequence[int], features: Sequence[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """Stride (crop / level size) per encoder level; RuntimeError if a level does not tile the crop."""
    strides = []
    for f in features:
        size = tuple(int(s) for s in f.shape[2:])
        if any(c % s for c, s in zip(crop, size)):
            raise RuntimeError(f"hybrid_mim: encoder level of size {size} does not tile the crop {tuple(crop)}")
        strides.append(tuple(c // s for c, s in zip(crop, size)))
    return strides


def network_alignment(network: nn.Module, crop: Sequence[int], channels: int) -> Tuple[int, int, int]:
    """The coarsest stride of the encoder (its ``strides`` attribute, else one dry run at ``crop``)."""
    strides = getattr(network.encoder, "strides", None)
    if strides is not None:
        per_level = [np.broadcast_to(np.asarray(s, dtype=np.int64), (3,)) for s in strides]
        return tuple(int(v) for v in np.prod(per_level, axis=0))
    with torch.no_grad():
        p = next(network.parameters())
        return level_strides(crop, network.encoder(torch.zeros(1, channels, *crop, dtype=p.dtype, device=p.device)))[-1]


def partial_decode(network: nn.Module, features: Sequence[torch.Tensor], crop: Sequence[int], region: Sequence[int],
                   coin: Sequence[float]) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Decode only the reconstruction region: every level of ``features`` (``network.encoder`` of a
    crop of spatial size ``crop``) is cropped to the region scaled by its stride, then
    ``network.decoder`` runs on the cropped levels. Returns (output [B, C_out, *region], region start);
    the start is :func:`~nnssl.transforms.hybrid_masking.region_offsets` for the coarsest stride."""
    strides = level_strides(crop, features)
    start = region_offsets(crop, region, strides[-1], coin)
    cropped = [f[(slice(None), slice(None)) + tuple(slice(o // s, (o + r) // s) for o, r, s in zip(start, region, st))]
               for f, st in zip(features, strides)]
    out = network.decoder(cropped)
    return (out[0] if isinstance(out, (list, tuple)) else out), start


@METHODS.register("hybrid_mim")
class HybridMIM(SSLMethod):
    """Batch: ``data`` [B, C, D, H, W] float32 (masked crops), ``image`` [B, C, D, H, W] (originals),
    ``patch_mask`` bool [B, P0, P1, P2], ``counts`` uint8 [B, R], ``locations`` bool [B, R, K],
    ``region_coin`` float32 [3]."""

    name = "hybrid_mim"
    config_class = HybridMIMConfig
    transfer = HybridMIMConfig.transfer
    # The contrastive term needs a negative in the process's batch (eq. 6).
    min_batch_size = 2
    requires = frozenset({"bottleneck", "cropped_decoder"})

    def __init__(self, cfg: HybridMIMConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        self.geometry = mask_geometry(self.patch_size, cfg.sub_volume_size, cfg.patch_size)
        self.region = cfg.region_size or default_region(self.geometry)
        self.alignment = network_alignment(network, self.patch_size, num_input_channels)
        check_region(self.patch_size, self.region, self.alignment)
        width = getattr(network.encoder, "output_channels", None)
        if width is None:
            with torch.no_grad():
                width = [network.encoder(torch.zeros(1, num_input_channels, *self.patch_size))[-1].shape[1]]
        k = self.geometry.patches_per_sub_volume
        self.number_head = nn.Linear(int(width[-1]), k + 1)
        self.location_head = nn.Linear(int(width[-1]), k)
        # Dropout serves the contrastive term only: without it the network trains as planned.
        self._dropout_hooks = tuple(enable_encoder_dropout(network, cfg.encoder_dropout, cfg.encoder_dropout_stages)
                                    if cfg.weight_cl > 0 else ())

    # --- class-level hooks -------------------------------------------------------------
    @classmethod
    def network_output_channels(cls, cfg: HybridMIMConfig) -> int:
        return cfg.reconstruct_channels

    @classmethod
    def crop_requirement(cls, cfg: HybridMIMConfig) -> str:
        return (f"whole {'x'.join(map(str, cfg.sub_volume_size))} sub-volumes along every axis (or one shorter "
                f"sub-volume of whole patches) and a reconstruction region on the network's stride grid")

    @classmethod
    def crop_axis_ok(cls, cfg: HybridMIMConfig, axis: int, size: int, rule) -> bool:
        """:func:`mask_geometry`'s rule along one axis (a multiple of the sub-volume, or shorter and a multiple
        of its patch count) and :func:`check_region`'s (region and crop multiples of the network's divisor,
        which the coarsest stride divides)."""
        sub, split = cfg.sub_volume_size[axis], max(1, cfg.sub_volume_size[axis] // cfg.patch_size[axis])
        if size < sub:
            ok, region = size % split == 0, size
        else:
            ok, region = size % sub == 0, (size - sub if size > sub else size)
        if cfg.region_size is not None:
            ok, region = ok and cfg.region_size[axis] <= size, cfg.region_size[axis]
        stride = 1 if rule.fixed else int(rule.divisor[axis])
        return ok and region % stride == 0 and size % stride == 0

    @classmethod
    def choose_crop(cls, cfg: HybridMIMConfig, planned_patch_size: Sequence[int], rule=None) -> CropChoice:
        """``--set crop_size`` as given (checked in :meth:`configure`), else the largest valid crop."""
        if cfg.crop_size is None:
            return super().choose_crop(cfg, planned_patch_size, rule)
        planned = tuple(int(p) for p in planned_patch_size)
        return CropChoice(tuple(cfg.crop_size), planned, "" if cfg.crop_size == planned else "it was set with --set crop_size")

    @classmethod
    def configure(cls, cfg: HybridMIMConfig, build_network, crop_size, num_input_channels: int):
        """Check the crop's sub-volume division and the region before training; record the channel
        count (the reconstruction's outputs) and the network's coarsest stride (the region's snap)."""
        geometry = mask_geometry(crop_size, cfg.sub_volume_size, cfg.patch_size)
        alignment = network_alignment(build_network(), crop_size, num_input_channels)
        check_region(crop_size, cfg.region_size or default_region(geometry), alignment)
        return dataclasses.replace(cfg, reconstruct_channels=int(num_input_channels), region_alignment=alignment)

    @classmethod
    def _mask(cls, cfg: HybridMIMConfig, images: np.ndarray, rng: np.random.Generator):
        if images.ndim != 5:
            raise NnsslError(f"hybrid_mim works on 3D crops [B, C, D, H, W]; got an array of shape "
                             f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
        geometry = mask_geometry(images.shape[2:], cfg.sub_volume_size, cfg.patch_size)
        masked, patch_masks, counts, locations = hybrid_mask(images, rng, geometry, cfg.mask_ratio, cfg.mask_value,
                                                             cfg.mask_sampling)
        coin = rng.random(3).astype(np.float32)
        return geometry, masked, patch_masks, counts, locations, coin

    @classmethod
    def make_batch(cls, cfg: HybridMIMConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, D, H, W] float32 normalized crops -> the batch of the class docstring (meta unused)."""
        _, masked, patch_masks, counts, locations, coin = cls._mask(cfg, images, rng)
        return {"data": torch.from_numpy(masked), "image": torch.from_numpy(np.ascontiguousarray(images)),
                "patch_mask": torch.from_numpy(patch_masks), "counts": torch.from_numpy(counts),
                "locations": torch.from_numpy(locations), "region_coin": torch.from_numpy(coin)}

    @classmethod
    def preview_from_images(cls, cfg: HybridMIMConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: the original, the masked crop with the sub-volume grid drawn in, the masked-patch
        count of each sub-volume, and the reconstruction region (1) with its masked voxels (2); same
        draws as :meth:`make_batch` for the same rng state."""
        geometry, masked, patch_masks, counts, _, coin = cls._mask(cfg, images, rng)
        crop = geometry.crop
        grid_lines = np.zeros(crop, dtype=bool)
        for axis, step in enumerate(geometry.sub_volume):
            index = [slice(None)] * 3
            index[axis] = slice(step, None, step)
            grid_lines[tuple(index)] = True
        shown = masked[0, 0].copy()
        shown[grid_lines] = float(images[0, 0].max())
        count_map = counts[0].reshape(geometry.grid).astype(np.float32)
        for axis, step in enumerate(geometry.sub_volume):
            count_map = np.repeat(count_map, step, axis=axis)
        region = cfg.region_size or default_region(geometry)
        start = region_offsets(crop, region, cfg.region_alignment or (1, 1, 1), coin)
        region_map = np.zeros(crop, dtype=np.float32)
        box = tuple(slice(s, s + r) for s, r in zip(start, region))
        region_map[box] = 1 + voxel_mask(patch_masks[0], geometry)[box]
        return [("original", np.asarray(images[0, 0])),
                ("masked input, sub-volume grid", shown),
                (f"masked patches per sub-volume (0-{geometry.patches_per_sub_volume})", count_map),
                ("reconstruction region (1), its masked voxels (2)", region_map)]

    # --- training ----------------------------------------------------------------------
    def _second_view(self, network: nn.Module, data: torch.Tensor) -> torch.Tensor:
        """The second contrastive view [B, F]: another encoder pass (other dropout masks), pooled."""
        with torch.set_grad_enabled(self.cfg.second_pass_grad and torch.is_grad_enabled()):
            return network.encoder(data)[-1].float().mean(dim=(2, 3, 4))

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"pr", "num", "loc", "con", "cl", "loss"} (eq. 7) and, with the contrastive term, the
        monitor "cl_pos_cos" (mean cosine of the positive pairs; not trained)."""
        cfg, geometry = self.cfg, self.geometry
        data, image = batch["data"], batch["image"]
        if self.cfg.weight_cl > 0 and data.shape[0] < 2:
            raise NnsslError("hybrid_mim: the contrastive term needs at least 2 samples per process (the other "
                             "samples are its negatives); use --batch_size 2 or more per process, or "
                             "--set weight_cl=0.")
        features = network.encoder(data)
        recon, start = partial_decode(network, features, self.patch_size, self.region, batch["region_coin"].tolist())
        if recon.shape[1] != image.shape[1]:
            raise NnsslError(f"hybrid_mim reconstructs every input channel, but the network has {recon.shape[1]} "
                             f"output(s) for {image.shape[1]} channel(s): build it with "
                             f"network_output_channels(cfg) outputs after configure() (the engine does).")
        bottleneck = features[-1]
        pooled = F.adaptive_avg_pool3d(bottleneck.float(), geometry.grid).flatten(2).transpose(1, 2)  # [B, R, F]
        num_logits, loc_logits = self.number_head(pooled), self.location_head(pooled)
        # the second encoder pass runs here, under the network's autocast; the views are pooled in float32
        views = (bottleneck.float().mean(dim=(2, 3, 4)), self._second_view(network, data)) if cfg.weight_cl > 0 \
            else None

        box = (slice(None), slice(None)) + tuple(slice(o, o + r) for o, r in zip(start, self.region))
        hit = batch["patch_mask"]  # [B, P0, P1, P2] -> voxels [B, 1, D, H, W], cropped to the region
        for axis, size in enumerate(geometry.patch):
            hit = torch.repeat_interleave(hit, size, dim=axis + 1)
        hit = hit[:, None][box]
        with float32_loss(data):
            err = (recon.float() - image[box].float()) ** 2 * hit
            pr = err.sum() / (hit.sum() * image.shape[1]).clamp(min=1)
            num_logits, loc_logits = num_logits.float(), loc_logits.float()
            counts, locations = batch["counts"].long(), batch["locations"].float()
            num = F.cross_entropy(num_logits.flatten(0, 1), counts.flatten())
            # eq. 4: summed over the K patches, averaged over the sub-volumes (8x the authors' all-element mean)
            loc = F.binary_cross_entropy_with_logits(loc_logits, locations, reduction="none").sum(-1).mean()
            p = torch.sigmoid(loc_logits)
            implied = (p > 0.5).sum(-1).detach()
            con_ce = F.cross_entropy(num_logits.flatten(0, 1), implied.flatten(), reduction="none").view_as(implied)
            con_ce = con_ce.sum(1).mean() if cfg.con_reduction == "sum" else con_ce.mean()
            con = 0.5 * (con_ce + F.mse_loss(p.sum(-1), num_logits.argmax(-1).float()))

            monitors = {}
            if views is not None:
                v1, v2 = views
                cl = nt_xent(v1, v2, cfg.temperature, cfg.ntxent_denominator == "negatives")
                monitors["cl_pos_cos"] = F.cosine_similarity(v1.detach(), v2.detach(), dim=1).mean()
            else:
                cl = pr.new_zeros(())
            loss = (cfg.weight_pr * pr + cfg.weight_num * num + cfg.weight_loc * loc + cfg.weight_con * con
                    + cfg.weight_cl * cl)
        return {"pr": pr, "num": num, "loc": loc, "con": con, "cl": cl, **monitors, "loss": loss}
