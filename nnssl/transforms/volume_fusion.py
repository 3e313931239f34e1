"""Volume Fusion (MIS-FM, paper 004, Algorithm 1): fuse two crops through a box-painted label map.

Random parameters are drawn first (:func:`draw_fusion_boxes`, a few small arrays) and applied
second (:func:`paint_label_map`, :func:`fuse`), so tests can hand in fixed draws.

Speed: fusion is pure memory traffic, so it is done without float64, without per-voxel
lookups and without whole-volume temporaries: the integer label map is painted by slicing,
and the fused volume is produced slab by slab with two single-pass kernels per slab
(α = label / K, then ``lerp(bg, fg, α)``), so the α slab stays in cache.

Before fusion (paper Algorithm 1, authors' code; SPEC §7.1): background and foreground are
crops of two different scans (:func:`draw_fusion_cases` picks the loader's cases so that
sample i and sample (i + 1) % B never share one), and each crop is flipped at random along
each of the three axes (:func:`draw_flips`, :func:`flip_crops`). Voxels where either crop is
padding carry no loss: their label becomes ``K + 1`` (:func:`ignore_outside`), which the loss
skips.

``cfg`` below is any object with the fields of
:class:`nnssl.ssl.volume_fusion.VolumeFusionConfig` (``K, min_boxes, max_boxes,
box_size_min, box_size_max, reference_patch, flip_prob``).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnssl.errors import NnsslError

# Voxels per channel fused in one slab: 256k float32 = 1 MiB, small enough for the α slab and
# the operands to stay in L2/L3 between the two kernels (benchmarked: 8-32 slices of 128x128
# are equally fast, whole volumes ~20% slower).
_SLAB_VOXELS = 1 << 18


@dataclass(frozen=True)
class FusionDraw:
    """The random parameters of one fusion map.

    bounds: [M, 6] int64, each row ``(d0, h0, w0, d1, h1, w1)``: box ``[d0:d1, h0:h1, w0:w1]``,
        already clipped to the volume; painted in row order, so later boxes overwrite earlier ones.
    labels: [M] uint8 in 1..K, the class (α = label / K) of each box.
    """

    bounds: np.ndarray
    labels: np.ndarray


def scaled_box_size_range(shape: Sequence[int], cfg) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Inclusive box-size bounds (lo, hi), 3 ints each, for a patch ``shape`` (D, H, W).

    The paper's ranges (8..40, 8..80, 8..80) are for a 64x128x128 patch; they are scaled per
    axis by shape / reference_patch and rounded half up (floor(x + 0.5)), at least 1.
    Example: 32x64x64 -> 4..20, 4..40, 4..40.
    """
    def scale(sizes):
        return tuple(max(1, math.floor(v * s / r + 0.5)) for v, s, r in zip(sizes, shape, cfg.reference_patch))

    return scale(cfg.box_size_min), scale(cfg.box_size_max)


def draw_fusion_boxes(rng: np.random.Generator, shape: Sequence[int], cfg) -> FusionDraw:
    """Draw M ~ U{min_boxes..max_boxes} boxes for a volume ``shape`` (D, H, W).

    Each box: size ~ U{lo..hi} per axis (see :func:`scaled_box_size_range`), centre c uniform
    over the voxels, extent ``[c - size // 2, c - size // 2 + size)`` clipped to the volume
    (so a clipped box keeps at least ceil(size / 2) voxels per axis), class k ~ U{1..K}.
    The 7 numbers of every box come from one ``rng.random((M, 7))`` call (floor(u·n) with
    u ~ U[0, 1) is uniform on 0..n-1): a handful of small array operations, no per-box Python.
    """
    lo, hi = scaled_box_size_range(shape, cfg)
    m = int(rng.integers(cfg.min_boxes, cfg.max_boxes, endpoint=True))
    # Columns: size - lo (3), centre (3), class - 1; n = number of values of each column.
    n = np.array([h - l + 1 for l, h in zip(lo, hi)] + list(shape) + [cfg.K], np.float64)
    v = (rng.random((m, 7)) * n).astype(np.int64)
    sizes = v[:, 0:3] + lo
    start = v[:, 3:6] - sizes // 2
    bounds = np.concatenate([np.maximum(start, 0), np.minimum(start + sizes, tuple(shape))], axis=1)
    labels = (v[:, 6] + 1).astype(np.uint8)
    return FusionDraw(bounds=bounds, labels=labels)


def paint_label_map(draw: FusionDraw, shape: Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map [D, H, W] uint8: 0 outside every box, else the label of the last box covering it."""
    if out is None:
        out = np.empty(tuple(shape), np.uint8)
    out.fill(0)
    for (d0, h0, w0, d1, h1, w1), k in zip(draw.bounds.tolist(), draw.labels.tolist()):
        out[d0:d1, h0:h1, w0:w1] = k
    return out


def fuse(bg: np.ndarray, fg: np.ndarray, label: np.ndarray, K: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """X = α·fg + (1 − α)·bg with α = label / K, in float32.

    bg, fg: [..., D, H, W] float32 (leading channel axes share one α map);
    label: [D, H, W] integer in 0..K; out: like bg, may be ``bg`` itself (in-place fusion).
    The target of the pretext task is ``label`` itself (round(α·K) == label by construction).

    Computed as ``torch.lerp(bg, fg, α)`` on zero-copy views, i.e. bg + α·(fg − bg) (for
    α ≥ 0.5 as fg − (1 − α)·(fg − bg)), which makes label 0 give bg and label K give fg
    exactly.
    """
    if out is None:
        out = np.empty_like(bg)
    t_bg, t_fg, t_out = torch.from_numpy(bg), torch.from_numpy(fg), torch.from_numpy(out)
    t_label = torch.from_numpy(label)
    depth, slab_voxels = label.shape[0], int(np.prod(label.shape[1:]))
    step = max(1, _SLAB_VOXELS // max(1, slab_voxels))
    alpha = torch.empty((min(step, depth),) + tuple(label.shape[1:]), dtype=torch.float32)
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        a = alpha[: z1 - z0]
        torch.div(t_label[z0:z1], float(K), out=a)
        torch.lerp(t_bg[..., z0:z1, :, :], t_fg[..., z0:z1, :, :], a, out=t_out[..., z0:z1, :, :])
    return out


def _check_batch_size(b: int) -> None:
    if b < 2:
        raise ValueError(
            "Volume Fusion needs a batch of at least 2 crops: the foreground of sample i is "
            f"sample (i + 1) % B, and a batch of {b} has no second scan to fuse with."
        )


def draw_fusion_cases(rng: np.random.Generator, n_cases: int, batch_size: int) -> np.ndarray:
    """Case indices [B] for a batch whose sample i is fused with sample (i + 1) % B: never the same scan.

    The cases are a random permutation of all ``n_cases`` tiled to length B, so with
    n_cases >= B all B cases are distinct, and with fewer every case is used ⌊B / n⌋ or
    ⌈B / n⌉ times and neighbours differ. Where the tiling would pair the last sample with the
    first one's scan (B - 1 a multiple of n), the last sample takes the permutation's second
    case instead (n >= 3). Two cases and an odd batch cannot be paired: NnsslError.
    """
    _check_batch_size(batch_size)
    if n_cases < 2:
        raise NnsslError(f"volume_fusion fuses crops of two different scans, but the pretraining data holds "
                         f"{n_cases} case(s). Add pretraining volumes (-pd) so there are at least 2.")
    perm = rng.permutation(n_cases)
    cases = perm[np.arange(batch_size) % n_cases]
    if (batch_size - 1) % n_cases == 0:
        if n_cases == 2:
            raise NnsslError(f"volume_fusion pairs sample i with sample (i + 1) % B; with 2 pretraining cases a "
                             f"batch of {batch_size} (per process) must pair a scan with itself. Use an even "
                             f"--batch_size or add pretraining volumes.")
        cases[-1] = perm[1]
    return cases


def draw_flips(rng: np.random.Generator, batch_size: int, prob: float) -> np.ndarray:
    """bool [B, 3]: flip sample b along spatial axis a (D, H, W), each with probability ``prob``."""
    return rng.random((batch_size, 3)) < prob


def flip_crops(images: np.ndarray, regions: Optional[np.ndarray],
               flips: np.ndarray) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
    """Apply ``flips`` [B, 3] to images [B, C, D, H, W] and to regions [B, 3, 2] (the half-open box of
    each crop that holds image data, see :func:`apply_fusion`; None = no padding).

    Returns the B crops [C, D, H, W] as a list (a flipped copy, or a view of ``images`` where no
    axis flips: the inputs are never modified) and the new regions; on an axis of size n a flip
    maps [lo, hi) to [n - hi, n - lo). (torch.flip: ~4x faster than copying numpy's reversed views.)
    """
    spatial = np.array(images.shape[2:])
    if regions is not None:
        regions = np.array(regions, dtype=np.int64, copy=True)
    crops = []
    for i, f in enumerate(flips):
        dims = [int(a) + 1 for a in np.flatnonzero(f)]  # +1: skip the channel axis of images[i]
        crops.append(torch.flip(torch.from_numpy(images[i]), dims).numpy() if dims else images[i])
        if regions is not None:
            regions[i, f] = spatial[f][:, None] - regions[i, f][:, ::-1]
    return crops, regions


def ignore_outside(label: np.ndarray, region: np.ndarray, ignore: int) -> None:
    """Set ``label`` [D, H, W] to ``ignore`` outside the half-open box ``region`` [3, 2], in place."""
    for ax, (lo, hi) in enumerate(np.asarray(region).tolist()):
        index = [slice(None)] * 3
        index[ax] = slice(0, max(lo, 0))
        label[tuple(index)] = ignore
        index[ax] = slice(max(hi, 0), None)
        label[tuple(index)] = ignore


def apply_fusion(images: Sequence[np.ndarray], draws: List[FusionDraw], K: int,
                 regions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fuse every sample with the next one (roll by one) using the given draws.

    images: [B, C, D, H, W] float32, or a list of B crops [C, D, H, W] (not modified), B >= 2;
    draws: B draws, one per sample;
    regions: optional [B, 3, 2] half-open boxes of the crop voxels that hold image data (the rest
    is padding). Returns fused [B, C, D, H, W] float32 (sample i = fusion of background i and
    foreground (i + 1) % B) and labels [B, 1, D, H, W] uint8 in 0..K, and K + 1 (no loss) where
    background or foreground is padding: there α cannot be told from the fused intensity.
    """
    b = len(images)
    _check_batch_size(b)
    if len(draws) != b:
        raise ValueError(f"apply_fusion got {len(draws)} draws for a batch of {b} samples")
    spatial = images[0].shape[1:]
    fused = np.empty((b,) + tuple(images[0].shape), np.float32)
    labels = np.empty((b, 1) + tuple(spatial), np.uint8)
    for i, draw in enumerate(draws):
        j = (i + 1) % b
        paint_label_map(draw, spatial, out=labels[i, 0])
        fuse(images[i], images[j], labels[i, 0], K, out=fused[i])
        if regions is not None:  # after fusing: α comes from the labels 0..K
            both = np.stack([np.maximum(regions[i][:, 0], regions[j][:, 0]),
                             np.minimum(regions[i][:, 1], regions[j][:, 1])], axis=1)
            ignore_outside(labels[i, 0], both, K + 1)
    return fused, labels


def draw_fusion_batch(rng: np.random.Generator, batch_size: int, shape: Sequence[int],
                      cfg) -> Tuple[np.ndarray, List[FusionDraw]]:
    """All random parameters of one batch: flips [B, 3] (``cfg.flip_prob`` per axis), then B box draws."""
    flips = draw_flips(rng, batch_size, cfg.flip_prob)
    return flips, [draw_fusion_boxes(rng, shape, cfg) for _ in range(batch_size)]


def fusion_with_inputs(images: np.ndarray, rng: np.random.Generator, cfg,
                       regions: Optional[np.ndarray] = None) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    """(flipped crops: B arrays [C, D, H, W], fused, labels): :func:`volume_fusion_batch` plus the
    flipped crops that were fused (what the mosaic shows as background and foreground)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    _check_batch_size(images.shape[0])
    flips, draws = draw_fusion_batch(rng, images.shape[0], images.shape[2:], cfg)
    flipped, regions = flip_crops(images, regions, flips)
    return (flipped,) + apply_fusion(flipped, draws, cfg.K, regions)


def volume_fusion_batch(images: np.ndarray, rng: np.random.Generator, cfg,
                        regions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """images: [B, C, D, H, W] float32 -> (fused [B, C, D, H, W] float32, labels [B, 1, D, H, W] uint8).

    Draws first (:func:`draw_fusion_batch`), applies second: flip, fuse, mark padding (``regions``
    [B, 3, 2], see :func:`apply_fusion`; None = no padding). Raises ValueError for B == 1 (no
    second sample to take the foreground from).
    """
    return fusion_with_inputs(images, rng, cfg, regions)[1:]
