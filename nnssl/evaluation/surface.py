"""Surface-distance metrics in millimetres: HD95 and ASSD.

Definitions used here (the common ones, e.g. in the MSD/BTCV literature the papers follow):

- The **surface** of a mask is the set of mask voxels with at least one 6-neighbour (face
  neighbour) outside the mask, i.e. ``mask & ~erosion(mask)``. Voxels on the image border
  count as surface (the outside of the image is background).
- Distances are Euclidean, between voxel centres, in mm: each axis is scaled by its voxel
  spacing, so anisotropic data is measured correctly.
- ``d_pred_to_ref``: for every surface voxel of the prediction, the distance to the nearest
  surface voxel of the reference (and ``d_ref_to_pred`` the other way round).
- **HD95** = max(P95(d_pred_to_ref), P95(d_ref_to_pred)): the larger of the two directed
  95th percentiles (numpy's default linear interpolation between order statistics).
- **ASSD** = mean of all distances of both directions concatenated (each surface voxel counts
  once, so the direction with the larger surface weighs more).

Empty masks: both empty -> 0.0 (nothing to disagree about); exactly one empty -> NaN (the
distance to an empty surface is undefined). Callers aggregating over cases skip NaNs and
count them separately (see :mod:`nnssl.evaluation.evaluate`).

Axes of length 1 are dropped before measuring: a 2D image stored as a one-slice volume then
has its surface in-plane instead of every voxel being a surface voxel (both slice faces
would otherwise touch the image border).
"""
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage


def _prepare(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (pred.ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing {tuple(spacing)} must have one positive value per axis of shape {pred.shape}")
    keep = [a for a, n in enumerate(pred.shape) if n > 1]
    if keep and len(keep) < pred.ndim:
        squeeze = tuple(a for a in range(pred.ndim) if a not in keep)
        pred, ref, spacing = pred.squeeze(squeeze), ref.squeeze(squeeze), spacing[keep]
    return pred, ref, spacing


def _crop_to_joint_box(pred: np.ndarray, ref: np.ndarray):
    """Crop both masks to their joint bounding box and pad one background voxel on every side.

    Outside the joint box both masks are background, so this equals cropping with a one-voxel
    margin; the padding also gives the erosion a background border. Distances between the
    masks never depend on voxels outside the box, so the result is unchanged while the
    distance transform runs on a small array.
    """
    coords = np.nonzero(pred | ref)
    box = tuple(slice(c.min(), c.max() + 1) for c in coords)
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    six_neighbourhood = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=six_neighbourhood, border_value=0)


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray,
                      spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty masks.

    pred_mask, ref_mask: boolean arrays of the same shape, e.g. [Z, Y, X].
    spacing: voxel size per array axis in mm, in the array's axis order (e.g. (sz, sy, sx)).
    Returns (d_pred_to_ref: [N_pred_surface], d_ref_to_pred: [N_ref_surface]).
    Raises ValueError if either mask is empty (the distances are undefined).
    """
    pred, ref, spacing = _prepare(pred_mask, ref_mask, spacing)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances are undefined when a mask is empty")
    pred, ref = _crop_to_joint_box(pred, ref)
    surf_pred, surf_ref = _surface(pred), _surface(ref)
    # The EDT gives, at every voxel, the distance to the nearest zero voxel: zeros placed on
    # one surface turn it into a "distance to that surface" map.
    dist_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return dist_to_ref[surf_pred], dist_to_pred[surf_ref]


def _empty_case(pred_mask, ref_mask, spacing):
    """0.0 if both masks are empty, NaN if exactly one is, None if both have voxels."""
    pred, ref, _ = _prepare(pred_mask, ref_mask, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return float("nan")
    return None


def hd95_and_assd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> Tuple[float, float]:
    """(HD95, ASSD) in mm from one pair of distance transforms; (0, 0) both empty, (NaN, NaN) one empty."""
    empty = _empty_case(pred_mask, ref_mask, spacing)
    if empty is not None:
        return empty, empty
    d_pr, d_rp = surface_distances(pred_mask, ref_mask, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))), float(np.concatenate([d_pr, d_rp]).mean())


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (0.0 both empty, NaN one empty)."""
    return hd95_and_assd(pred_mask, ref_mask, spacing)[0]


def assd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (0.0 both empty, NaN one empty)."""
    return hd95_and_assd(pred_mask, ref_mask, spacing)[1]
