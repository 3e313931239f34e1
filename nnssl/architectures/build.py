"""The public network API: build any registered architecture without a plans file, or the network
of a pretraining checkpoint with its weights (what timm's ``create_model`` is for timm)::

    from nnssl.architectures import build_network
    net = build_network("pct_net", patch_size=(64, 128, 128), input_channels=1, num_classes=14)

    import nnssl
    pretrained = nnssl.load_pretrained("…/checkpoint_final.pth")

``build_network`` asks the architecture's planner for the plans' ``architecture`` block it would
write for that patch (``network_for_patch``, the same code that plans a dataset) and builds it
with nnU-Net's ``get_network_from_plans``, exactly as pretraining and fine-tuning build it from a
plans file. ``load_pretrained`` builds from the checkpoint's own ``architecture`` block.
"""
from typing import Optional, Sequence

from torch import nn

from nnssl.errors import NnsslError


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NnsslError(f"build_network: {name} must be a positive integer (got {value!r}).")
    return value


def _from_block(block: dict, input_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(block["network_class_name"], block["arch_kwargs"],
                                  block.get("_kw_requires_import") or (), input_channels, num_classes,
                                  allow_init=True, deep_supervision=deep_supervision)


def build_network(name: str, patch_size: Sequence[int], input_channels: int, num_classes: int,
                  deep_supervision: bool = False, preset: Optional[str] = None,
                  spacing: Optional[Sequence[float]] = None) -> nn.Module:
    """A freshly initialized network of the registered architecture ``name`` for ``patch_size``
    ([D, H, W] voxels): input ``[B, input_channels, D, H, W]`` -> ``[B, num_classes, D, H, W]``
    (a list, full resolution first, with ``deep_supervision``).

    ``preset``: one of the architecture's size presets (e.g. ``"tiny"``), default the paper's size;
    ``spacing`` (mm, default isotropic 1 mm): what the planner would plan for (nnU-Net's pooling
    and PCT-Net's embedding follow the spacing). NnsslError for an unknown name (with the list), a
    patch the architecture cannot take (with what it must be divisible by), or < 1 classes/channels.
    """
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.planning.planners import ISOTROPIC_SPACING

    spec = ARCHITECTURES.get(name)
    input_channels = _positive_int("input_channels", input_channels)
    num_classes = _positive_int("num_classes", num_classes)
    if preset is not None and preset not in spec.presets:
        raise NnsslError(f"build_network: architecture '{name}' has no preset '{preset}'; it has "
                         f"{', '.join(sorted(spec.presets)) or 'none'} (preset=None builds the paper's size).")
    planner = spec.planner_class().without_dataset(input_channels, max(num_classes, 2), preset=preset)
    block = planner.network_for_patch(patch_size, ISOTROPIC_SPACING if spacing is None else spacing)
    return _from_block(block, input_channels, num_classes, deep_supervision)


def load_pretrained(checkpoint: str, num_classes: Optional[int] = None, deep_supervision: bool = False) -> nn.Module:
    """The segmentation network of an nnssl pretraining checkpoint, with its pretrained weights.

    ``num_classes=None``: the output convolutions of the pretraining network too (restored from the
    checkpoint's resume state), i.e. exactly the network that was pretrained; with ``num_classes``,
    fresh output convolutions for that many classes (what fine-tuning starts from).
    """
    from nnssl.checkpoints import is_output_head, load_pretraining_checkpoint

    ckpt = load_pretraining_checkpoint(checkpoint)
    weights = dict(ckpt["network_weights"])
    fresh_heads = num_classes is not None
    if not fresh_heads:
        heads = (ckpt.get("resume") or {}).get("network_excluded") or {}
        if not heads:
            raise NnsslError(f"Checkpoint {checkpoint} holds no output convolutions (no resume state); pass "
                             f"num_classes to build fresh ones.")
        weights.update(heads)
        # every output conv (weight [classes, C, 1, 1, 1]) maps to the pretraining network's outputs
        num_classes = int(heads[sorted(k for k in heads if k.endswith(".weight"))[0]].shape[0])
    net = _from_block(ckpt["architecture"], int(ckpt["input_channels"]), _positive_int("num_classes", num_classes),
                      deep_supervision)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (fresh_heads and is_output_head(k))]
    if missing or unexpected:
        raise NnsslError(f"Checkpoint {checkpoint} does not match the network its own metadata describes (missing "
                         f"{missing[:5]}, unexpected {list(unexpected)[:5]}); it is corrupted or from another nnssl "
                         f"version.")
    return net
