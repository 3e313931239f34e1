"""Masked slice chains (Masked LoGoNet, paper 000 §3.3.1 and appendix 8.1).

Each slice of a crop is a chain end with probability φ1 (``chain_end_prob``); a chain is the
end slice and its M − 1 preceding slices (``chain_length`` M, clipped at slice 0; overlapping
chains merge). Every slice of a chain gets its own patch size P drawn uniformly from
``patch_sizes``, is split into P×P patches (the last row / column partial) and each patch is
masked with probability φ2 (``patch_mask_prob``), SimMIM-style. Slices outside chains are
untouched.

Axis convention: crops are [C, D, H, W] (or [B, C, D, H, W]); "slices" are along D, which is
the through-plane axis of thick-slice CT in nnU-Net's preprocessed (transposed) layout.

Draw first, apply second: :func:`draw_slice_mask` draws every random number,
:func:`apply_slice_mask` is deterministic, so tests can hand it a fixed draw.

Assumptions (the paper does not say):
- the masked value is 0 (``mask_value``), the normalized intensity nnU-Net pads with (SimMIM
  also zeroes masked patches before its mask token). This is a semantic change from the paper:
  there CT is scaled from HU [−1000, 1000] to [0, 1], so 0 is air; nnU-Net's CT normalization
  z-scores around the foreground mean, so 0 is soft tissue;
- a patch size larger than the slice is clipped to the slice's larger in-plane side, i.e. the
  whole slice is one patch (P = 96 on a 96×96 crop in the paper means exactly that);
- chains may end on any slice of the crop and are clipped at the crop's first slice (the
  paper samples from a whole sequence; the network only ever sees the crop).
"""
from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple, Union

import numpy as np


@dataclass
class SliceMaskDraw:
    """All random choices of one crop's mask.

    shape: (D, H, W); chain_ends, masked_slices: bool [D]; patch_size: int [D] (the clipped P of
    each chain slice, 0 outside chains); patch_grids: {slice d: bool [ceil(H / P), ceil(W / P)]},
    True = that patch is masked.
    """

    shape: Tuple[int, int, int]
    chain_ends: np.ndarray
    masked_slices: np.ndarray
    patch_size: np.ndarray
    patch_grids: Dict[int, np.ndarray] = field(default_factory=dict)

    def voxel_mask(self) -> np.ndarray:
        """bool [D, H, W]: True where the input is masked."""
        d_, h, w = self.shape
        mask = np.zeros((d_, h, w), dtype=bool)
        for d, grid in self.patch_grids.items():
            p = int(self.patch_size[d])
            mask[d] = np.repeat(np.repeat(grid, p, axis=0), p, axis=1)[:h, :w]
        return mask


def chain_slices(chain_ends: np.ndarray, chain_length: int) -> np.ndarray:
    """bool [D]: slice d is in a chain iff some chain end e satisfies d <= e <= d + M − 1."""
    ends = np.asarray(chain_ends, dtype=bool)
    padded = np.concatenate([ends, np.zeros(chain_length - 1, dtype=bool)])
    return np.lib.stride_tricks.sliding_window_view(padded, chain_length).any(axis=1)


def draw_slice_mask(rng: np.random.Generator, shape: Sequence[int], cfg) -> SliceMaskDraw:
    """shape: spatial (D, H, W) of one crop; cfg needs chain_end_prob, chain_length, patch_sizes,
    patch_mask_prob (see MaskedKMeansConfig)."""
    d_, h, w = (int(s) for s in shape)
    ends = rng.random(d_) < cfg.chain_end_prob
    masked = chain_slices(ends, int(cfg.chain_length))
    chain = np.flatnonzero(masked)
    sizes = np.zeros(d_, dtype=np.int64)
    drawn = rng.choice(np.asarray(cfg.patch_sizes, dtype=np.int64), size=len(chain))
    sizes[chain] = np.minimum(drawn, max(h, w))
    grids = {}
    for d in chain:
        p = int(sizes[d])
        grids[int(d)] = rng.random((-(-h // p), -(-w // p))) < cfg.patch_mask_prob
    return SliceMaskDraw((d_, h, w), ends, masked, sizes, grids)


def apply_slice_mask(x: np.ndarray, draw: Union[SliceMaskDraw, Sequence[SliceMaskDraw]],
                     mask_value: float = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask a crop (or a batch of crops, one draw each); the input is not modified.

    x: [C, D, H, W] with one draw, or [B, C, D, H, W] with B draws.
    Returns (x_masked like x, voxel_mask bool [D, H, W] / [B, D, H, W],
    masked_slices bool [D] / [B, D] -- the slices in chains).
    """
    if x.ndim == 4:
        out, vm, ms = apply_slice_mask(x[None], [draw], mask_value)
        return out[0], vm[0], ms[0]
    draws = list(draw) if not isinstance(draw, SliceMaskDraw) else [draw]
    if x.ndim != 5 or len(draws) != x.shape[0]:
        raise ValueError(f"apply_slice_mask: x {x.shape} needs [C, D, H, W] with one draw or [B, C, D, H, W] "
                         f"with B draws (got {len(draws)})")
    out = np.array(x, copy=True)
    voxel = np.zeros((x.shape[0],) + x.shape[2:], dtype=bool)
    slices = np.zeros(x.shape[:1] + x.shape[2:3], dtype=bool)
    for b, dr in enumerate(draws):
        if tuple(dr.shape) != tuple(x.shape[2:]):
            raise ValueError(f"apply_slice_mask: draw for shape {dr.shape} does not fit crop {x.shape[2:]}")
        voxel[b] = dr.voxel_mask()
        slices[b] = dr.masked_slices
        out[b][:, voxel[b]] = mask_value
    return out, voxel, slices
