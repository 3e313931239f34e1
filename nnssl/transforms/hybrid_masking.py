"""HybridMIM's two-level masking and its centred reconstruction region (paper 002 §III-A/B, SPEC §7.4).

First level: the crop is divided into non-overlapping sub-volumes (32³: R = 27 at a 96³ crop, 64
at 128³); second level: each sub-volume into its patches (16³, the 2x2x2 = 8 halves). Patches are
masked at random (ratio 0.4) and their voxels set to 0. For every sub-volume the masking is
summarised by its locations (one bit per patch, in raster order (d, h, w) of the patches *within
the sub-volume*) and their count (0-8). The published code groups the patch bits by raster index
over the whole crop (8 consecutive patches of the patch grid, which straddle sub-volumes); here
they are grouped by sub-volume, as the paper describes (``group_by_sub_volume``).

Sizes follow the crop: R is however many whole sub-volumes fit. An axis shorter than a sub-volume
gets a single sub-volume spanning it, split into the same number of patches (Swin's window-shrink
rule; e.g. a 16-voxel axis has 8-voxel patches), so tiny test crops work; any other crop axis must
be a multiple of the sub-volume (:func:`mask_geometry` names the valid sizes).

Randomness is drawn first (:func:`draw_patch_mask`: a boolean patch grid) and applied second
(:func:`apply_patch_mask`), so tests can hand in fixed masks.
"""
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError

Triple = Tuple[int, int, int]
SAMPLING = ("exact", "bernoulli")


@dataclass(frozen=True)
class MaskGeometry:
    """Sub-volume and patch sizes (voxels) actually used for a crop."""

    crop: Triple
    sub_volume: Triple
    patch: Triple

    @property
    def grid(self) -> Triple:
        """Sub-volumes per axis (R = their product)."""
        return tuple(c // s for c, s in zip(self.crop, self.sub_volume))

    @property
    def split(self) -> Triple:
        """Patches per sub-volume per axis (2, 2, 2 by default)."""
        return tuple(s // p for s, p in zip(self.sub_volume, self.patch))

    @property
    def patch_grid(self) -> Triple:
        """Patches per axis over the whole crop."""
        return tuple(g * s for g, s in zip(self.grid, self.split))

    @property
    def n_sub_volumes(self) -> int:
        return int(np.prod(self.grid))

    @property
    def patches_per_sub_volume(self) -> int:
        return int(np.prod(self.split))


def mask_geometry(crop: Sequence[int], sub_volume: Sequence[int], patch: Sequence[int]) -> MaskGeometry:
    """The geometry for ``crop`` (D, H, W) with the configured ``sub_volume`` and ``patch`` sizes.

    NnsslError (naming the valid sizes) when a crop axis is neither shorter than the sub-volume nor
    a multiple of it, or when a sub-volume is not a whole number of patches.
    """
    crop, sub_volume, patch = (tuple(int(v) for v in t) for t in (crop, sub_volume, patch))
    if any(len(t) != 3 for t in (crop, sub_volume, patch)) or min(crop + sub_volume + patch) < 1:
        raise NnsslError(f"hybrid_mim: crop {crop}, sub_volume_size {sub_volume} and patch_size {patch} must be "
                         f"three positive integers each (D, H, W).")
    subs, patches = [], []
    for axis, (c, s, p) in enumerate(zip(crop, sub_volume, patch)):
        if s % p:
            raise NnsslError(f"hybrid_mim: sub_volume_size {sub_volume} is not a whole number of patch_size {patch} "
                             f"patches along axis {axis}; fix it with --set sub_volume_size=32,32,32 "
                             f"--set patch_size=16,16,16 (the paper's sizes).")
        split = s // p
        if c < s:  # one sub-volume spanning the axis, same split
            if c % split:
                raise NnsslError(f"hybrid_mim: crop axis {axis} has {c} voxels, shorter than a sub-volume ({s}), so "
                                 f"it is one sub-volume of {split} patches, which needs a multiple of {split}. "
                                 f"Valid sizes along this axis: multiples of {split} below {s}, or multiples of {s}.")
            subs.append(c)
            patches.append(c // split)
        elif c % s:
            lo, hi = c // s * s, (c // s + 1) * s
            raise NnsslError(f"hybrid_mim: crop {crop} is not divisible into whole sub-volumes of {sub_volume} along "
                             f"axis {axis} ({c} voxels). Valid sizes along this axis: multiples of {s} (nearest: "
                             f"{lo} or {hi}) or, as one sub-volume, multiples of {split} below {s}. Set the crop with "
                             f"--set crop_size=D,H,W (the paper: 96,96,96) or change sub_volume_size.")
        else:
            subs.append(s)
            patches.append(p)
    return MaskGeometry(crop, tuple(subs), tuple(patches))


def draw_patch_mask(rng: np.random.Generator, geometry: MaskGeometry, ratio: float,
                    sampling: str = "exact") -> np.ndarray:
    """bool [P0, P1, P2] over the patch grid, True = masked.

    ``"exact"``: round(ratio * n_patches) patches chosen uniformly without replacement (SimMIM/MAE
    style); ``"bernoulli"``: every patch masked independently with probability ``ratio``.
    """
    n = int(np.prod(geometry.patch_grid))
    if sampling == "exact":
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:int(math.floor(ratio * n + 0.5))]] = True
    elif sampling == "bernoulli":
        mask = rng.random(n) < ratio
    else:
        raise NnsslError(f"hybrid_mim: mask_sampling '{sampling}' must be one of {SAMPLING}.")
    return mask.reshape(geometry.patch_grid)


def group_by_sub_volume(patch_mask: np.ndarray, geometry: MaskGeometry) -> np.ndarray:
    """patch_mask: bool [..., P0, P1, P2] -> locations bool [..., R, K].

    Row r is sub-volume r in raster order of the sub-volume grid; column k is patch k in raster order
    (d, h, w) of the patches inside that sub-volume.
    """
    (g0, g1, g2), (s0, s1, s2) = geometry.grid, geometry.split
    lead = patch_mask.shape[:-3]
    m = patch_mask.reshape(*lead, g0, s0, g1, s1, g2, s2)
    n = len(lead)
    m = m.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    return m.reshape(*lead, g0 * g1 * g2, s0 * s1 * s2)


def voxel_mask(patch_mask: np.ndarray, geometry: MaskGeometry) -> np.ndarray:
    """patch_mask: bool [..., P0, P1, P2] -> bool [..., D, H, W] (each patch painted over its voxels)."""
    out = patch_mask
    for axis, size in enumerate(geometry.patch):
        out = np.repeat(out, size, axis=out.ndim - 3 + axis)
    return out


def apply_patch_mask(images: np.ndarray, patch_masks: np.ndarray, geometry: MaskGeometry,
                     value: float = 0.0) -> np.ndarray:
    """images: [B, C, D, H, W] float; patch_masks: bool [B, P0, P1, P2] -> masked copy (every channel)."""
    b, c = images.shape[:2]
    (q0, q1, q2), (p0, p1, p2) = geometry.patch_grid, geometry.patch
    view = images.reshape(b, c, q0, p0, q1, p1, q2, p2)
    hit = patch_masks[:, None, :, None, :, None, :, None]
    return np.where(hit, np.asarray(value, dtype=images.dtype), view).reshape(images.shape)


def hybrid_mask(images: np.ndarray, rng: np.random.Generator, geometry: MaskGeometry, ratio: float,
                value: float = 0.0, sampling: str = "exact"):
    """The two-level masking of a batch. images: [B, C, D, H, W] (spatial = ``geometry.crop``) ->

    (masked [B, C, D, H, W], patch_masks bool [B, P0, P1, P2], counts uint8 [B, R] (0..K),
    locations bool [B, R, K]). One patch mask is drawn per sample, in batch order.
    """
    if tuple(images.shape[2:]) != geometry.crop:
        raise ValueError(f"images of spatial shape {tuple(images.shape[2:])} do not match the geometry's crop "
                         f"{geometry.crop}")
    patch_masks = np.stack([draw_patch_mask(rng, geometry, ratio, sampling) for _ in range(images.shape[0])])
    locations = group_by_sub_volume(patch_masks, geometry)
    counts = locations.sum(axis=-1).astype(np.uint8)
    return apply_patch_mask(images, patch_masks, geometry, value), patch_masks, counts, locations


def default_region(geometry: MaskGeometry) -> Triple:
    """The paper's reconstruction region: the crop less one sub-volume per axis (64³ for a 96³ crop,
    96³ for 128³: its two settings); an axis with a single sub-volume is kept whole."""
    return tuple(c - s if g > 1 else c for c, s, g in zip(geometry.crop, geometry.sub_volume, geometry.grid))


def check_region(crop: Sequence[int], region: Sequence[int], alignment: Sequence[int]) -> None:
    """NnsslError unless every region axis is in [1, crop] and a multiple of the network's coarsest stride
    ``alignment`` (the decoder runs on encoder levels cropped to the region by whole voxels)."""
    for axis, (c, r, a) in enumerate(zip(crop, region, alignment)):
        if not 1 <= r <= c:
            raise NnsslError(f"hybrid_mim: region_size {tuple(region)} is larger than the crop {tuple(crop)} along "
                             f"axis {axis} (or < 1); the reconstruction region must fit in the crop. Set "
                             f"--set region_size=D,H,W (the paper: 64,64,64 for a 96³ crop) or leave it unset.")
        if r % a or c % a:
            raise NnsslError(f"hybrid_mim: region_size {tuple(region)} along axis {axis} ({r}) is not a multiple of "
                             f"the network's coarsest stride {a} (the decoder runs on encoder levels cropped to the "
                             f"region by whole voxels). Valid region sizes along this axis: "
                             f"{', '.join(str(v) for v in range(a, c + 1, a))}.")


def region_offsets(crop: Sequence[int], region: Sequence[int], alignment: Sequence[int],
                   coin: Sequence[float]) -> Triple:
    """Start of the reconstruction region per axis: the centred start (crop - region) / 2 when it is a
    multiple of ``alignment``; otherwise (it then lies half-way between two multiples, crop and region
    being multiples) the lower one if coin < 0.5, else the upper one, so the region is centred in
    expectation. ``coin``: 3 uniform [0, 1) draws (made in ``make_batch``)."""
    out = []
    for c, r, a, u in zip(crop, region, alignment, coin):
        centre = (c - r) / 2
        lo = int(centre // a) * a
        out.append(lo if lo == centre or u < 0.5 else lo + a)
    return tuple(out)
