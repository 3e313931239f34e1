"""Dropout inside an encoder, for HybridMIM's dropout contrastive term (SimCSE: the same input
encoded twice, the two dropout masks make the two views).

:func:`enable_encoder_dropout` makes ``network.encoder`` drop in training mode without changing the
network's state dict (the checkpoint still holds the segmentation network as planned):

- an encoder that already drops (a dropout or stochastic-depth layer with p > 0, e.g. from the
  plans' ``arch_kwargs``) is left as it is;
- a network with ``set_drop_rate`` (SwinUNETR) gets its ``drop_rate`` dropouts set to p (the
  HybridMIM authors pretrain SwinUNETR with ``drop_rate=0.1``);
- an encoder with ``stages`` (nnU-Net's ``PlainConvEncoder`` / ``ResidualEncoder``) gets a forward
  hook per stage that applies functional dropout to the stage's output in training mode (in eval
  mode the hook is the identity). ``stages="first"`` hooks the first stage only.
"""
from typing import List

import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.swin import DropPath
from nnssl.errors import NnsslError

STAGE_CHOICES = ("all", "first")


def has_active_dropout(module: nn.Module) -> bool:
    """True if any dropout or stochastic-depth layer of ``module`` drops with p > 0."""
    kinds = (nn.modules.dropout._DropoutNd, DropPath)
    return any(isinstance(m, kinds) and float(getattr(m, "p", 0.0)) > 0 for m in module.modules())


def enable_encoder_dropout(network: nn.Module, p: float, stages: str = "all") -> List:
    """Make ``network.encoder`` drop with probability ``p`` (see the module docstring). Returns the
    hook handles (empty when no hook was needed); the hooks live as long as the network.
    NnsslError when the encoder has neither dropout, ``set_drop_rate`` nor ``stages``."""
    if stages not in STAGE_CHOICES:
        raise NnsslError(f"hybrid_mim: encoder_dropout_stages '{stages}' must be one of {STAGE_CHOICES}; fix it "
                         f"with --set encoder_dropout_stages=all.")
    if p == 0 or has_active_dropout(network.encoder):
        return []
    if hasattr(network, "set_drop_rate"):
        network.set_drop_rate(p)
        return []
    blocks = getattr(network.encoder, "stages", None)
    if blocks is None:
        raise NnsslError(f"hybrid_mim: {type(network).__name__}'s encoder has no dropout, no set_drop_rate and no "
                         f"stages to add dropout to, so the dropout contrastive term has no two views. Use "
                         f"--set weight_cl=0, or an architecture that hybrid_mim supports.")
    chosen = list(blocks)[:1] if stages == "first" else list(blocks)
    return [block.register_forward_hook(lambda module, inputs, out: F.dropout(out, p, module.training))
            for block in chosen]
