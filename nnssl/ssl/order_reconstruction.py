"""LWI, learnable weight initialization (paper 003 §III-B, SPEC §7.5): order prediction + masked reconstruction.

In-task SSL (default ``-pd intask``: the target's own training images). Per crop (loader workers,
:mod:`nnssl.transforms.slab_shuffle`): split along depth into B = D / P_dm equal slabs, shuffle them
with a random permutation per sample, mask the shuffled volume (ratio 0.4; 16³ patches at a 96³
crop, scaled per axis to the crop, or a fixed 4³ on UNETR++, see "Defaults per backbone"). The
network sees the shuffled, masked crop:

- order prediction: every encoder level's features [N, C_i, D_i, H_i, W_i] are averaged over height
  and width per depth position, then over the depth positions of each slab along the *shuffled*
  (depth) axis -> [N, B, C_i]; one linear classifier per level predicts, for each slab position,
  the slab's original index (B classes). L_cls = eq. 7: cross-entropy summed over the levels and the
  B positions (mean over the batch). The authors' code averages along another axis than the one it
  shuffles, so its classifier cannot see the order; nnssl groups along the shuffled axis.
- reconstruction: the decoder output (the network is built with as many output channels as the
  input has) against the shuffled, unmasked crop, voxel MSE over the whole crop (eq. 8).
- L = weight_cls · L_cls + weight_rec · L_rec (eq. 9: both 1). The whole network transfers; only the
  output convolution differs at fine-tuning (eq. 10 trains the same network for segmentation).

P_dm and B come from the network, through the "levels" capability only (no per-architecture code):
:meth:`OrderReconstruction.configure` runs the encoder once on a zero crop and takes B = the depth
of the bottleneck features (paper: B = D / P_dm, P_dm the bottleneck's depth downsampling).

Defaults per backbone (:meth:`OrderReconstruction.default_config`, recorded in the config field
``backbone_defaults``; ``--set`` overrides any of them):

- order heads (``order_levels``): on ``unetr`` / ``unetr_pp`` the four transformer levels t1..t4
  (``-4,-3,-2,-1``: Table VIII's best), not the full-resolution conv block on the input (MONAI's
  encoder1) that ``network.encoder`` also returns. On every other architecture "all": one head per
  level ``network.encoder`` returns (nnU-Net's U-Nets: every encoder stage), the closest reading of
  "all hierarchical levels" for a backbone the paper did not test;
- ``unetr_pp``: Assumption (the paper gives only "200 epochs, lr 1e-4" for step 1; the authors'
  UNETR++ code, ``unetr_pp_trainer_synapse.py`` and ``init_train_val_synapse.sh``, gives the rest):
  mask patches of a fixed 4³ (``mask_patch_size`` = 4,4,4, ``mask_patch_scaling`` = false, not 16³
  scaled to 11x21x21 at 64x128x128); SGD (momentum 0.99, Nesterov) with lr 1e-4, weight decay 3e-5
  (nnU-Net v1's, which the authors' trainer inherits), poly decay without warm-up, gradient norm
  clipped at 12;
- ``unetr``: Assumption: a warm-up of 50 of 800 epochs (``warmup_fraction`` = 0.0625), the authors'
  UNETR code (``main.py``: AdamW lr 1e-4, weight decay 1e-5, linear warm-up then cosine; mask 16³ at
  96³ and ratio 0.4 in ``init_train_test.sh``, as the paper's Fig. 4).

Assumptions (the paper does not say; each is a config field):
- masked voxels are set to ``mask_value`` = 0 (the normalized intensity nnU-Net pads with; the paper
  only says "random masking"); an exact share of the grid patches is masked (MAE-style);
- a level with more depth positions than slabs is averaged over the positions of each slab (the
  paper's UNETR has depth D / 16 at every level, one position per slab);
- ``slab_level`` = None: when the bottleneck keeps a single depth position (B = 1, e.g. a 32-deep crop
  of a network that downsamples depth 32-fold), B is taken from the deepest level that keeps >= 2,
  and the chosen levels below it (which cannot tell slabs apart) are left out of the order loss,
  with a warning; ``--set slab_level=-1`` insists on the bottleneck (and refuses such a crop);
- schedule (all but ``unetr_pp``): the paper gives only lr 1e-4 (§IV-C, for UNETR++); AdamW, weight
  decay 1e-5 and a linear warm-up then cosine are the authors' UNETR code (and UNETR's own recipe,
  nnsslTrainer_UNETR), the warm-up ``warmup_fraction`` = 5 % of the run (as hybrid_mim);
  ``iterations`` = 50k (UNETR++'s 200 step-1 epochs of 250 nnU-Net iterations), batch 2 (UNETR++,
  Table V), no gradient clipping.
"""
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.spec import probe_level_shapes
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, SSLMethod, check_common_fields, float32_loss
from nnssl.transforms.slab_shuffle import shuffle_and_mask


@dataclass
class OrderReconstructionConfig:
    """Paper defaults (§III-B, §IV-E, Fig. 4); override with ``--set key=value``."""

    # transformation module
    mask_ratio: float = 0.4  # Fig. 4(a)
    mask_patch_size: Tuple[int, int, int] = (16, 16, 16)  # Fig. 4(b), for reference_crop; scaled per axis
    reference_crop: Tuple[int, int, int] = (96, 96, 96)
    mask_patch_scaling: bool = True  # false: mask_patch_size as it is, at any crop (UNETR++: 4³, Assumption)
    mask_value: float = 0.0  # Assumption: see the module docstring
    # order prediction: "all" (one head per encoder level) or encoder level indices, 0 = highest
    # resolution, negative from the bottleneck (Table VIII's "t4" alone is --set order_levels=-1);
    # unetr / unetr_pp default to their transformer levels t1..t4 (Table VIII's best), see default_config
    order_levels: str = "all"
    # Assumption (fallback): level whose depth is B; None = the bottleneck, or the deepest level with
    # depth >= 2 when the bottleneck has depth 1 (see the module docstring)
    slab_level: Optional[int] = None
    # set by configure() from the network (a --set value must agree with it)
    num_slabs: Optional[int] = None  # B
    input_channels: Optional[int] = None  # channels of the crops = output channels of the network
    # loss, eq. 9 (weight_cls = 1 / B turns eq. 7's sum over positions into a mean)
    weight_cls: float = 1.0
    weight_rec: float = 1.0
    # fine-tuning hand-over: the whole network (only the output conv differs)
    transfer: str = "encoder+decoder"
    grad_clip: Optional[float] = None  # Assumption: the paper names no clipping
    # pretraining schedule: the paper gives lr 1e-4 only; the rest is an Assumption (module docstring)
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"
    iterations: int = 50_000
    warmup_fraction: float = 0.05
    warmup_iterations: Optional[int] = None  # absolute warm-up; None = warmup_fraction of the run
    batch_size: int = 2
    # which backbone's defaults default_config applied ("generic", "unetr", "unetr_pp"); a record, not a switch
    backbone_defaults: str = "generic"

    def __post_init__(self):
        for name in ("mask_patch_size", "reference_crop"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 1:
                raise NnsslError(f"order_reconstruction: {name}={value} must be three positive integers (D, H, W); "
                                 f"fix it with --set {name}=D,H,W.")
            setattr(self, name, value)
        checks = [(0 <= self.mask_ratio < 1, "mask_ratio must be in [0, 1) (paper: 0.4)"),
                  (self.weight_cls >= 0 and self.weight_rec >= 0, "weight_cls and weight_rec must be >= 0 (paper: 1)")]
        for ok, msg in checks:
            if not ok:
                raise NnsslError(f"order_reconstruction: {msg}; fix it with --set key=value.")
        parse_levels(self.order_levels)
        check_common_fields("order_reconstruction", self)


# Per-backbone defaults (module docstring, "Defaults per backbone"). Table VIII's best order heads are
# the four transformer levels t1..t4, the last four levels of both encoders (the first is the conv block).
TRANSFORMER_LEVELS = "-4,-3,-2,-1"
BACKBONE_DEFAULTS: Dict[str, Dict[str, object]] = {
    # Assumption: the authors' UNETR code, 50 warm-up epochs of 800
    "unetr": {"order_levels": TRANSFORMER_LEVELS, "warmup_fraction": 50 / 800},
    # Assumption: the authors' UNETR++ code (mask patch 4, SGD 0.99 Nesterov, poly, clip 12; nnU-Net v1's 3e-5)
    "unetr_pp": {"order_levels": TRANSFORMER_LEVELS, "mask_patch_size": (4, 4, 4), "mask_patch_scaling": False,
                 "optimizer": "sgd", "lr": 1e-4, "weight_decay": 3e-5, "lr_schedule": "poly",
                 "warmup_fraction": 0.0, "grad_clip": 12.0},
}


def parse_levels(spec: str) -> Optional[List[int]]:
    """``"all"`` -> None; ``"-2,-1"`` -> [-2, -1]; anything else: NnsslError."""
    if str(spec).strip().lower() == "all":
        return None
    try:
        levels = [int(p) for p in str(spec).split(",") if p.strip()]
    except ValueError:
        levels = []
    if not levels:
        raise NnsslError(f"order_reconstruction: order_levels={spec!r} must be 'all' or comma-separated encoder level "
                         f"indices (0 = highest resolution, -1 = bottleneck); e.g. --set order_levels=all.")
    return levels


def slab_layout(depths: Sequence[int], crop_depth: int, slab_level: Optional[int],
                order_levels: str) -> Tuple[int, List[int]]:
    """(B, levels): the slab count and the encoder levels (non-negative indices) that predict the order.

    depths: D_i of every encoder level (highest resolution first). B = the depth of the slab level
    (``slab_level``, or None: the bottleneck, else the deepest level with depth >= 2, and then the chosen
    levels below that one are left out, as long as one chosen level remains). NnsslError when
    the crop depth does not split into B >= 2 slabs that line up with every chosen level's positions.
    """
    n = len(depths)
    if slab_level is None:
        deep_enough = [i for i in range(n) if depths[i] >= 2]
        idx = deep_enough[-1] if deep_enough else n - 1
    elif -n <= slab_level < n:
        idx = slab_level % n
    else:
        raise NnsslError(f"order_reconstruction: slab_level={slab_level} but the encoder has {n} levels (0..{n - 1} or "
                         f"-{n}..-1); fix it with --set slab_level=-1 (the bottleneck, the paper's choice).")
    b = depths[idx]
    where = f"encoder level {idx - n} ({'the bottleneck' if idx == n - 1 else f'{idx} from the top'})"
    if b < 2:
        raise NnsslError(
            f"order_reconstruction: a crop depth of {crop_depth} cannot be split into B >= 2 slabs: {where} keeps {b} "
            f"depth position, i.e. the encoder downsamples depth at least {crop_depth}-fold there (B = D / P_dm). "
            f"The crop is the plans' patch_size: use a patch depth that is a multiple of P_dm and at least 2 x P_dm "
            f"(here >= {2 * crop_depth}), or let a shallower level define the slabs (--set slab_level=-2).")
    if crop_depth % b:
        raise NnsslError(
            f"order_reconstruction: a crop depth of {crop_depth} is not a multiple of the encoder's depth downsampling "
            f"at {where} (it keeps {b} positions, {crop_depth / b:.3g} slices each), so it cannot be split into "
            f"equal slabs. Use a patch depth (plans' patch_size) that is a multiple of that downsampling and at least "
            f"twice it.")
    chosen = parse_levels(order_levels)
    if chosen is None:
        levels = list(range(idx + 1))  # every level that can tell the slabs apart
    else:
        bad = [lv for lv in chosen if not -n <= lv < n]
        if bad:
            raise NnsslError(f"order_reconstruction: order_levels={order_levels!r} names levels {bad}, but the encoder "
                             f"has {n} (0..{n - 1} or -{n}..-1); fix it with --set order_levels=all.")
        levels = sorted({lv % n for lv in chosen})
        if slab_level is None and any(lv <= idx for lv in levels):
            # the fallback: the chosen levels below the slab level keep fewer than B positions and sit out
            levels = [lv for lv in levels if lv <= idx]
    for lv in levels:
        if depths[lv] < b or depths[lv] % b:
            raise NnsslError(
                f"order_reconstruction: encoder level {lv} has {depths[lv]} depth positions, which do not line up "
                f"with the B = {b} slabs (it needs a multiple of {b}); leave it out with --set order_levels=... "
                f"(levels 0..{idx} can take part).")
    return b, levels


def slab_pool(features: torch.Tensor, num_slabs: int) -> torch.Tensor:
    """features [N, C, D, H, W] -> [N, B, C]: mean over H and W per depth position, then over the D / B
    positions of each slab along D (the axis the slabs were shuffled along)."""
    n, c, d = features.shape[:3]
    return features.mean(dim=(3, 4)).reshape(n, c, num_slabs, d // num_slabs).mean(dim=3).transpose(1, 2)


class SlabOrderHead(nn.Module):
    """One level's order classifier: features [N, C, D_i, H_i, W_i] -> logits [N, B, B] (position, class)."""

    def __init__(self, channels: int, num_slabs: int):
        super().__init__()
        self.num_slabs = int(num_slabs)
        self.linear = nn.Linear(channels, self.num_slabs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(slab_pool(features, self.num_slabs))


def _paint_order(order: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """order [B] -> float32 [D, H, W]: every voxel of slab position j holds order[j] (its original index)."""
    per_slice = np.repeat(np.asarray(order, np.float32), shape[0] // len(order))
    return np.broadcast_to(per_slice[:, None, None], tuple(shape)).copy()


def _mark_slabs(volume: np.ndarray, num_slabs: int) -> np.ndarray:
    """A copy of volume [D, H, W] with ticks (the outer eighth of W on both sides, brighter than any voxel)
    on the last slice of every slab but the final one, so the coronal view shows the slab boundaries."""
    out = np.array(volume, dtype=np.float32)
    d, w = out.shape[0], out.shape[2]
    lo, hi = float(out.min()), float(out.max())
    tick, top = max(1, w // 8), hi + max(0.2 * (hi - lo), 1e-3)
    for j in range(1, num_slabs):
        out[j * d // num_slabs - 1, :, :tick] = top
        out[j * d // num_slabs - 1, :, w - tick:] = top
    return out


@METHODS.register("order_reconstruction")
class OrderReconstruction(SSLMethod):
    """Batch: ``data`` [N, C, D, H, W] float32 (shuffled, masked crops), ``target`` [N, C, D, H, W] float32
    (shuffled, unmasked), ``order`` int64 [N, B] (original slab index of each position)."""

    name = "order_reconstruction"
    config_class = OrderReconstructionConfig
    transfer = OrderReconstructionConfig.transfer
    requires = frozenset({"levels"})

    def __init__(self, cfg: OrderReconstructionConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        if cfg.num_slabs is None:
            raise RuntimeError("order_reconstruction: cfg.num_slabs is unset; call OrderReconstruction.configure(cfg, "
                               "build_network, crop_size, input_channels) first (the engine does).")
        shapes = probe_level_shapes(network, self.patch_size, num_input_channels)
        b, self.levels = slab_layout([s[1] for s in shapes], self.patch_size[0], cfg.slab_level, cfg.order_levels)
        if b != cfg.num_slabs:
            raise RuntimeError(f"order_reconstruction: this network gives B = {b} slabs, the config says {cfg.num_slabs}")
        self.heads = nn.ModuleList([SlabOrderHead(shapes[lv][0], b) for lv in self.levels])

    @classmethod
    def default_config(cls, architecture: str) -> OrderReconstructionConfig:
        """The paper's defaults, with the per-backbone ones of :data:`BACKBONE_DEFAULTS` on ``unetr`` /
        ``unetr_pp`` (module docstring, "Defaults per backbone")."""
        if architecture not in BACKBONE_DEFAULTS:
            return OrderReconstructionConfig()
        return OrderReconstructionConfig(**BACKBONE_DEFAULTS[architecture], backbone_defaults=architecture)

    @classmethod
    def network_output_channels(cls, cfg: OrderReconstructionConfig) -> int:
        # 1 only for configure()'s probe network, whose encoder shapes do not depend on it
        return cfg.input_channels or 1

    @classmethod
    def configure(cls, cfg: OrderReconstructionConfig, build_network: Callable[[], nn.Module],
                  crop_size: Sequence[int], num_input_channels: int) -> OrderReconstructionConfig:
        """Set ``num_slabs`` (B, from one encoder pass of the run's network on a zero crop) and
        ``input_channels``; NnsslError for a crop depth that does not split into B >= 2 slabs."""
        with torch.random.fork_rng(devices=[]):  # building the probe leaves the global torch RNG as it was
            network = build_network()
        depths = [s[1] for s in probe_level_shapes(network, crop_size, num_input_channels)]
        b, levels = slab_layout(depths, int(crop_size[0]), cfg.slab_level, cfg.order_levels)
        for name, mine, given in (("num_slabs", b, cfg.num_slabs), ("input_channels", num_input_channels,
                                                                     cfg.input_channels)):
            if given is not None and given != mine:
                raise NnsslError(f"order_reconstruction: --set {name}={given}, but this network and data give {mine}; "
                                 f"{name} is derived from them, drop the --set.")
        n = len(depths)
        asked = parse_levels(cfg.order_levels)
        left_out = sorted(set(range(n) if asked is None else {lv % n for lv in asked}) - set(levels))
        if left_out:
            warnings.warn(f"order_reconstruction: the bottleneck keeps {depths[-1]} depth position(s) of the "
                          f"{crop_size[0]}-deep crop, so B = {b} slabs come from encoder level {levels[-1]} and levels "
                          f"{left_out} take no part in order prediction (the paper's B = D / P_dm needs a crop depth "
                          f"of at least twice the encoder's depth downsampling).")
        return dataclasses.replace(cfg, num_slabs=b, input_channels=int(num_input_channels))

    @classmethod
    def _transform(cls, cfg: OrderReconstructionConfig, images: np.ndarray, rng: np.random.Generator):
        if cfg.num_slabs is None:
            raise RuntimeError("order_reconstruction: cfg.num_slabs is unset; the config must come from configure().")
        return shuffle_and_mask(images, rng, cfg.num_slabs, cfg)

    @classmethod
    def make_batch(cls, cfg: OrderReconstructionConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [N, C, D, H, W] float32 normalized crops -> {"data", "target", "order"} (meta unused)."""
        masked, aux = cls._transform(cfg, images, rng)
        return {"data": torch.from_numpy(masked), "target": torch.from_numpy(aux["target"]),
                "order": torch.from_numpy(aux["order"])}

    @classmethod
    def _panels(cls, masked: np.ndarray, target: np.ndarray, order: np.ndarray) -> List[Tuple[str, np.ndarray]]:
        b = len(order)
        return [(f"input, slabs {order.tolist()}", _mark_slabs(masked, b)),
                ("target: shuffled, unmasked", target),
                (f"order label per position (B = {b})", _paint_order(order, target.shape))]

    @classmethod
    def preview(cls, cfg: OrderReconstructionConfig, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Sample 0, channel 0: the shuffled, masked input with slab-boundary ticks (title: the original index
        of the slab at each position), the reconstruction target, the order label map."""
        return cls._panels(batch["data"][0, 0].numpy(), batch["target"][0, 0].numpy(), batch["order"][0].numpy())

    @classmethod
    def preview_from_images(cls, cfg: OrderReconstructionConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: the original crop (with slab ticks), then :meth:`preview`'s panels and the voxel mask;
        same draws as :meth:`make_batch` for the same rng state."""
        masked, aux = cls._transform(cfg, images, rng)
        original = ("original, ticks = slab ends", _mark_slabs(images[0, 0], cfg.num_slabs))
        mask = ("mask (1 = masked)", aux["mask"][0].astype(np.float32))
        return [original] + cls._panels(masked[0, 0], aux["target"][0, 0], aux["order"][0]) + [mask]

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"cls", "rec", "loss"}: eq. 7 (CE summed over the chosen levels and the slab positions,
        mean over the batch), eq. 8 (MSE over every voxel and channel), eq. 9 (their weighted sum).

        The engine builds the network without deep supervision; a list output contributes its first
        (full-resolution) entry only."""
        features = network.encoder(batch["data"])
        out = network.decoder(features)
        if isinstance(out, (list, tuple)):
            out = out[0]
        all_logits = [head(features[lv]) for lv, head in zip(self.levels, self.heads)]  # each [N, B, B]
        order = batch["order"].long()
        with float32_loss(out):
            rec = F.mse_loss(out.float(), batch["target"].float())
            cls = out.new_zeros((), dtype=torch.float32)
            for logits in all_logits:
                cls = cls + F.cross_entropy(logits.float().flatten(0, 1), order.flatten(), reduction="sum")
            cls = cls / order.shape[0]
            loss = self.cfg.weight_cls * cls + self.cfg.weight_rec * rec
        return {"cls": cls, "rec": rec, "loss": loss}
