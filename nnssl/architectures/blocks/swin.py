"""3D (shifted-)window multi-head self-attention and the Swin Transformer block.

Tokens live in a channels-last grid ``x: [B, D, H, W, C]``. A block partitions the grid into
non-overlapping windows (``window`` voxels per axis), runs multi-head self-attention inside
each window with a learned relative position bias, and (for the shifted variant) first rolls
the grid by ``-shift`` per axis so the next block's windows straddle the previous block's
window borders; an attention mask stops tokens that were not neighbours before the roll
from attending to each other.

Rules shared by every user (PCT-Net, QT-UNet, SwinUNETR):

- **Shrinking**: an axis no longer than the window gets a single window spanning the whole
  axis and no shift on that axis (Swin's rule).
- **Padding**: an axis that is longer than the window but not a multiple of it is
  zero-padded at the end (after the first LayerNorm) and cropped back after attention.
  Assumption (deviation from common implementations, which let padded tokens take part):
  padded tokens are masked out as keys for real queries, so real outputs do not depend on
  how much padding there is.
- The relative position bias table is sized for the configured window; a shrunk window
  indexes the same table (its offsets are a subset), so weights stay transferable between
  patch sizes.

:func:`window_apply` runs any per-window function on the (shifted) windows of one grid, or of
two aligned grids (QT-UNet's cross-attention in ``blocks/swin_cross.py``); :class:`PatchMerging`
is the shared 2x2x2 token merge.
"""
import functools
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple

Triple = Tuple[int, int, int]


def effective_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> Tuple[Triple, Triple]:
    """Per axis: the window and shift actually used for a grid of ``size`` (shrink rule above)."""
    win, sh = [], []
    for n, w, s in zip(size, window, shift):
        win.append(int(n) if n <= w else int(w))
        sh.append(0 if n <= w else int(s))
    return tuple(win), tuple(sh)


def padded_size(size: Sequence[int], window: Sequence[int]) -> Triple:
    """Each axis rounded up to a multiple of its window."""
    return tuple(int(math.ceil(n / w) * w) for n, w in zip(size, window))


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """x: [B, D, H, W, C] (each axis a multiple of its window) -> [B * nW, wd * wh * ww, C].

    Windows are ordered batch-major, then raster order over the window grid.
    """
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, N, C] -> [B, D, H, W, C]."""
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def relative_position_index(window: Sequence[int], table_window: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[N, N] long tensor: row i, column j -> row of the bias table for offset (pos_i - pos_j).

    The table has ``prod(2 * table_window - 1)`` rows (offsets -(w-1)..(w-1) per axis,
    raster order); ``window`` may be smaller than ``table_window`` (a shrunk window).
    """
    table_window = tuple(table_window) if table_window is not None else tuple(window)
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)  # [3, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [3, N, N], each in -(w-1)..(w-1)
    spans = [2 * t - 1 for t in table_window]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for axis in range(3):
        stride = int(np.prod(spans[axis + 1:]))
        index += (rel[axis] + table_window[axis] - 1) * stride
    return index


@functools.lru_cache(maxsize=32)
def _attention_mask_cached(size: Triple, window: Triple, shift: Triple, device: str,
                           mask_padding: bool = True) -> Optional[torch.Tensor]:
    padded = padded_size(size, window)
    if not any(shift) and (padded == tuple(size) or not mask_padding):
        return None
    axes_region, axes_pad = [], []
    for n, p, w, s in zip(size, padded, window, shift):
        # Region ids in the rolled frame: the last window along an axis holds tokens from
        # the far end of the grid ([p-w, p-s)) and tokens wrapped around from its start
        # ([p-s, p)); the rest ([0, p-w)) is one region. Windows never split region 0.
        region = torch.zeros(p, dtype=torch.long)
        if s > 0:
            region[p - w:p - s] = 1
            region[p - s:] = 2
        # Padding is at the end in original coordinates; rolled index r is original r + s.
        pad = torch.roll(torch.arange(p) >= n, shifts=-s)
        axes_region.append(region)
        axes_pad.append(pad)
    region = (axes_region[0][:, None, None] * 9 + axes_region[1][None, :, None] * 3
              + axes_region[2][None, None, :])
    pad = axes_pad[0][:, None, None] | axes_pad[1][None, :, None] | axes_pad[2][None, None, :]
    region_w = window_partition(region[None, ..., None], window)[..., 0]  # [nW, N]
    pad_w = window_partition(pad[None, ..., None], window)[..., 0]  # [nW, N]
    different_region = region_w[:, :, None] != region_w[:, None, :]
    # Real queries ignore padded keys; padded queries (cropped later) may see padding, so no
    # row is ever fully masked (a fully masked softmax row would give NaN).
    padded_key = pad_w[:, None, :] & ~pad_w[:, :, None]
    if not mask_padding:
        return different_region.to(device)
    return (different_region | padded_key).to(device)


def attention_mask(size: Sequence[int], window: Sequence[int], shift: Sequence[int],
                   device: torch.device = torch.device("cpu"), mask_padding: bool = True) -> Optional[torch.Tensor]:
    """Bool [nW, N, N], True where query i must not attend key j; None when nothing is masked.

    ``size`` is the unpadded grid, ``window``/``shift`` the effective ones (see
    :func:`effective_window`); windows are in :func:`window_partition` order of the padded,
    rolled grid. ``mask_padding=False`` lets padded tokens take part like real ones (only the
    shifted-window regions are masked): MONAI's and the original Swin code's behaviour.
    """
    return _attention_mask_cached(tuple(int(i) for i in size), tuple(int(i) for i in window),
                                  tuple(int(i) for i in shift), str(device), bool(mask_padding))


def _windows(x: torch.Tensor, window: Triple, shift: Triple, padded: Triple) -> torch.Tensor:
    """x: [B, D, H, W, C] -> [B * nW, N, C]: zero-padded to ``padded``, rolled by -shift, partitioned."""
    size = tuple(x.shape[1:4])
    if padded != size:
        pads = [p - n for p, n in zip(padded, size)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    if any(shift):
        x = torch.roll(x, shifts=[-s for s in shift], dims=(1, 2, 3))
    return window_partition(x, window)


def window_apply(fn, x: torch.Tensor, window: Sequence[int], shift: Sequence[int],
                 context: Optional[torch.Tensor] = None, mask_padding: bool = True) -> torch.Tensor:
    """Run ``fn(x_windows, context_windows, effective_window, mask) -> out_windows`` on the
    (shifted) windows of x: [B, D, H, W, C] and return the result on the grid, [B, D, H, W, C'].

    ``window``/``shift`` are the configured ones (shrunk per :func:`effective_window`).
    ``context`` (same grid as x, any channels; None: ``fn`` gets None) is padded, rolled and
    partitioned exactly like x, so window j of both covers the same voxels (cross-attention).
    ``mask_padding``: see :func:`attention_mask`.
    """
    size = tuple(x.shape[1:4])
    win, sh = effective_window(size, window, shift)
    padded = padded_size(size, win)
    mask = attention_mask(size, win, sh, x.device, mask_padding)
    ctx = None if context is None else _windows(context, win, sh, padded)
    out = window_reverse(fn(_windows(x, win, sh, padded), ctx, win, mask), win, padded)
    if any(sh):
        out = torch.roll(out, shifts=list(sh), dims=(1, 2, 3))
    return out[:, :size[0], :size[1], :size[2]]


def init_transformer_weights(module: nn.Module) -> None:
    """Swin's initialization of one module (for ``net.apply``): Linear weights truncated normal
    (std 0.02) and biases 0; LayerNorm weight 1, bias 0; other modules untouched."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchMerging(nn.Module):
    """Concatenate each 2x2x2 neighbourhood (8C) -> LayerNorm -> Linear to 2C (no bias), as Swin.

    x: [B, D, H, W, C] (even D, H, W) -> [B, D/2, H/2, W/2, 2C]. The 8 neighbours are
    concatenated in raster order of their (d, h, w) offsets.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        if d % 2 or h % 2 or w % 2:
            raise ValueError(f"PatchMerging needs even grid sizes, got {(d, h, w)}")
        x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.reduction(self.norm(x.reshape(b, d // 2, h // 2, w // 2, 8 * c)))


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a relative position bias.

    x: [B * nW, N, C] -> [B * nW, N, C].
    """

    def __init__(self, dim: int, heads: int, window: Sequence[int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.window = to_3tuple(window)
        self.scale = (dim // heads) ** -0.5
        n_offsets = int(np.prod([2 * w - 1 for w in self.window]))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_offsets, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # A module (not F.softmax) so the stored attention maps are visible to forward hooks.
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, window: Triple) -> torch.Tensor:
        """[heads, N, N] bias for an (effective) window no larger than the configured one."""
        if tuple(window) == self.window:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window).to(self.relative_position_bias_table.device)
        n = index.shape[0]
        return self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: Optional[Triple] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B * nW, N, C]; window: the effective window (N = its volume); mask: [nW, N, N] bool."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.attend(qkv[0], qkv[1], qkv[2], window, mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[Triple] = None,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Biased, masked softmax attention and the output projection (shared with cross-attention).

        q, k, v: [B * nW, heads, N, C / heads] -> [B * nW, N, C].
        """
        bw, _, n, _ = q.shape
        c = q.shape[1] * q.shape[3]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B * nW, heads, N, N]
        attn = attn + self.position_bias(window or self.window).unsqueeze(0).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n).masked_fill(mask[None, :, None], float("-inf"))
            attn = attn.view(bw, self.heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.p) / (1.0 - self.p)


class Mlp(nn.Module):
    """Linear(dim -> ratio * dim) -> GELU -> Linear(-> dim), dropout after each linear."""

    def __init__(self, dim: int, ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """One Swin Transformer block: (shifted-)window MSA then MLP, each with a residual.

    Pre-norm (Swin): x = x + MSA(LN(x)); x = x + MLP(LN(x)). ``post_norm=True`` gives
    x = LN(x + MSA(x)); x = LN(x + MLP(x)) instead. x: [B, D, H, W, C] -> same shape.
    ``mask_padding``: see :func:`attention_mask` (True: padded tokens are masked out as keys).
    """

    def __init__(self, dim: int, heads: int, window: Sequence[int] = (7, 7, 7), shift: Sequence[int] = (0, 0, 0),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, post_norm: bool = False, mask_padding: bool = True):
        super().__init__()
        self.mask_padding = mask_padding
        self.dim, self.heads = dim, heads
        self.window, self.shift = to_3tuple(window), to_3tuple(shift)
        if any(s >= w for s, w in zip(self.shift, self.window)):
            raise ValueError(f"shift {self.shift} must be smaller than the window {self.window}")
        self.mlp_ratio = mlp_ratio
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, self.window, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention over x: [B, D, H, W, C] (already normalised for pre-norm)."""
        return window_apply(lambda w, _, win, mask: self.attn(w, win, mask), x, self.window, self.shift,
                            mask_padding=self.mask_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop_path(self._attend(x)))
            return self.norm2(x + self.drop_path(self.mlp(x)))
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """Elements of the stored linear-layer outputs and attention maps for one sample.

        qkv and proj see the padded grid; the attention maps are heads x N per padded token;
        the MLP sees the unpadded grid.
        """
        window, _ = effective_window(size, self.window, self.shift)
        n_pad = int(np.prod(padded_size(size, window), dtype=np.int64))
        n = int(np.prod(size, dtype=np.int64))
        hidden = int(self.dim * self.mlp_ratio)
        return (n_pad * (3 * self.dim + self.dim + self.heads * int(np.prod(window)))
                + n * (hidden + self.dim))
