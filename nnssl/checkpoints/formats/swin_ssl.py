"""Swin-UNETR self-supervised weights (Tang et al., CVPR 2022; ``model_swinvit.pt``, the file MONAI's
tutorials load with ``SwinUNETR.load_from``) read into the contract as a ``swinunetr`` checkpoint.

The layout (MONAI ``SwinUNETR.load_from`` / ``SwinTransformerBlock.load_from``, and the
research-contributions fine-tuning script that renames prefixes): ``{"state_dict": {...}}`` (or the
state dict itself) of the Swin ViT alone, keys under ``module.`` (the released file), ``swinViT.``
or ``swin_vit.`` (renamed copies), or ``module.swinViT.`` with the SSL heads (``rotation_head``,
``contrastive_head``, ``conv``: the whole SSLHead under DDP). Below the prefix: MONAI's Swin ViT
names (``patch_embed.proj``, ``layers{1-4}.0.blocks.{i}.{norm1, attn.*, norm2}``,
``layers{i}.0.downsample.{norm, reduction}``), with the MLP as ``mlp.fc1`` / ``mlp.fc2`` (MONAI:
``mlp.linear1`` / ``linear2``; both spellings are read) and a constant ``attn.relative_position_index``
per block (checked against nnssl's, then dropped).

The network: feature size, input channels, depths, heads, window and MLP ratio are read from the
tensor shapes; the weights were trained with MONAI < 1.5's patch-merging order, so the network
is built with ``legacy_patch_merging=True`` and ``attention_compat="monai"`` (the attention maths
they were trained with). Only ``encoder.swinViT`` comes from the file: SwinUNETR's conv encoder
blocks (``encoder.encoder1-4, 10``) are not part of the released weights. Plans facts are the
pretraining's (the authors' ``Pretrain/main.py`` defaults): spacing 1.5 x 1.5 x 2.0 mm (x, y, z;
[2.0, 1.5, 1.5] in nnU-Net's z, y, x order), CT clipped to [-1000, 1000] and scaled to [0, 1]
(written as nnU-Net's CTNormalization with mean -1000 and std 2000), 96^3 patch.
"""
import os
import re

import torch

from nnssl.checkpoints.contract import CHECKPOINT_VERSION, strip_prefixes, to_plain
from nnssl.checkpoints.foreign import UNKNOWN, ForeignFormat, register_format
from nnssl.errors import NnsslError

NAME = "swin_ssl"
_PREFIXES = ("module.", "swinViT.", "swin_vit.")
_HEADS = ("rotation_pre", "rotation_head", "contrastive_pre", "contrastive_head", "conv.")
_INDEX = "attn.relative_position_index"
_MLP = {"mlp.fc1.": "mlp.linear1.", "mlp.fc2.": "mlp.linear2."}
PATCH = [96, 96, 96]
SPACING = [2.0, 1.5, 1.5]  # nnU-Net order (z, y, x) of the authors' space_x = space_y = 1.5, space_z = 2.0
# ScaleIntensityRanged(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True) as CTNormalization:
# clip to the percentiles, then (x - mean) / std = (x + 1000) / 2000.
CT_PROPERTIES = {"mean": -1000.0, "median": 0.0, "std": 2000.0, "min": -1000.0, "max": 1000.0,
                 "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}


def _swin_key(key: str) -> str:
    """'module.swinViT.layers1.0.blocks.0.mlp.fc1.weight' -> 'layers1.0.blocks.0.mlp.linear1.weight'."""
    key = strip_prefixes(key, _PREFIXES)
    for src, dst in _MLP.items():
        key = key.replace(src, dst)
    return key


def _state_dict(obj):
    return obj.get("state_dict") if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj


def detect(obj) -> bool:
    sd = _state_dict(obj)
    if not isinstance(sd, dict) or "nnssl_checkpoint_version" in sd:
        return False
    keys = {_swin_key(str(k)) for k in sd}
    return "patch_embed.proj.weight" in keys and "layers1.0.blocks.0.attn.qkv.weight" in keys


def _config(sd: dict, where: str) -> dict:
    """Swin ViT hyper-parameters from the tensor shapes."""
    embed = sd["patch_embed.proj.weight"]  # [fs, C_in, 2, 2, 2]
    if tuple(embed.shape[2:]) != (2, 2, 2):
        raise NnsslError(f"{where}: patch embedding kernel {tuple(embed.shape[2:])}; SwinUNETR embeds 2x2x2 patches.")
    depths, heads = [], []
    for layer in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers{layer}\.0\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise NnsslError(f"{where}: no blocks for Swin stage layers{layer}; the file is not a Swin ViT of 4 stages.")
        depths.append(len(blocks))
        heads.append(int(sd[f"layers{layer}.0.blocks.0.attn.relative_position_bias_table"].shape[1]))
    rows = int(sd["layers1.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    window = int(round(((rows ** (1 / 3)) + 1) / 2))
    if (2 * window - 1) ** 3 != rows:
        raise NnsslError(f"{where}: a relative position table of {rows} rows is not the one of a cubic window.")
    fc1 = sd["layers1.0.blocks.0.mlp.linear1.weight"]
    return {"input_channels": int(embed.shape[1]), "feature_size": int(embed.shape[0]), "depths": depths,
            "num_heads": heads, "window_size": window, "mlp_ratio": fc1.shape[0] / fc1.shape[1],
            "qkv_bias": "layers1.0.blocks.0.attn.qkv.bias" in sd}


def to_native(obj, path: str) -> dict:
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.architectures.swinunetr import SwinUNETR, relative_position_index

    where = f"Swin-UNETR SSL weights {path}"
    raw = _state_dict(obj)
    sd, dropped = {}, []
    for key, tensor in raw.items():
        if any(_swin_key(key).startswith(h) for h in _HEADS):
            dropped.append(key)
        else:
            sd[_swin_key(key)] = tensor
    cfg = _config(sd, where)
    channels = cfg.pop("input_channels")
    planner = ARCHITECTURES.get("swinunetr").planner_class().without_dataset(channels, 2)
    block = planner.network_for_patch(PATCH)
    kwargs = {**to_plain(block["arch_kwargs"]), **cfg, "legacy_patch_merging": True, "attention_compat": "monai"}
    with torch.device("meta"):
        net = SwinUNETR(channels, 2, **kwargs)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("encoder.swinViT.")}
    index = relative_position_index(net.config.window_size)
    weights = {}
    for key, tensor in sd.items():
        if key.endswith(_INDEX):
            if not torch.equal(tensor.cpu(), index):
                raise NnsslError(f"{where}: {key} is not the relative-position index of a window of "
                                 f"{cfg['window_size']} (read from the bias tables); the file is damaged.")
            continue
        name = "encoder.swinViT." + key
        if expected.get(name) != tuple(tensor.shape):
            raise NnsslError(f"{where}: tensor {key} {tuple(tensor.shape)} has no place in the Swin ViT its shapes "
                             f"describe (expected {expected.get(name)}); the file is damaged or not Swin-UNETR's.")
        weights[name] = tensor
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise NnsslError(f"{where}: {len(missing)} Swin ViT tensors are missing (e.g. {', '.join(missing[:3])}); the "
                         f"file is damaged.")
    source = {"format": "Swin-UNETR SSL model_swinvit.pt", "file": os.path.basename(path),
              "epoch": obj.get("epoch") if isinstance(obj, dict) else None, "dropped_keys": dropped}
    return {"nnssl_checkpoint_version": CHECKPOINT_VERSION,
            "architecture": {"name": "swinunetr", "network_class_name": block["network_class_name"],
                             "arch_kwargs": kwargs, "_kw_requires_import": list(block.get("_kw_requires_import", []))},
            "plans_name": "SwinUNETR_SSL_Pretrain", "configuration": "3d_fullres",
            "data_identifier": "SwinUNETR_SSL_Pretrain", "input_channels": channels,
            "normalization": {"normalization_schemes": ["CTNormalization"] * channels,
                              "use_mask_for_norm": [False] * channels,
                              "foreground_intensity_properties_per_channel": {str(c): dict(CT_PROPERTIES)
                                                                               for c in range(channels)},
                              "spacing": list(SPACING), "patch_size": list(PATCH), "transpose_forward": [0, 1, 2]},
            "method": {"name": NAME, "config": to_plain({"source": source})},
            "pretraining_data": "SwinUNETR_SSL", "dataset": "SwinUNETR_SSL",
            "iteration": UNKNOWN, "transfer": "encoder", "seed": UNKNOWN, "network_weights": weights}


register_format(ForeignFormat(
    name=NAME, description="Swin-UNETR self-supervised Swin ViT weights (model_swinvit.pt, MONAI tutorials)",
    detect=detect, to_native=to_native))
