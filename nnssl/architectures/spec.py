"""What nnssl needs to know about an architecture, and the registry of them.

An architecture is a network class that nnU-Net can build from a plans file, plus the
planner that writes that plans file and the trainer that fine-tunes it. The plans'
``architecture`` block (``network_class_name`` + ``arch_kwargs``) is what actually builds
the network, for pretraining and fine-tuning alike, so the two cannot drift apart.

Network contract (what SSL methods and weight injection rely on), the same as nnU-Net's
``PlainConvUNet``:

- constructor ``cls(input_channels, num_classes, deep_supervision=..., **arch_kwargs)``;
- ``network.encoder`` (its parameters are the ``encoder`` transferable part) and
  ``network.decoder`` with ``decoder.deep_supervision`` (nnU-Net toggles it) and the output
  convolutions in ``decoder.seg_layers`` (never transferred: nnU-Net's own
  ``-pretrained_weights`` loader skips keys containing ``.seg_layers.`` too);
- ``forward(x: [B, C, X, Y, Z])`` returns ``[B, num_classes, X, Y, Z]``, or a list of
  outputs from full resolution down when deep supervision is on;
- ``compute_conv_feature_map_size(patch_size)`` for the planner's memory estimate;
- ``network.encoder(x)`` returns a list of per-level feature maps, highest resolution first,
  the last one the bottleneck, and ``network.decoder(features)`` turns that list into the output
  (``forward(x) == decoder(encoder(x))``), so SSL methods reach every network's features the same
  way. (LoGoNet's list carries its local branch in an attribute, see ``LoGoFeatures``.)

What an SSL method needs beyond that is a *capability* (:data:`CAPABILITIES`), declared once per
architecture in :attr:`ArchitectureSpec.capabilities` and once per method in
``SSLMethod.requires``; :func:`nnssl.ssl.base.check_compatible` compares the two in one place.
"""
import importlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Sequence, Tuple

import torch
from torch import nn

from nnssl.registry import Registry


# What a method may need from a network, beyond ``forward``. Each is a promise the network keeps.
CAPABILITIES: Dict[str, str] = {
    "bottleneck": "network.encoder(x)[-1] is the bottleneck feature map [B, C, d, h, w]",
    "levels": "every element of network.encoder(x) is a feature map [B, C_i, D_i, H_i, W_i] whose depth axis "
              "D_i = D / s_i follows the input's depth (per-level features with a depth axis)",
    "cropped_decoder": "network.decoder(features) also runs on centre-cropped features (each level cropped to the "
                       "same region, scaled by its stride) and then returns the output for that region only",
}
DEFAULT_CAPABILITIES = frozenset({"bottleneck", "levels"})


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str  # CLI name, e.g. "pct_net"
    planner: str  # dotted path of the nnU-Net ExperimentPlanner subclass that plans it
    plans_name: str  # plans file name without .json, e.g. "nnsslPCTNetPlans"
    trainer: str  # class name of the fine-tuning nnUNetTrainer subclass
    description: str
    # Size presets for tests and the demo ("tiny"): planner attribute overrides. The paper
    # sizes are always the default; a preset is only used when asked for.
    presets: Dict[str, Dict[str, object]] = field(default_factory=dict)
    # Which of CAPABILITIES the network provides (see the module docstring).
    capabilities: FrozenSet[str] = DEFAULT_CAPABILITIES

    def __post_init__(self):
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"architecture '{self.name}' declares unknown capabilities {sorted(unknown)}; "
                             f"known: {sorted(CAPABILITIES)}")

    def planner_class(self):
        module, _, cls = self.planner.rpartition(".")
        return getattr(importlib.import_module(module), cls)


class EncoderDecoderNetwork(nn.Module):
    """The network contract as a base class: ``forward(x) = decoder(encoder(x))`` and nnU-Net's
    memory proxy ``compute_conv_feature_map_size`` = the encoder's + the decoder's. A subclass only
    sets ``self.encoder`` and ``self.decoder`` (each with its own ``compute_conv_feature_map_size``)."""

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        return (self.encoder.compute_conv_feature_map_size(patch_size)
                + self.decoder.compute_conv_feature_map_size(patch_size))


ARCHITECTURES: Registry[ArchitectureSpec] = Registry("architecture", "-a")


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    ARCHITECTURES.add(spec.name, spec)
    return spec


def count_parameters(module) -> int:
    """Number of parameters of a network or sub-module (what the papers' size tables count)."""
    return sum(p.numel() for p in module.parameters())


def architecture_for_plans(plans_name: str) -> ArchitectureSpec:
    """The architecture whose planner writes ``plans_name`` (used to find trainers/presets again)."""
    for _, spec in ARCHITECTURES.items():
        if spec.plans_name == plans_name:
            return spec
    from nnssl.errors import NnsslError
    raise NnsslError(f"No nnssl architecture writes plans '{plans_name}'. Known: "
                     f"{', '.join(s.plans_name for _, s in ARCHITECTURES.items())}.")


def probe_level_shapes(network: nn.Module, crop_size: Sequence[int], num_input_channels: int) -> List[Tuple[int, ...]]:
    """[C_i, D_i, H_i, W_i] of every level of ``network.encoder`` for one zero crop; run without gradients in
    eval mode (BatchNorm statistics untouched), the train/eval flag of every module restored afterwards."""
    param = next(network.parameters())
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((1, int(num_input_channels), *crop_size), device=param.device, dtype=param.dtype)
            features = network.encoder(x)
    finally:
        for m, training in modes:
            m.training = training
    return [tuple(int(s) for s in f.shape[1:]) for f in features]
