"""MIS-FM's released PCT-Net weights (openmedlab/MIS-FM ``pctnet_ct10k_volf.pt``: a PyMIC checkpoint,
``{"model_state_dict": ..., "iteration", ...}``, of ``net/pct_net.py``'s ``PCTNet``) read into the
contract as a ``pct_net`` checkpoint.

Key manifest of the authors' ``PCTNet`` (written from its source; ``m`` = resolution_mode, the
file holds all three embeddings and heads, one of them trained):

- ``embeddings.{m}``: ``proj`` (conv), ``conv0`` / ``conv1`` (conv blocks: ``conv_conv.{0 BN, 1
  PReLU, 2 conv, 3 BN, 4 PReLU, 5 dropout, 6 conv}``), ``down1`` / ``down2`` (``conv.{0 BN, 1
  PReLU, 2 conv}`` after a max-pool);
- ``pyramid_ct``: ``convtrans_{e2, e3, e4, d3, d2}`` (``conv.conv_conv.*`` + ``trans.blocks.{j}``
  Swin blocks: ``norm1``, ``attn.{relative_position_bias_table, relative_position_index, qkv,
  proj}``, ``norm2``, ``mlp.{fc1, fc2}``; an unused ``norm_layer``), ``down3`` / ``down4``,
  ``up3`` / ``up4`` (``up.{0 BN, 1 PReLU, 2 transposed conv}``, ``conv.{0, 1, 2}`` on
  ``cat([skip, up])``), ``out_conv2`` / ``out_conv3``;
- ``pred_heads.{m}``: ``up1`` / ``up2``, ``conv0`` / ``conv1``, ``out_conv0`` / ``out_conv1``.

Mapping onto nnssl's ``pct_net`` (same layers, other names): resolution_mode 1 is the "aniso"
embedding, 0 "iso" (mode 2, 1x4x4, has no nnssl counterpart); the mode whose embedding BatchNorm
has seen batches is the trained one (else 1, the authors' demo setting). nnssl concatenates
``[up, skip]`` where the authors concatenate ``[skip, up]``: the fusing BN and conv input channels
are swapped. The authors' bias-table index multiplies the depth offset by ``3 * w - 1`` (not
``(2w - 1)^2``), so offsets share table rows; each of nnssl's rows (one per offset) gets the
authors' row for that offset: the same function. Output convs are dropped (never transferred).
The Swin branch computes with padded tokens unmasked (``swin_mask_padding=False``), as theirs.

Plans facts: the paper's 64x128x128 sub-volume, CT clipped to [-1000, 1000] and scaled to [-1, 1]
(CTNormalization with the window's statistics); the pretraining spacing is not published, so the
checkpoint records none and ``--like`` keeps the target's own nnU-Net spacing. ``transfer`` is
"encoder+decoder": Volume Fusion pretrains the whole segmentation network.
"""
import os
import re
from typing import Dict, List, Tuple

import torch

from nnssl.checkpoints.contract import CHECKPOINT_VERSION, strip_prefixes, to_plain
from nnssl.checkpoints.foreign import UNKNOWN, ForeignFormat, register_format
from nnssl.errors import NnsslError

NAME = "mis_fm"
PATCH = [64, 128, 128]
WINDOW_STATISTICS = {"mean": 0.0, "median": 0.0, "std": 1000.0, "min": -1000.0, "max": 1000.0,
                     "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}  # clip, then x / 1000
EMBEDDINGS = {0: "iso", 1: "aniso"}
DEFAULT_MODE = 1  # demo/pctnet_pretrain.cfg: resolution_mode = 1
_BLOCK = {"conv_conv.0.": "conv1.norm.", "conv_conv.1.": "conv1.act.", "conv_conv.2.": "conv1.conv.",
          "conv_conv.3.": "conv2.norm.", "conv_conv.4.": "conv2.act.", "conv_conv.6.": "conv2.conv."}
_PREACT = {"0.": "norm.", "1.": "act.", "2.": "conv."}


def _state_dict(obj):
    return obj.get("model_state_dict") if isinstance(obj, dict) else None


def detect(obj) -> bool:
    sd = _state_dict(obj)
    return isinstance(sd, dict) and any(strip_prefixes(k).startswith("pyramid_ct.convtrans_e2.") for k in sd)


def _pairs(mode: int) -> List[Tuple[str, str, str]]:
    """(authors' prefix, nnssl prefix, kind) for every mapped module."""
    e, h, p = f"embeddings.{mode}.", f"pred_heads.{mode}.", "pyramid_ct."
    pairs = [(e + "proj.", "encoder.stem.0.", "plain"), (e + "conv0.", "encoder.stem_blocks.0.", "block"),
             (e + "down1.conv.", "encoder.stem.1.", "preact"), (e + "conv1.", "encoder.stem_blocks.1.", "block"),
             (e + "down2.conv.", "encoder.down.0.", "preact"), (p + "down3.conv.", "encoder.down.1.", "preact"),
             (p + "down4.conv.", "encoder.down.2.", "preact"), (h + "conv0.", "decoder.blocks.0.", "block"),
             (h + "conv1.", "decoder.blocks.1.", "block")]
    for level, name in ((0, "e2"), (1, "e3"), (2, "e4")):
        pairs.append((f"{p}convtrans_{name}.", f"encoder.stages.{level}.", "pct"))
    for level, name in ((2, "d2"), (3, "d3")):
        pairs.append((f"{p}convtrans_{name}.", f"decoder.blocks.{level}.", "pct"))
    for level, up in ((0, h + "up1."), (1, h + "up2."), (2, p + "up3."), (3, p + "up4.")):
        pairs += [(up + "up.", f"decoder.up.{level}.", "preact"), (up + "conv.", f"decoder.fuse.{level}.", "fuse")]
    return pairs


def _suffix(kind: str, rest: str):
    """The nnssl name below the module for the authors' ``rest`` (None: not mapped)."""
    if kind == "plain":
        return rest
    if kind == "block":
        table = _BLOCK
    elif kind in ("preact", "fuse"):
        table = _PREACT
    elif rest.startswith("conv."):  # pct: the conv branch
        inner = _suffix("block", rest[len("conv."):])
        return inner and "conv." + inner
    else:
        m = re.match(r"trans\.blocks\.(\d+)\.(.*)", rest)
        return f"swin.{m.group(1)}.{m.group(2)}" if m else None
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def authors_index(window: int) -> torch.Tensor:
    """[w^3, w^3]: the bias-table row the authors' WindowAttention reads for each token pair."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (3 * window - 1) + rel[1] * (2 * window - 1) + rel[2]


def _mode(sd: Dict[str, torch.Tensor]) -> int:
    trained = [m for m in (0, 1, 2) if int(sd.get(f"embeddings.{m}.conv0.conv_conv.0.num_batches_tracked", 0)) > 0]
    return trained[0] if len(trained) == 1 else DEFAULT_MODE


def to_native(obj, path: str) -> dict:
    from nnssl.architectures.blocks.swin import relative_position_index
    from nnssl.architectures.pct_net import PCTNet, PCTNetConfig

    where = f"MIS-FM PCT-Net checkpoint {path}"
    sd = {strip_prefixes(k): v for k, v in _state_dict(obj).items()}
    mode = _mode(sd)
    if mode not in EMBEDDINGS:
        raise NnsslError(f"{where}: resolution_mode {mode} (1x4x4 embedding) has no nnssl PCT-Net counterpart.")
    try:
        e = f"embeddings.{mode}."
        channels = [sd[e + "proj.weight"].shape[0], sd[e + "down1.conv.2.weight"].shape[0],
                    sd[e + "down2.conv.2.weight"].shape[0], sd["pyramid_ct.down3.conv.2.weight"].shape[0],
                    sd["pyramid_ct.down4.conv.2.weight"].shape[0]]
        levels = ("e2", "e3", "e4")
        heads = [sd[f"pyramid_ct.convtrans_{n}.trans.blocks.0.attn.relative_position_bias_table"].shape[1] for n in levels]
        depth = len({k.split(".")[4] for k in sd if k.startswith("pyramid_ct.convtrans_e2.trans.blocks.")})
        window = round(sd["pyramid_ct.convtrans_e2.trans.blocks.0.attn.relative_position_index"].shape[0] ** (1 / 3))
        fc1 = sd["pyramid_ct.convtrans_e2.trans.blocks.0.mlp.fc1.weight"]
    except KeyError as err:
        raise NnsslError(f"{where}: {err} is missing; the file is damaged or not MIS-FM's PCT-Net.") from None
    cfg = PCTNetConfig(channels=channels, heads=heads, swin_depth=depth, window_size=window,
                       mlp_ratio=fc1.shape[0] / fc1.shape[1], embedding=EMBEDDINGS[mode], swin_mask_padding=False)
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    channels_in = int(sd[e + "proj.weight"].shape[1])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PCTNet(channels_in, 2, **kwargs).state_dict().items()
                    if ".seg_layers." not in k}
    theirs, ours = authors_index(window), relative_position_index((window,) * 3)
    pairs = _pairs(mode)
    weights, dropped = {}, []
    for key, tensor in sd.items():
        match = next(((src, dst, kind) for src, dst, kind in pairs if key.startswith(src)), None)
        suffix = match and _suffix(match[2], key[len(match[0]):])
        if suffix is None:
            dropped.append(key)
            continue
        name = match[1] + suffix
        if name.endswith("attn.relative_position_index"):
            if not torch.equal(tensor.cpu().long(), theirs):
                raise NnsslError(f"{where}: {key} is not the authors' index of a {window}^3 window; damaged file.")
            continue
        if name.endswith("relative_position_bias_table"):
            table = torch.empty(expected.get(name, (0,)), dtype=tensor.dtype)
            table[ours.reshape(-1)] = tensor[theirs.reshape(-1)]
            tensor = table
        elif match[2] == "fuse":
            tensor = _swap_halves(tensor, suffix)
        if expected.get(name) != tuple(tensor.shape):
            raise NnsslError(f"{where}: {key} {tuple(tensor.shape)} does not fit nnssl's {name} {expected.get(name)}.")
        weights[name] = tensor
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise NnsslError(f"{where}: {len(missing)} PCT-Net tensors are missing (e.g. {', '.join(missing[:3])}); the "
                         f"file is damaged.")
    source = {"format": "MIS-FM PyMIC PCTNet", "file": os.path.basename(path), "resolution_mode": mode,
              "iteration": obj.get("iteration"), "dropped_keys": dropped}
    return {"nnssl_checkpoint_version": CHECKPOINT_VERSION,
            "architecture": {"name": "pct_net", "network_class_name": "nnssl.architectures.pct_net.PCTNet",
                             "arch_kwargs": kwargs, "_kw_requires_import": []},
            "plans_name": "MIS-FM_VolF", "configuration": "3d_fullres", "data_identifier": "MIS-FM_VolF",
            "input_channels": channels_in,
            "normalization": {"normalization_schemes": ["CTNormalization"] * channels_in,
                              "use_mask_for_norm": [False] * channels_in,
                              "foreground_intensity_properties_per_channel": {str(c): dict(WINDOW_STATISTICS)
                                                                               for c in range(channels_in)},
                              "spacing": None, "patch_size": list(PATCH), "transpose_forward": [0, 1, 2]},
            "method": {"name": NAME, "config": to_plain({"source": source})},
            "pretraining_data": "MIS-FM", "dataset": "MIS-FM", "iteration": UNKNOWN, "transfer": "encoder+decoder",
            "seed": UNKNOWN, "network_weights": weights}


def _swap_halves(tensor: torch.Tensor, suffix: str) -> torch.Tensor:
    """The fusing layer's input channels from the authors' [skip, up] order to nnssl's [up, skip]
    (BN parameters and statistics: dim 0; the conv weight: dim 1; the conv bias, the PReLU slope
    and the batch counter do not depend on the input channels)."""
    if suffix in ("conv.bias", "act.weight", "norm.num_batches_tracked"):
        return tensor
    dim = 1 if suffix == "conv.weight" else 0
    half = tensor.shape[dim] // 2
    return torch.cat([tensor.narrow(dim, half, half), tensor.narrow(dim, 0, half)], dim=dim)


register_format(ForeignFormat(
    name=NAME, description="MIS-FM's PCT-Net weights (PyMIC checkpoint with model_state_dict, openmedlab/MIS-FM)",
    detect=detect, to_native=to_native))
