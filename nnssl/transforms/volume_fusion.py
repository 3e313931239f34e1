"""Volume Fusion (MIS-FM, paper 004, Algorithm 1): fuse two crops through a box-painted label map.

Random parameters are drawn first (:func:`draw_fusion_boxes`, a few small arrays) and applied
second (:func:`paint_label_map`, :func:`fuse`), so tests can hand in fixed draws.

Speed: fusion is pure memory traffic, so it is done without float64, without per-voxel
lookups and without whole-volume temporaries: the integer label map is painted by slicing,
and the fused volume is produced slab by slab with two single-pass kernels per slab
(α = label / K, then ``lerp(bg, fg, α)``), so the α slab stays in cache.

``cfg`` below is any object with the fields of
:class:`nnssl.ssl.volume_fusion.VolumeFusionConfig` (``K, min_boxes, max_boxes,
box_size_min, box_size_max, reference_patch``).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

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


def apply_fusion(images: np.ndarray, draws: List[FusionDraw], K: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fuse every sample with the next one (roll by one) using the given draws.

    images: [B, C, D, H, W] float32 (not modified), B >= 2; draws: B draws, one per sample.
    Returns fused [B, C, D, H, W] float32 (sample i = fusion of background i and foreground
    (i + 1) % B) and labels [B, 1, D, H, W] uint8.
    """
    b = images.shape[0]
    _check_batch_size(b)
    if len(draws) != b:
        raise ValueError(f"apply_fusion got {len(draws)} draws for a batch of {b} samples")
    spatial = images.shape[2:]
    fused = np.empty_like(images)
    labels = np.empty((b, 1) + tuple(spatial), np.uint8)
    for i, draw in enumerate(draws):
        paint_label_map(draw, spatial, out=labels[i, 0])
        fuse(images[i], images[(i + 1) % b], labels[i, 0], K, out=fused[i])
    return fused, labels


def volume_fusion_batch(images: np.ndarray, rng: np.random.Generator, cfg) -> Tuple[np.ndarray, np.ndarray]:
    """images: [B, C, D, H, W] float32 -> (fused [B, C, D, H, W] float32, labels [B, 1, D, H, W] uint8).

    Raises ValueError for B == 1 (there is no second sample to take the foreground from).
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    _check_batch_size(images.shape[0])
    draws = [draw_fusion_boxes(rng, images.shape[2:], cfg) for _ in range(images.shape[0])]
    return apply_fusion(images, draws, cfg.K)
