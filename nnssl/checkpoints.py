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

Plans check (:func:`compare_plans`): fine-tuning compares the plans facts the checkpoint was
pretrained under with those of the fine-tuning plans. Differences that change what the network
sees (target spacing, ``transpose_forward``, normalization schemes, ``use_mask_for_norm``, the
intensity statistics a scheme normalizes with, e.g. CTNormalization's clipping percentiles, mean
and std) are *refused*; the others (plans name, configuration name, data identifier, patch size,
statistics no scheme uses) are *harmless* and only reported.
"""
import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

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


def strip_prefixes(key: str) -> str:
    """'module._orig_mod.encoder.x' -> 'encoder.x' (DDP and torch.compile wrappers)."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
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


def _load_weights_only(path: str) -> dict:
    if not os.path.isfile(path):
        raise NnsslError(f"Checkpoint {path} does not exist; pass the path of a pretraining checkpoint_final.pth.")
    from nnssl.sharing import load_checkpoint_file  # a model archive (.zip) is accepted wherever a checkpoint is

    try:
        ckpt = load_checkpoint_file(path)
    except NnsslError:
        raise
    except Exception as e:  # truncated file, not a torch file, or unsafe pickled objects
        raise NnsslError(
            f"Checkpoint {path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It is corrupted (e.g. an interrupted copy) or not an nnssl "
            f"pretraining checkpoint; copy it again or rerun nnssl_pretrain.") from None
    if not isinstance(ckpt, dict) or "nnssl_checkpoint_version" not in ckpt:
        raise NnsslError(f"{path} is not an nnssl pretraining checkpoint (no 'nnssl_checkpoint_version' key); "
                         f"use a checkpoint_final.pth written by nnssl_pretrain.")
    if ckpt["nnssl_checkpoint_version"] != CHECKPOINT_VERSION:
        raise NnsslError(f"{path} has checkpoint version {ckpt['nnssl_checkpoint_version']}, this nnssl reads "
                         f"version {CHECKPOINT_VERSION}; use a matching nnssl version.")
    missing = [k for k in (*METADATA_KEYS, "network_weights") if k not in ckpt]
    if missing:
        raise NnsslError(f"Checkpoint {path} is incomplete (missing {', '.join(missing)}); it is corrupted, "
                         f"rerun nnssl_pretrain to write it again.")
    return ckpt


def _kwargs_differences(expected: dict, found: dict):
    exp, got = to_plain(expected), to_plain(found)
    diffs = []
    for k in sorted(set(exp) | set(got)):
        if k not in got:
            diffs.append(f"arch_kwargs['{k}'] missing in the checkpoint (expected {exp[k]!r})")
        elif k not in exp:
            diffs.append(f"arch_kwargs['{k}'] = {got[k]!r} in the checkpoint is not expected")
        elif exp[k] != got[k]:
            diffs.append(f"arch_kwargs['{k}']: checkpoint {got[k]!r}, expected {exp[k]!r}")
    return diffs


def load_pretraining_checkpoint(path: str, expected_architecture_class: Optional[str] = None,
                                expected_arch_kwargs: Optional[Dict] = None,
                                expected_input_channels: Optional[int] = None) -> dict:
    """Load and validate a pretraining checkpoint; refuse (NnsslError) one that does not fit.

    Every difference from the expectations is listed in one message.
    """
    ckpt = _load_weights_only(path)
    arch = ckpt["architecture"]
    diffs = []
    if expected_architecture_class is not None and arch.get("network_class_name") != expected_architecture_class:
        diffs.append(f"architecture class: checkpoint {arch.get('network_class_name')}, "
                     f"expected {expected_architecture_class}")
    if expected_arch_kwargs is not None:
        diffs.extend(_kwargs_differences(expected_arch_kwargs, arch.get("arch_kwargs", {})))
    if expected_input_channels is not None and int(ckpt["input_channels"]) != int(expected_input_channels):
        diffs.append(f"input channels: checkpoint {ckpt['input_channels']}, expected {expected_input_channels}")
    if diffs:
        raise NnsslError(
            f"Checkpoint {path} does not fit the network it should initialize: " + "; ".join(diffs) + ". "
            f"Pretrain with the same architecture and plans as the fine-tuning (nnssl_pretrain -a ...), "
            f"or fine-tune with the plans the checkpoint was pretrained under.")
    return ckpt


def load_resume_checkpoint(path: str) -> dict:
    """A checkpoint for ``--c``: the contract plus a complete ``resume`` block, else NnsslError."""
    try:
        ckpt = _load_weights_only(path)
    except NnsslError as e:
        raise NnsslError(f"Cannot resume: {e} To start over instead, remove {os.path.dirname(path)}.") from None
    resume = ckpt.get("resume")
    missing = [k for k in RESUME_KEYS if not isinstance(resume, dict) or k not in resume]
    if missing:
        raise NnsslError(f"Cannot resume from {path}: its resume state is incomplete (missing "
                         f"{', '.join(missing)}), the file is corrupted. Remove it (and the folder "
                         f"{os.path.dirname(path)} to start over).")
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


# Relative tolerance for float facts (spacing, intensity statistics): plans written by the same
# planner from the same data agree exactly; a JSON round trip must not count as a difference.
PLANS_RTOL = 1e-6


@dataclass
class PlansComparison:
    """The result of :func:`compare_plans`: one line per difference, checkpoint value first."""
    refused: List[str] = field(default_factory=list)  # change what the network sees
    harmless: List[str] = field(default_factory=list)  # reported only

    def to_dict(self) -> dict:
        return {"refused": list(self.refused), "harmless": list(self.harmless)}


def _close(a, b) -> bool:
    try:
        return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                rtol=PLANS_RTOL, atol=0.0))
    except (TypeError, ValueError):  # different lengths or non-numbers
        return False


def scheme_uses_intensity_statistics(scheme: str) -> bool:
    """Whether nnU-Net's normalization ``scheme`` reads the plans' foreground intensity statistics
    (CTNormalization and subclasses clip and scale with them; z-score and rescaling do not).
    Unknown schemes count as using them, so a difference is refused rather than missed."""
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    cls = getattr(schemes, str(scheme), None)
    if not isinstance(cls, type) or not issubclass(cls, schemes.ImageNormalization):
        return True
    return issubclass(cls, schemes.CTNormalization)


# The statistics CTNormalization reads (nnU-Net's default_normalization_schemes).
CT_STATISTICS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def compare_plans(pretrained: dict, fine_tuning: dict) -> PlansComparison:
    """Compare two plans facts dicts (:func:`plans_facts`; a checkpoint has the same keys).

    Refused: spacing, transpose_forward, normalization schemes, use_mask_for_norm, and per channel
    the intensity statistics its scheme uses. Harmless: plans name, configuration, data identifier,
    patch size (the network's kwargs are compared separately, exactly), unused statistics.
    """
    out = PlansComparison()
    a, b = to_plain(pretrained["normalization"]), to_plain(fine_tuning["normalization"])

    def diff(kind: List[str], what: str, x, y) -> None:
        kind.append(f"{what}: checkpoint {x!r}, fine-tuning {y!r}")

    if not _close(a.get("spacing"), b.get("spacing")):
        diff(out.refused, "spacing", a.get("spacing"), b.get("spacing"))
    for key in ("transpose_forward", "normalization_schemes", "use_mask_for_norm"):
        if a.get(key) != b.get(key):
            diff(out.refused, key, a.get(key), b.get(key))
    stats_a = a.get("foreground_intensity_properties_per_channel") or {}
    stats_b = b.get("foreground_intensity_properties_per_channel") or {}
    schemes = b.get("normalization_schemes") or []
    for ch in sorted(set(stats_a) | set(stats_b), key=str):
        sa, sb = stats_a.get(ch, {}), stats_b.get(ch, {})
        used = int(ch) < len(schemes) and scheme_uses_intensity_statistics(schemes[int(ch)])
        for stat in sorted(set(sa) | set(sb)):
            if not _close(sa.get(stat), sb.get(stat)):
                refused = used and stat in CT_STATISTICS
                diff(out.refused if refused else out.harmless,
                     f"channel {ch} intensity {stat}{'' if refused else ' (not used by its normalization)'}",
                     sa.get(stat), sb.get(stat))
    for key in ("plans_name", "configuration", "data_identifier"):
        if pretrained.get(key) != fine_tuning.get(key):
            diff(out.harmless, key, pretrained.get(key), fine_tuning.get(key))
    if a.get("patch_size") != b.get("patch_size"):
        diff(out.harmless, "patch size", a.get("patch_size"), b.get("patch_size"))
    return out
