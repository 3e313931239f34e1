"""Masked-sequence multi-clusterer SSL (Masked LoGoNet, paper 000 §3.3, appendix 8.1, eq. 4-5).

Before training (:meth:`MaskedKMeans.prepare`, main process): N k-means clusterers label every
slice of every pretraining volume (:mod:`nnssl.ssl.pseudo_labels`, cached on disk). Per batch
(:meth:`MaskedKMeans.make_batch`, loader workers): chains of M slices are masked patch-wise
(:mod:`nnssl.transforms.slice_masking`) and the labels of the crop's slices are looked up. The
network, built with ``feature_channels`` outputs, sees the masked crop; a head turns its output
into per-slice logits for each clusterer; the loss is the cross-entropy of softmax(logits / τ)
against every clusterer's label, on the masked slices only. Encoder and decoder are transferred
(paper Fig. 2: only the classification head is replaced for fine-tuning; config field ``transfer``).

Assumptions (the authors' code is not public; each has a config field where it is a number):
- ``feature_channels`` = 32: the segmentation network's output layer acts as a feature projection
  and the head works on its [B, F, D, H, W] output (the paper's head sits "on top of the model");
  any architecture works, the method uses only the network's forward output;
- head: a per-slice pooling over H, W (``head_pool`` = "mean", or "max") -> [B, D, F] ->
  Linear(F, ``head_hidden`` = 256) -> GELU -> one Linear to sum(K_n) logits, split per clusterer.
  Algorithm 4 (a chain of convs over permuted axes tied to a fixed 96³ crop) is replaced by this
  size-independent head, as SPEC §7.2 allows;
- loss normalization (``loss_normalization``): eq. 4 sums over clusterers and masked slices
  ("sum"); nnssl's default "mean_slices" sums over clusterers and averages over the masked,
  non-padded slices of the batch, so the loss scale does not depend on φ1, M or the batch size (a
  batch without masked slices gives loss 0);
- masked voxels are set to ``mask_value`` = 0, a semantic change from the paper: its CT
  intensities are scaled to [0, 1] (HU [−1000, 1000]), where 0 is air; after nnU-Net's CT
  normalization (z-scored around the foreground mean) 0 is soft tissue (see slice_masking);
  chains clip at the crop;
- schedule: the paper's 100 epochs with 10 warm-up epochs become ``iterations`` = 100k with a
  warm-up of ``warmup_fraction`` = 10 % of whatever ``--iterations`` is, then cosine over the rest
  (``--set warmup_iterations=N`` gives an absolute warm-up instead);
- ``batch_size`` = 2: the paper uses 1 case per GPU with 2 random crops per case (16 GPUs);
- pseudo-label assumptions (slice vectors, shared fit subset, fit passes): see pseudo_labels.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl import pseudo_labels
from nnssl.ssl.base import METHODS, SSLMethod, check_common_fields, float32_loss
from nnssl.transforms.slice_masking import apply_slice_mask, draw_slice_mask


POOLS = ("mean", "max")
NORMALIZATIONS = ("mean_slices", "sum")


@dataclass
class MaskedKMeansConfig:
    """Paper defaults (Table 12, appendix 8.1); override with ``--set key=value``."""

    # masking
    chain_end_prob: float = 0.1  # φ1
    chain_length: int = 5  # M
    patch_sizes: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 96)  # P_j
    patch_mask_prob: float = 0.7  # φ2
    # Assumption: masked voxels = 0, nnU-Net's padding value; that is soft tissue after nnU-Net's CT
    # normalization, where the paper's [0, 1] scaling makes 0 air (a semantic change).
    mask_value: float = 0.0
    # pseudo-labels
    n_clusterers: int = 80  # N (paper also: 1, 40)
    k_min: int = 80  # K_n ~ U{k_min..k_max}
    k_max: int = 500
    fit_fraction: float = 0.1  # share of the pretraining volumes the clusterers are fitted on
    fit_epochs: int = 5  # Assumption: passes over the fit volumes
    fit_chunk_slices: int = 1024  # Assumption: slices per partial_fit step (sklearn's default batch)
    slice_vector_size: int = 32  # Assumption: slices area-resampled to size² pixels before clustering
    kmeans_init: str = "k-means++"  # sklearn's default seeding ("random": faster, rougher)
    label_cache: Optional[str] = None  # set by prepare(): the labels .npy of this data/seed/config
    # head and loss
    feature_channels: int = 32  # Assumption: network output channels fed to the head
    head_hidden: int = 256  # Assumption: hidden width of the head's MLP
    head_pool: str = "mean"  # Assumption: per-slice pooling of the features over H, W ("mean" | "max")
    loss_normalization: str = "mean_slices"  # Assumption: "mean_slices" (see above) | "sum" (eq. 4 as written)
    temperature: float = 0.1  # τ, eq. 5
    # pretraining schedule (paper: AdamW, lr 1e-4, wd 1e-5, 100 epochs, 10 warm-up, cosine)
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"
    iterations: int = 100_000  # Assumption: the engine counts iterations, not epochs
    warmup_fraction: float = 0.1  # share of the run (paper: 10 of 100 epochs)
    warmup_iterations: Optional[int] = None  # absolute warm-up; None = warmup_fraction of the run
    batch_size: int = 2  # Assumption: paper = 1 case x 2 crops per GPU
    # fine-tuning hand-over (paper Fig. 2: only the classification head is replaced)
    transfer: str = "encoder+decoder"
    grad_clip: Optional[float] = None  # max gradient norm; the paper clips nothing

    def __post_init__(self):
        self.patch_sizes = tuple(int(p) for p in self.patch_sizes)
        checks = [
            (0 <= self.chain_end_prob <= 1, "chain_end_prob must be in [0, 1] (paper: 0.1)"),
            (0 <= self.patch_mask_prob <= 1, "patch_mask_prob must be in [0, 1] (paper: 0.7)"),
            (self.chain_length >= 1, "chain_length must be >= 1 (paper: 5)"),
            (len(self.patch_sizes) > 0 and min(self.patch_sizes) >= 1,
             "patch_sizes must be positive integers (paper: 1,2,4,8,16,32,96)"),
            (self.n_clusterers >= 1, "n_clusterers must be >= 1 (paper: 80)"),
            (2 <= self.k_min <= self.k_max <= np.iinfo(np.int16).max,
             "need 2 <= k_min <= k_max <= 32767 (paper: 80 and 500)"),
            (0 < self.fit_fraction <= 1, "fit_fraction must be in (0, 1] (paper: 0.1)"),
            (self.fit_epochs >= 1 and self.fit_chunk_slices >= 1 and self.slice_vector_size >= 1,
             "fit_epochs, fit_chunk_slices and slice_vector_size must be >= 1"),
            (self.feature_channels >= 1 and self.head_hidden >= 1, "feature_channels and head_hidden must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (paper: 0.1)"),
            (self.kmeans_init in ("k-means++", "random"), "kmeans_init must be k-means++ or random"),
            (self.head_pool in POOLS, f"head_pool must be one of {', '.join(POOLS)}"),
            (self.loss_normalization in NORMALIZATIONS,
             f"loss_normalization must be one of {', '.join(NORMALIZATIONS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise NnsslError(f"masked_kmeans: {msg}; fix it with --set key=value.")
        check_common_fields("masked_kmeans", self)


class SliceClusterHead(nn.Module):
    """features [B, F, D, H, W] -> logits [B, D, sum(K_n)] (per-slice mean or max over H, W, then an MLP)."""

    def __init__(self, in_channels: int, hidden: int, cluster_sizes: Sequence[int], pool: str = "mean"):
        super().__init__()
        self.cluster_sizes = [int(k) for k in cluster_sizes]
        self.pool = pool
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, sum(self.cluster_sizes)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(3, 4)) if self.pool == "mean" else features.amax(dim=(3, 4))
        return self.mlp(pooled.transpose(1, 2))


def multi_clusterer_ce(logits: torch.Tensor, cluster_sizes: Sequence[int], labels: torch.Tensor,
                       masked_slices: torch.Tensor, temperature: float,
                       normalization: str = "mean_slices") -> torch.Tensor:
    """Eq. 4: sum over clusterers n and counted slices of CE(softmax(logits_n / τ), label_n).

    logits: [B, D, sum(K_n)]; labels: [B, D, N] (−1 = padded slice); masked_slices: bool [B, D].
    Only masked, non-padded slices count; with ``normalization="mean_slices"`` the sum is divided by
    their number (>= 1), with "sum" it is returned as is.
    """
    valid = masked_slices.bool() & (labels[..., 0] >= 0)
    sel = logits[valid].float() / temperature  # [S, sum K_n]
    target = labels[valid].long()  # [S, N]
    total = sel.sum() * 0.0  # keeps the graph connected when no slice is masked
    for n, part in enumerate(torch.split(sel, list(cluster_sizes), dim=1)):
        total = total + F.cross_entropy(part, target[:, n], reduction="sum")
    return total if normalization == "sum" else total / valid.sum().clamp(min=1)


def _paint(per_slice: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """per_slice [D] -> float32 [D, H, W] with every slice filled with its value."""
    return np.broadcast_to(per_slice.astype(np.float32)[:, None, None], tuple(shape)).copy()


@METHODS.register("masked_kmeans")
class MaskedKMeans(SSLMethod):
    """Batch: ``data`` [B, C, D, H, W] float32 (masked crops), ``masked_slices`` bool [B, D] (slices in
    chains), ``labels`` int16 [B, D, N] (pseudo-label of each crop slice per clusterer, −1 = padding)."""

    name = "masked_kmeans"
    config_class = MaskedKMeansConfig
    transfer = MaskedKMeansConfig.transfer
    min_batch_size = 1

    def __init__(self, cfg: MaskedKMeansConfig, network: nn.Module, patch_size, num_input_channels: int):
        super().__init__(cfg, network, patch_size, num_input_channels)
        if cfg.label_cache is None:
            raise RuntimeError("masked_kmeans: cfg.label_cache is unset; the engine must call "
                               "MaskedKMeans.prepare(cfg, data_folder, identifiers, seed) and use the cfg it returns.")
        self.cluster_sizes = pseudo_labels.cluster_sizes(cfg.label_cache)
        self.head = SliceClusterHead(cfg.feature_channels, cfg.head_hidden, self.cluster_sizes, cfg.head_pool)

    @classmethod
    def network_output_channels(cls, cfg: MaskedKMeansConfig) -> int:
        return cfg.feature_channels

    @classmethod
    def prepare(cls, cfg: MaskedKMeansConfig, data_folder: str, identifiers: List[str], seed: int):
        """Fit (or find in the cache) the pseudo-labels; returns cfg with ``label_cache`` set."""
        path = pseudo_labels.build_or_load_cache(data_folder, identifiers, seed, cfg)
        return dataclasses.replace(cfg, label_cache=path)

    @classmethod
    def _mask(cls, cfg, images: np.ndarray, rng: np.random.Generator):
        if images.ndim != 5:
            raise NnsslError(f"masked_kmeans works on 3D crops [B, C, D, H, W]; got an array of shape "
                             f"{tuple(images.shape)}. Use a 3d configuration (e.g. -c 3d_fullres).")
        draws = [draw_slice_mask(rng, images.shape[2:], cfg) for _ in range(images.shape[0])]
        return apply_slice_mask(images, draws, cfg.mask_value)

    @classmethod
    def batch_labels(cls, cfg: MaskedKMeansConfig, meta: dict, depth: int) -> np.ndarray:
        """int16 [B, depth, N]: the pseudo-labels of each crop's slices (meta: keys, boxes; see base)."""
        rows = []
        for key, box in zip(meta["keys"], meta["boxes"]):
            lo, hi = int(box[0][0]), int(box[0][1])
            if hi - lo != depth:
                raise RuntimeError(f"masked_kmeans: crop box {box} does not match crop depth {depth}")
            rows.append(pseudo_labels.crop_labels(cfg.label_cache, key, lo, hi))
        return np.stack(rows)

    @classmethod
    def make_batch(cls, cfg: MaskedKMeansConfig, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, D, H, W] float32 normalized crops; meta: {"keys", "boxes"} -> {"data", "masked_slices", "labels"}."""
        if meta is None or cfg.label_cache is None:
            raise RuntimeError("masked_kmeans.make_batch needs the crop boxes (meta) and cfg.label_cache from "
                               "prepare(); the engine passes both.")
        data, _, masked = cls._mask(cfg, images, rng)
        labels = cls.batch_labels(cfg, meta, images.shape[2])
        return {"data": torch.from_numpy(data), "masked_slices": torch.from_numpy(masked),
                "labels": torch.from_numpy(labels)}

    @classmethod
    def preview(cls, cfg: MaskedKMeansConfig, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: masked input, masked slices, clusterer 0's label per slice (each [D, H, W])."""
        data = batch["data"][0, 0].numpy()
        return [("masked input", data),
                ("masked slices (chains)", _paint(batch["masked_slices"][0].numpy(), data.shape)),
                ("pseudo-label, clusterer 0 (-1 = padding)", _paint(batch["labels"][0, :, 0].numpy(), data.shape))]

    @classmethod
    def preview_from_images(cls, cfg: MaskedKMeansConfig, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """Sample 0: original, masked input, voxel mask, masked slices, and (with meta and a label cache)
        clusterer 0's label per slice; same draws as :meth:`make_batch` for the same rng state."""
        data, voxel, masked = cls._mask(cfg, images, rng)
        shape = images.shape[2:]
        panels = [("original", np.asarray(images[0, 0])), ("masked input", data[0, 0]),
                  ("voxel mask", voxel[0].astype(np.float32)), ("masked slices (chains)", _paint(masked[0], shape))]
        if meta is not None and cfg.label_cache is not None:
            labels = cls.batch_labels(cfg, meta, shape[0])
            panels.append(("pseudo-label, clusterer 0 (-1 = padding)", _paint(labels[0, :, 0], shape)))
        return panels

    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns {"ce", "loss"} (loss = ce, eq. 4 with the normalization in the module docstring)."""
        out = network(batch["data"])
        if isinstance(out, (list, tuple)):
            out = out[0]
        logits = self.head(out)
        with float32_loss(logits):
            ce = multi_clusterer_ce(logits.float(), self.cluster_sizes, batch["labels"], batch["masked_slices"],
                                    self.cfg.temperature, self.cfg.loss_normalization)
        return {"ce": ce, "loss": ce}
