"""3D large-kernel attention (LKA) and the transformer-like LKA module of ULKANet (Masked LoGoNet
paper, §3.1 and Algorithms 2-3; SPEC §7.2).

Everything stays channels-first: ``x: [B, C, D, H, W]``.

- :class:`LargeKernelAttention3d` (eq. 2-3): ``attn = pw(dw_dilated(dw(x)))``, output
  ``attn * x`` (element-wise). ``dw`` is a depth-wise ``lka_kernel``^3 conv, ``dw_dilated`` a
  depth-wise ``lka_dilated_kernel``^3 conv with dilation ``lka_dilation``, ``pw`` a 1x1x1 conv.
- :class:`AttentionSublayer`: the module's "Attn": 1x1x1 projection -> GELU -> LKA -> 1x1x1
  projection (or the bare LKA when ``projections=False``).
- :class:`LKAMlp3d` (Algorithm 3): 1x1x1 conv (C -> r*C) -> GELU -> depth-wise 3x3x3 conv on the
  r*C hidden channels -> GELU -> 1x1x1 conv (r*C -> C).
- :class:`LKABlock3d` (Algorithm 2): ``x = x + Attn(BN(x)); x = x + MLP(BN(x))`` (``residual``
  "pre_norm"), or with ``residual="normed_input"`` Algorithm 2 read literally:
  ``x = BN(x); x = x + Attn(x); x = BN(x); x = x + MLP(x)``.

Assumptions (the paper does not fix them):
- LKA kernels 5^3 depth-wise, then 7^3 depth-wise with dilation 3 (the common 3D version of
  VAN's 5x5 + 7x7 dilation 3; receptive field 23^3). Config fields ``lka_kernel``,
  ``lka_dilated_kernel``, ``lka_dilation``.
- "Attn" wraps the LKA in VAN's 1x1x1 projections with a GELU (``projections=True``). The paper
  shows only eq. 2-3; with the projections, what Table 10 leaves for the decoder (total minus
  encoder parameters) grows by exactly 1.5^2 = 2.25 from the normal to the large variant, as for
  a decoder whose widths scale with ``dims``; without them the ratio would be 2.5. Config field
  ``attn_projections``.
- Algorithm 3 writes the depth-wise conv as ``Conv3d(inSize, inSize)``; it must act on the
  hidden (r*C) channels to fit between fc1 and fc2, so it does (as in VAN).
- Residuals are pre-norm around each sub-layer, as the SPEC states (Algorithm 2 overwrites X
  with BN(X) before adding, which reads as the same thing written loosely; taken literally the
  residual adds to the normalized X). Config field ``lka_residual`` ("pre_norm" |
  "normed_input"). No layer scale and no drop-path (the paper mentions neither; dropout is 0 in
  Tables 12/14).
- Convolutions keep their biases (they are not followed by a normalization).
"""
from typing import Sequence

import numpy as np
import torch
from torch import nn


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


class LargeKernelAttention3d(nn.Module):
    """Eq. 2-3: ``attn = pw(dw_dilated(dw(x)))``; returns ``attn * x``. x: [B, C, D, H, W] -> same."""

    def __init__(self, dim: int, kernel: int = 5, dilated_kernel: int = 7, dilation: int = 3):
        super().__init__()
        for name, k in (("lka_kernel", kernel), ("lka_dilated_kernel", dilated_kernel)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number (same-size padding), got {k}")
        self.dw = nn.Conv3d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.dw_dilated = nn.Conv3d(dim, dim, dilated_kernel, padding=dilation * (dilated_kernel // 2),
                                    dilation=dilation, groups=dim)
        self.pw = nn.Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw_dilated(self.dw(x))) * x

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """Three conv outputs and the product, C elements per voxel each."""
        return 4 * _elements(self.pw.out_channels, size)


class AttentionSublayer(nn.Module):
    """The LKA module's "Attn": [1x1x1 proj -> GELU ->] LKA [-> 1x1x1 proj]. x: [B, C, D, H, W] -> same."""

    def __init__(self, dim: int, kernel: int = 5, dilated_kernel: int = 7, dilation: int = 3,
                 projections: bool = True):
        super().__init__()
        self.lka = LargeKernelAttention3d(dim, kernel, dilated_kernel, dilation)
        if projections:
            self.proj_in = nn.Conv3d(dim, dim, 1)
            self.act = nn.GELU()
            self.proj_out = nn.Conv3d(dim, dim, 1)
        self.projections = projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.projections:
            return self.lka(x)
        return self.proj_out(self.lka(self.act(self.proj_in(x))))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        extra = 2 * _elements(self.lka.pw.out_channels, size) if self.projections else 0
        return self.lka.compute_conv_feature_map_size(size) + extra


class LKAMlp3d(nn.Module):
    """Algorithm 3: fc1 (C -> hidden) -> GELU -> depth-wise 3^3 -> GELU -> fc2 (hidden -> C).

    x: [B, C, D, H, W] -> [B, C, D, H, W].
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act2(self.dwconv(self.act1(self.fc1(x)))))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        return 2 * _elements(self.fc1.out_channels, size) + _elements(self.fc2.out_channels, size)


RESIDUALS = ("pre_norm", "normed_input")


class LKABlock3d(nn.Module):
    """Algorithm 2: ``x = x + Attn(BN(x)); x = x + MLP(BN(x))`` (``residual="pre_norm"``), or
    ``x = BN(x); x = x + Attn(x); x = BN(x); x = x + MLP(x)`` (``"normed_input"``).
    x: [B, C, D, H, W] -> same."""

    def __init__(self, dim: int, mlp_ratio: float, kernel: int = 5, dilated_kernel: int = 7, dilation: int = 3,
                 projections: bool = True, residual: str = "pre_norm"):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.residual = residual
        self.norm1 = nn.BatchNorm3d(dim)
        self.attn = AttentionSublayer(dim, kernel, dilated_kernel, dilation, projections)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = LKAMlp3d(dim, int(round(mlp_ratio * dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual == "normed_input":
            x = self.norm1(x)
            x = x + self.attn(x)
            x = self.norm2(x)
            return x + self.mlp(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        return self.attn.compute_conv_feature_map_size(size) + self.mlp.compute_conv_feature_map_size(size)
