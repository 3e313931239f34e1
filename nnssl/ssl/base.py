"""The interface every SSL method implements.

A method is three things (the lightly/MAE pattern):

1. ``make_batch(cfg, images, rng)`` -- a pure function, run in the data-loading worker
   processes, that turns a batch of cropped, normalized image patches into the network
   inputs and the targets. All randomness comes from the ``numpy.random.Generator`` it is
   given (the engine derives it from seed, rank and iteration, which is what makes resumed
   runs bit-identical). The heavy lifting lives in ``nnssl/transforms/`` as functions
   ``f(x, ..., rng) -> (x_out, aux)`` that can be tested without a network.
2. heads: ``nn.Module`` attributes of the method object (never of the network, so the
   checkpoint's ``network_weights`` hold the segmentation network only);
3. ``forward_loss(network, batch)`` -- runs the network (and heads) and returns a dict of
   named loss terms plus ``"loss"``, their weighted sum, which the engine backpropagates.
   The engine calls it under autocast (fp16 AMP on CUDA, bf16 with ``--cpu_precision`` on
   the CPU): the network and heads run in it; the loss terms are computed inside
   :func:`float32_loss` from outputs cast with ``.float()``, so no loss (k-means CE,
   contrastive similarities, BYOL cosines, reconstruction errors) is a low-precision product.

Hyper-parameters are a dataclass with the paper's defaults (``config_class``); the engine
overrides fields from ``--set key=value`` and saves the result beside the checkpoint.
"""
import dataclasses
import math
from typing import Callable, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl.registry import Registry
from nnssl.ssl.crops import CropChoice, InputRule, choose


def float32_loss(like: torch.Tensor):
    """Context manager for a method's loss terms: autocast off on ``like``'s device, so the losses
    computed inside are float32 when their inputs are (cast the network/head outputs with ``.float()``
    inside it). Low-precision similarities and distances lose the small differences the losses
    are made of (bf16 keeps ~3 significant digits)."""
    return torch.autocast(like.device.type, enabled=False)


class SSLMethod(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    # Which parts of the network are meaningful to transfer: "encoder" or "encoder+decoder" (the
    # paper's choice; every config has a `transfer` field with this default, and the checkpoint
    # records the config's value).
    transfer: ClassVar[str] = "encoder+decoder"
    # Smallest batch the method can work with (Volume Fusion fuses sample i with i+1: 2).
    min_batch_size: ClassVar[int] = 1
    # Capabilities (nnssl.architectures.spec.CAPABILITIES) the network must have; checked by
    # check_compatible before anything is built.
    requires: ClassVar[FrozenSet[str]] = frozenset()

    def __init__(self, cfg, network: nn.Module, patch_size: Sequence[int], num_input_channels: int):
        super().__init__()
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_input_channels = num_input_channels

    # --- class-level hooks: needed before the network exists, or inside worker processes ---
    @classmethod
    def network_output_channels(cls, cfg) -> int:
        """Number of output channels the segmentation network is built with during pretraining."""
        return 1

    @classmethod
    def default_config(cls, architecture: str):
        """The config a run on ``architecture`` starts from, before ``--set``: the dataclass's defaults.
        A method whose paper or authors' code gives other defaults for some backbones overrides it
        (order_reconstruction on ``unetr`` / ``unetr_pp``)."""
        return cls.config_class()

    @classmethod
    def crop_requirement(cls, cfg) -> str:
        """The method's own constraint on its crops, in words (for the start-up line and refusals);
        "" = none."""
        return ""

    @classmethod
    def crop_axis_ok(cls, cfg, axis: int, size: int, rule: InputRule) -> bool:
        """Whether the method takes ``size`` voxels along ``axis`` on a network that accepts ``rule``.
        Default: any size."""
        return True

    @classmethod
    def crop_joint_ok(cls, cfg, crop: Tuple[int, ...]) -> bool:
        """Whether the method takes ``crop`` as a whole (constraints between axes). Default: yes."""
        return True

    @classmethod
    def choose_crop(cls, cfg, planned_patch_size: Sequence[int], rule: Optional[InputRule] = None) -> CropChoice:
        """The random crops the loader produces: the largest crop inside the planned patch that the network
        (``rule``; None = any size) and the method (the three hooks above) accept, and why it is smaller
        (:mod:`nnssl.ssl.crops`); NnsslError when there is none. A method without constraints: the
        planned patch."""
        rule = rule or InputRule.anything(len(planned_patch_size))
        return choose(cls.name, planned_patch_size, rule, lambda axis, size: cls.crop_axis_ok(cfg, axis, size, rule),
                      lambda crop: cls.crop_joint_ok(cfg, crop), cls.crop_requirement(cfg))

    @classmethod
    def crop_size(cls, cfg, planned_patch_size: Sequence[int], rule: Optional[InputRule] = None) -> Tuple[int, ...]:
        """The crop of :meth:`choose_crop` alone."""
        return cls.choose_crop(cfg, planned_patch_size, rule).crop

    @classmethod
    def prepare(cls, cfg, data_folder: str, identifiers: List[str], seed: int):
        """Once per run, in the main process (rank 0 under DDP) before the loader workers start:
        precompute what ``make_batch`` needs (e.g. masked_kmeans' pseudo-label cache) and return the
        config to use (a ``dataclasses.replace`` copy when it changes). Default: ``cfg`` unchanged."""
        return cfg

    @classmethod
    def configure(cls, cfg, build_network: Callable[[], nn.Module], crop_size: Sequence[int],
                  num_input_channels: int):
        """Once per run, right after :meth:`prepare` (and for ``nnssl_show_pretext``): fill in config
        fields that depend on the network, which ``make_batch`` needs in the worker processes (e.g.
        order_reconstruction's slab count from the encoder's depth downsampling), and return the config
        to use. ``build_network()`` builds the run's network (call it only if needed). Default: ``cfg``
        unchanged."""
        return cfg

    @classmethod
    def make_batch(cls, cfg, images: np.ndarray, rng: np.random.Generator,
                   meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """images: [B, C, X, Y, Z] float32 normalized crops -> dict of tensors (inputs and targets).

        meta: ``{"keys": [case identifier per sample], "boxes": [per sample [[lo, hi] per spatial
        axis] in the preprocessed volume's voxel coordinates, beyond the volume where padded],
        "image_region": [per sample [[lo, hi] per spatial axis] of crop voxels holding image data;
        the rest is padding]}``; methods that do not need it ignore it.
        """
        raise NotImplementedError

    @classmethod
    def draw_cases(cls, cfg, n_cases: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Indices [batch_size] of the cases the loader crops the samples of a batch from (first draw of
        the batch's generator). Default: uniform, with replacement. NnsslError when ``n_cases`` cannot
        make a batch (the loader calls this once at start-up, so that surfaces before training)."""
        return rng.integers(0, n_cases, size=batch_size)

    @classmethod
    def preview(cls, cfg, batch: Dict[str, torch.Tensor]) -> List[Tuple[str, np.ndarray]]:
        """Volumes [X, Y, Z] of sample 0 to show in ``nnssl_show_pretext``: (title, volume)."""
        raise NotImplementedError

    @classmethod
    def preview_from_images(cls, cfg, images: np.ndarray, rng: np.random.Generator,
                            meta: Optional[dict] = None) -> List[Tuple[str, np.ndarray]]:
        """The panels ``nnssl_show_pretext`` draws, from the loader's crops [B, C, X, Y, Z] (what
        ``make_batch`` receives). Default: :meth:`preview` of ``make_batch``; override it to also
        show intermediate volumes (e.g. the scans that were fused), with the same draws."""
        return cls.preview(cfg, cls.make_batch(cfg, images, rng, meta=meta))

    # --- runs in the training process ---
    def forward_loss(self, network: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, iteration: int, total_iterations: int) -> None:
        """Called by the engine after every optimizer step (e.g. to update an EMA target network,
        BYOL's momentum encoder). Default: nothing."""

    def epoch_messages(self, record: dict) -> List[str]:
        """Called by the engine after every epoch with its log record (``record["losses"]`` holds the
        epoch mean of every scalar ``forward_loss`` returned, also monitors that are not trained,
        e.g. swin_pretext's projection spread); the returned lines are written to the training log
        (e.g. a collapse warning). Default: none."""
        return []


METHODS: Registry[type] = Registry("SSL method", "-m")

TRANSFERS = ("encoder", "encoder+decoder")  # what a config's / checkpoint's `transfer` may say


# Valid ranges of numeric config fields (ints, floats and tuples of them), by field name: every
# value must be finite; intensities may be negative, shares and probabilities lie in [0, 1],
# rates, lengths and sizes are positive, all other numbers (weights, counts, ...) non-negative;
# encoder level indices count from the bottleneck when negative (Python's convention).
SIGNED_FIELDS = frozenset({"mask_value", "noise_low", "noise_high", "slab_level"})
POSITIVE_FIELDS = frozenset({"lr", "iterations", "batch_size", "temperature", "lr_gamma", "grad_clip", "K"})
_UNIT_SUFFIXES = ("_prob", "_ratio", "_fraction", "dropout")


def numeric_range(name: str) -> Tuple[float, float, bool, str]:
    """(low, high, low exclusive, description) of the numeric config field ``name``."""
    if name in SIGNED_FIELDS:
        return -math.inf, math.inf, False, "any finite number"
    if name.endswith(_UNIT_SUFFIXES) or name == "tau_base":
        return 0.0, 1.0, False, "in [0, 1]"
    if name in POSITIVE_FIELDS or "size" in name:
        return 0.0, math.inf, True, "> 0"
    return 0.0, math.inf, False, ">= 0"


def _numbers(value) -> Optional[List[float]]:
    """The numbers of a numeric field value (a number or a tuple/list of numbers); None otherwise."""
    items = value if isinstance(value, (tuple, list)) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        return None
    return [float(v) for v in items]


def check_numeric_fields(method: str, cfg) -> None:
    """Refuse (NnsslError) a NaN/Inf or out-of-range number in any field of a method config
    (``--set lr=-1`` / ``lr=nan`` would otherwise end in a traceback of torch's optimizer)."""
    from nnssl.errors import NnsslError

    fields = {f.name: _numbers(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    fields = {k: v for k, v in fields.items() if v is not None}
    for name, values in fields.items():
        low, high, open_low, text = numeric_range(name)
        if not all(math.isfinite(v) and (v > low if open_low else v >= low) and v <= high for v in values):
            groups: Dict[str, List[str]] = {}
            for k in fields:
                groups.setdefault(numeric_range(k)[3], []).append(k)
            listing = "; ".join(f"{desc}: {', '.join(names)}" for desc, names in groups.items())
            raise NnsslError(f"{method}: {name}={getattr(cfg, name)!r} is not valid: it must be {text} (and finite). "
                             f"Fix it with --set {name}=VALUE. Valid ranges of the numeric {method} settings -- "
                             f"{listing}.")


def check_common_fields(method: str, cfg) -> None:
    """Refuse (NnsslError) a bad ``transfer`` or ``grad_clip`` field of a method config (fields every
    method config has: SPEC §5) and any number out of its range (:func:`check_numeric_fields`)."""
    from nnssl.errors import NnsslError

    if cfg.transfer not in TRANSFERS:
        raise NnsslError(f"{method}: transfer={cfg.transfer!r} must be one of {', '.join(TRANSFERS)}; fix it with "
                         f"--set transfer=VALUE.")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise NnsslError(f"{method}: grad_clip={cfg.grad_clip} must be > 0 (a max gradient norm) or none (no "
                         f"clipping); fix it with --set grad_clip=none.")
    check_numeric_fields(method, cfg)


def compatible_architectures(method: str) -> List[str]:
    """Names of the registered architectures that have every capability ``method`` requires."""
    from nnssl.architectures.spec import ARCHITECTURES

    needs = METHODS.get(method).requires
    return [name for name, spec in ARCHITECTURES.items() if needs <= spec.capabilities]


def check_compatible(method: str, architecture: str) -> None:
    """Refuse (NnsslError) a method on an architecture that lacks a capability the method needs."""
    from nnssl.architectures.spec import ARCHITECTURES, CAPABILITIES
    from nnssl.errors import NnsslError

    missing = sorted(METHODS.get(method).requires - ARCHITECTURES.get(architecture).capabilities)
    if missing:
        what = "; ".join(f"{m}: {CAPABILITIES[m]}" for m in missing)
        raise NnsslError(
            f"SSL method (-m) '{method}' cannot run on architecture (-a) '{architecture}': it needs {what}. "
            f"Architectures that can: {', '.join(compatible_architectures(method)) or 'none registered'}.")
