"""The pretraining checkpoint contract: the hand-over from pretraining to fine-tuning.

A pretraining checkpoint is a torch file that loads with ``torch.load(path, weights_only=True)``
(tensors and plain Python values only) with these keys:

- ``network_weights``: state dict of the segmentation network, without the method's heads and
  without the output convolutions (keys containing ``.seg_layers.``, re-initialized at
  fine-tuning), ``module.`` / ``_orig_mod.`` prefixes stripped. For nnU-Net's networks this is
  exactly what stock ``nnUNetv2_train -pretrained_weights`` expects.
- ``nnssl_checkpoint_version`` (1), ``architecture`` {name, network_class_name, arch_kwargs,
  _kw_requires_import}, ``plans_name``, ``configuration``, ``data_identifier``,
  ``normalization`` {normalization_schemes, use_mask_for_norm,
  foreground_intensity_properties_per_channel, spacing, patch_size, transpose_forward},
  ``input_channels``, ``method`` {name, config}, ``pretraining_data``, ``dataset``,
  ``iteration``, ``transfer`` ("encoder" | "encoder+decoder"), ``seed``;
- ``resume`` (only needed by ``nnssl_pretrain --c``): optimizer / head / GradScaler state,
  the excluded output-conv weights, the loss history.

A JSON copy of the metadata (everything but tensors and resume state) is written beside it.

Readers of other files (model archives, foreign pretrained formats) turn them into this dict; the
plans check is in :mod:`nnssl.checkpoints.plans_check`, loading from a path in
:mod:`nnssl.checkpoints.loading`.
"""
import dataclasses
import hashlib
import os
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

CHECKPOINT_VERSION = 1
OUTPUT_HEAD_KEY_PART = ".seg_layers."  # the same rule as nnU-Net's load_pretrained_weights
_PREFIXES = ("module.", "_orig_mod.")
METADATA_KEYS = ("nnssl_checkpoint_version", "architecture", "plans_name", "configuration", "data_identifier",
                 "normalization", "input_channels", "method", "pretraining_data", "dataset", "iteration",
                 "transfer", "seed")
# Written when the metadata has them (pretraining case provenance, nnssl/training/pretraining_cases.py).
OPTIONAL_METADATA_KEYS = ("pretraining_cases_sha256", "pretraining_cases_count")
RESUME_KEYS = ("optimizer", "method_state", "grad_scaler", "network_excluded", "loss_history", "schedule")


def to_plain(obj):
    """Tuples -> lists, dataclasses -> dicts, numpy scalars/arrays -> Python values (weights_only/JSON-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def strip_prefixes(key: str, prefixes: Tuple[str, ...] = _PREFIXES) -> str:
    """'module._orig_mod.encoder.x' -> 'encoder.x' (by default the DDP and torch.compile wrappers)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def is_output_head(key: str) -> bool:
    """Whether a state-dict key belongs to the output convolutions (never saved as transferable,
    never injected): 'decoder.seg_layers.0.weight' -> True."""
    return OUTPUT_HEAD_KEY_PART in key


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers (in any nesting)."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def split_network_state(network: nn.Module):
    """(transferable weights, excluded output-conv weights), both CPU state dicts with clean keys."""
    keep, excluded = {}, {}
    for k, v in unwrap_network(network).state_dict().items():
        k = strip_prefixes(k)
        target = excluded if is_output_head(k) else keep
        target[k] = v.detach().to("cpu", copy=True)
    return keep, excluded


def plans_facts(plans_manager, configuration_name: str) -> dict:
    """What a plans configuration says about the images the network sees: ``{plans_name,
    configuration, data_identifier, normalization: {...}}`` (the checkpoint's keys of the same names)."""
    cm = plans_manager.get_configuration(configuration_name)
    return to_plain({
        "plans_name": plans_manager.plans_name,
        "configuration": configuration_name,
        "data_identifier": cm.data_identifier,
        "normalization": {
            "normalization_schemes": cm.normalization_schemes,
            "use_mask_for_norm": cm.use_mask_for_norm,
            "foreground_intensity_properties_per_channel":
                plans_manager.plans.get("foreground_intensity_properties_per_channel"),
            "spacing": cm.spacing, "patch_size": cm.patch_size, "transpose_forward": plans_manager.transpose_forward,
        },
    })


def checkpoint_metadata(*, architecture_name: str, plans_manager, configuration_name: str, input_channels: int,
                        method_name: str, method_config, transfer: str, pretraining_data: str, dataset: str,
                        iteration: int, seed: int) -> dict:
    """Everything but the tensors, as plain Python values (nnU-Net PlansManager for the plans facts)."""
    cm = plans_manager.get_configuration(configuration_name)
    return to_plain({
        "nnssl_checkpoint_version": CHECKPOINT_VERSION,
        "architecture": {"name": architecture_name, "network_class_name": cm.network_arch_class_name,
                         "arch_kwargs": cm.network_arch_init_kwargs,
                         "_kw_requires_import": cm.network_arch_init_kwargs_req_import},
        **plans_facts(plans_manager, configuration_name),
        "input_channels": int(input_channels),
        "method": {"name": method_name, "config": method_config},
        "pretraining_data": pretraining_data,
        "dataset": dataset,
        "iteration": int(iteration),
        "transfer": transfer,
        "seed": int(seed),
    })


def save_pretraining_checkpoint(path: str, network: nn.Module, metadata: dict,
                                resume: Optional[dict] = None) -> None:
    """Write ``path`` (atomically) and the JSON metadata copy beside it (``.pth`` -> ``.json``).

    ``resume``: optimizer/method/scaler state etc.; the excluded output convs are added to it so
    ``--c`` restores the whole network.
    """
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    weights, excluded = split_network_state(network)
    keys = METADATA_KEYS + tuple(k for k in OPTIONAL_METADATA_KEYS if k in metadata)
    ckpt = {**to_plain({k: metadata[k] for k in keys}), "network_weights": weights}
    if resume is not None:
        ckpt["resume"] = {**resume, "network_excluded": excluded}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    write_json(to_plain({k: metadata[k] for k in keys}), os.path.splitext(path)[0] + ".json")


def publish_final(latest: str, final: str) -> None:
    """Copy a checkpoint and its JSON (atomically) to ``final`` -- cheaper than saving again."""
    for src, dst in ((latest, final), (os.path.splitext(latest)[0] + ".json", os.path.splitext(final)[0] + ".json")):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def check_contract(ckpt, path: str) -> dict:
    """``ckpt`` (loaded from ``path``) if it is a complete checkpoint of this contract, else NnsslError."""
    if not isinstance(ckpt, dict) or "nnssl_checkpoint_version" not in ckpt:
        raise NnsslError(f"{path} is not an nnssl pretraining checkpoint (no 'nnssl_checkpoint_version' key) nor a "
                         f"pretrained file of a format nnssl reads; use a checkpoint_final.pth written by "
                         f"nnssl_pretrain, a model archive, or nnssl_import_pretrained for a foreign file.")
    if ckpt["nnssl_checkpoint_version"] != CHECKPOINT_VERSION:
        raise NnsslError(f"{path} has checkpoint version {ckpt['nnssl_checkpoint_version']}, this nnssl reads "
                         f"version {CHECKPOINT_VERSION}; use a matching nnssl version.")
    missing = [k for k in (*METADATA_KEYS, "network_weights") if k not in ckpt]
    if missing:
        raise NnsslError(f"Checkpoint {path} is incomplete (missing {', '.join(missing)}); it is corrupted, "
                         f"rerun nnssl_pretrain to write it again.")
    return ckpt


def restore_network(network: nn.Module, ckpt: dict) -> None:
    """Load the full network (transferable weights + excluded output convs) from a resume checkpoint."""
    state = {**ckpt["network_weights"], **ckpt["resume"]["network_excluded"]}
    unwrap_network(network).load_state_dict(state, strict=True)


def weights_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """A digest of a state dict (names, shapes, dtypes, bytes) to check that two copies are identical."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
