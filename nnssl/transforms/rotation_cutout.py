"""Swin-UNETR-style view augmentation (QT-UNet SSL, paper 001 §III-H; SPEC §7.3): a rotation by
k·90° in the axial plane, then cutout boxes filled with uniform noise.

Pure functions on numpy arrays; every random draw comes from the ``numpy.random.Generator`` that
is passed in, drawn before anything is applied. Crops are ``[C, D, H, W]`` per sample (a batch
``[B, C, D, H, W]``); the rotation plane is given as two *spatial* axes (default (1, 2): H and W,
the axial plane when axis 0 is the slice axis, as in nnU-Net's preprocessed arrays).
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError

Box = Tuple[Tuple[int, int], ...]  # ((lo, hi) per spatial axis), hi exclusive
N_ROTATIONS = 4  # k in {0, 1, 2, 3}: 0, 90, 180, 270 degrees


def draw_rotation(rng: np.random.Generator) -> int:
    """k ~ U{0, 1, 2, 3} (all four: the authors' code never draws 0, SPEC §7.3 uses all four)."""
    return int(rng.integers(0, N_ROTATIONS))


def rotate(x: np.ndarray, k: int, plane: Sequence[int] = (1, 2)) -> np.ndarray:
    """x: [C, D, H, W] rotated by k·90° in the spatial ``plane`` (a contiguous copy, exact: no resampling)."""
    a, b = (int(p) + 1 for p in plane)
    if x.shape[a] != x.shape[b]:
        raise NnsslError(f"Rotation by 90 degrees needs equal sizes in the rotation plane, got a crop of spatial "
                         f"shape {tuple(x.shape[1:])} (plane axes {tuple(plane)}). Use a square in-plane crop "
                         f"(swin_pretext: --set square_crop=true, the default).")
    return np.ascontiguousarray(np.rot90(x, int(k) % N_ROTATIONS, axes=(a, b)))


def cutout_side_range(spatial_shape: Sequence[int], side_min: int = 32, side_max: int = 64,
                      reference: int = 96) -> List[Tuple[int, int]]:
    """Per axis: the inclusive range of box sides, ``[side_min, side_max]`` at ``reference`` voxels
    scaled by size / reference (rounded, at least 1, at most the axis size)."""
    out = []
    for n in spatial_shape:
        lo = min(int(n), max(1, int(round(side_min * n / reference))))
        hi = min(int(n), max(lo, int(round(side_max * n / reference))))
        out.append((lo, hi))
    return out


def draw_cutouts(rng: np.random.Generator, spatial_shape: Sequence[int], min_boxes: int = 1, max_boxes: int = 3,
                 side_min: int = 32, side_max: int = 64, reference: int = 96) -> List[Box]:
    """n ~ U{min_boxes..max_boxes} boxes; per box and axis a side ~ U{range} (see
    :func:`cutout_side_range`) and a start ~ U{0..size - side}. Boxes may overlap."""
    ranges = cutout_side_range(spatial_shape, side_min, side_max, reference)
    boxes = []
    for _ in range(int(rng.integers(min_boxes, max_boxes + 1))):
        box = []
        for n, (lo, hi) in zip(spatial_shape, ranges):
            side = int(rng.integers(lo, hi + 1))
            start = int(rng.integers(0, int(n) - side + 1))
            box.append((start, start + side))
        boxes.append(tuple(box))
    return boxes


def apply_cutouts(x: np.ndarray, boxes: Sequence[Box], rng: np.random.Generator,
                  low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """x: [C, D, H, W] -> a copy with every box (all channels) filled with noise ~ U[low, high).

    Assumption: ``low``/``high`` default to the crop's own minimum and maximum, so the noise covers
    the crop's intensity range whatever the normalization (Swin-UNETR rescales its noise likewise).
    """
    out = np.array(x, dtype=np.float32, copy=True)
    lo = float(x.min()) if low is None else float(low)
    hi = float(x.max()) if high is None else float(high)
    for box in boxes:
        region = (slice(None),) + tuple(slice(a, b) for a, b in box)
        out[region] = rng.uniform(lo, hi, size=out[region].shape).astype(np.float32)
    return out


def box_mask(spatial_shape: Sequence[int], boxes: Sequence[Box]) -> np.ndarray:
    """bool [D, H, W]: True inside any box (for previews and tests)."""
    mask = np.zeros(tuple(int(s) for s in spatial_shape), dtype=bool)
    for box in boxes:
        mask[tuple(slice(a, b) for a, b in box)] = True
    return mask
