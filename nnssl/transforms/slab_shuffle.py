"""LWI's transformation module (paper 003 §III-B, Fig. 2): shuffle depth slabs, then mask patches.

A crop [C, D, H, W] is split along depth (axis 1) into B equal slabs of D / B slices; the slabs
are put in a random order, and the shuffled volume is masked patch-wise (a fixed share of the
patches of a regular grid set to ``mask_value``). The network then sees the shuffled, masked
crop; its targets are the shuffled, unmasked crop (reconstruction) and the permutation (order
prediction).

Permutation convention: ``perm[j]`` is the original index of the slab that ends up at position
``j`` (output slab j = input slab perm[j]), which is exactly the order label of position j.
:func:`unshuffle_slabs` with the same ``perm`` restores the original.

Draw first, apply second: :func:`draw_slab_permutation` and :func:`draw_patch_mask` draw every
random number; :func:`shuffle_slabs`, :func:`patch_mask_voxels` and :func:`apply_shuffle_and_mask`
are deterministic, so tests can hand them fixed draws.
"""
import math
from typing import Dict, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError


def check_slabs(depth: int, num_slabs: int) -> None:
    """NnsslError unless a crop of ``depth`` slices splits into ``num_slabs`` >= 2 equal slabs."""
    if num_slabs < 2 or depth % num_slabs:
        works = f"a multiple of {num_slabs}" if num_slabs >= 2 else "split into at least 2 slabs"
        raise NnsslError(f"order_reconstruction: a crop depth of {depth} cannot be split into B = {num_slabs} equal "
                         f"slabs (B >= 2 is needed for an order to predict); the crop depth must be {works}.")


def draw_slab_permutation(rng: np.random.Generator, num_slabs: int) -> np.ndarray:
    """int64 [B]: a uniformly random permutation of 0..B-1 (``perm[j]`` = slab now at position j)."""
    return rng.permutation(num_slabs).astype(np.int64)


def shuffle_slabs(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """x: [C, D, H, W] -> a new array whose depth slab j is slab ``perm[j]`` of x (B = len(perm) slabs)."""
    c, d, h, w = x.shape
    b = len(perm)
    check_slabs(d, b)
    return x.reshape(c, b, d // b, h, w)[:, np.asarray(perm)].reshape(c, d, h, w)


def unshuffle_slabs(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Inverse of :func:`shuffle_slabs`: ``unshuffle_slabs(shuffle_slabs(x, perm), perm) == x``."""
    return shuffle_slabs(x, np.argsort(perm))


def scaled_patch_size(shape: Sequence[int], patch_size: Sequence[int], reference: Sequence[int]) -> Tuple[int, ...]:
    """The mask patch for a crop ``shape``: ``patch_size`` (given for a ``reference`` crop) scaled per axis
    by shape / reference, rounded half up, at least 1. 16³ at 96³ -> 11x21x21 at 64x128x128."""
    return tuple(max(1, math.floor(p * s / r + 0.5)) for p, s, r in zip(patch_size, shape, reference))


def draw_patch_mask(rng: np.random.Generator, shape: Sequence[int], patch_size: Sequence[int],
                    ratio: float) -> np.ndarray:
    """bool [ceil(D / pd), ceil(H / ph), ceil(W / pw)]: exactly round(ratio * n) of the n grid patches
    True (masked), chosen uniformly without replacement (MAE-style; the last patch of an axis may be
    partial, so the voxel share is ``ratio`` up to the partial edge patches)."""
    grid = tuple(math.ceil(s / p) for s, p in zip(shape, patch_size))
    n = int(np.prod(grid))
    masked = np.zeros(n, dtype=bool)
    masked[rng.choice(n, size=int(math.floor(ratio * n + 0.5)), replace=False)] = True
    return masked.reshape(grid)


def patch_mask_voxels(grid: np.ndarray, patch_size: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """bool [D, H, W]: voxel v is masked iff its patch ``v // patch_size`` is True in ``grid``."""
    idx = [np.arange(s) // p for s, p in zip(shape, patch_size)]
    return grid[np.ix_(*idx)]


def apply_shuffle_and_mask(images: np.ndarray, perms: np.ndarray, voxel_masks: np.ndarray,
                           mask_value: float) -> Tuple[np.ndarray, np.ndarray]:
    """images [N, C, D, H, W], perms int [N, B], voxel_masks bool [N, D, H, W] (in the *shuffled* frame) ->
    (masked [N, C, D, H, W], shuffled [N, C, D, H, W]), both float32: shuffled = each sample's slabs
    reordered by its permutation; masked = shuffled with the masked voxels set to ``mask_value``."""
    shuffled = np.stack([shuffle_slabs(x, p) for x, p in zip(images, perms)]).astype(np.float32, copy=False)
    masked = shuffled.copy()
    np.copyto(masked, np.float32(mask_value), where=voxel_masks[:, None])
    return masked, shuffled


def shuffle_and_mask(images: np.ndarray, rng: np.random.Generator, num_slabs: int, cfg
                     ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The whole transformation module for a batch, one permutation and one mask per sample.

    images: [N, C, D, H, W] float32; cfg: any object with ``mask_ratio``, ``mask_patch_size``,
    ``reference_crop``, ``mask_value`` and optionally ``mask_patch_scaling`` (default true: the patch is
    scaled from ``reference_crop`` to the crop; false: used as it is) (see OrderReconstructionConfig). Draws, per sample, the
    permutation then the patch mask. Returns (masked input [N, C, D, H, W], aux) with aux
    ``{"target": shuffled unmasked [N, C, D, H, W], "order": int64 [N, B] (= the permutations),
    "mask": bool [N, D, H, W] (True = masked, shuffled frame), "patch_size": (pd, ph, pw)}``.
    """
    if images.ndim != 5:
        raise NnsslError(f"order_reconstruction works on 3D crops [B, C, D, H, W]; got an array of shape "
                         f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
    shape = images.shape[2:]
    check_slabs(shape[0], num_slabs)
    if getattr(cfg, "mask_patch_scaling", True):
        patch = scaled_patch_size(shape, cfg.mask_patch_size, cfg.reference_crop)
    else:
        patch = tuple(int(p) for p in cfg.mask_patch_size)
    perms, grids = [], []
    for _ in range(images.shape[0]):
        perms.append(draw_slab_permutation(rng, num_slabs))
        grids.append(draw_patch_mask(rng, shape, patch, cfg.mask_ratio))
    perms = np.stack(perms)
    voxel_masks = np.stack([patch_mask_voxels(g, patch, shape) for g in grids])
    masked, shuffled = apply_shuffle_and_mask(images, perms, voxel_masks, cfg.mask_value)
    return masked, {"target": shuffled, "order": perms, "mask": voxel_masks, "patch_size": patch}
