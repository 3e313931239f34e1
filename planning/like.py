"""Plans "like the pretraining": fine-tune a (generic) pretrained model on a new labeled task.

``nnssl_plan_and_preprocess -d BTCV --like CHECKPOINT`` fingerprints BTCV with nnU-Net as usual
but writes plans whose spacing, normalization (schemes and intensity statistics),
``transpose_forward``, architecture (class + kwargs) and patch are the checkpoint's, so weight
injection finds exactly the network and the intensities it was pretrained on. Everything the
checkpoint does not fix (resampling functions, the median shape) is what the architecture's own
planner writes for BTCV, and the batch size is re-planned for the target with nnU-Net's rule
(memory estimate of the network at that patch, capped so that one batch covers at most 5 % of
the dataset). The plans are named ``nnsslLike_<architecture>_<first 8 hex digits of the
checkpoint's sha256>`` and have their own ``data_identifier``, so they never mix with the
target's other preprocessed data. They carry ``"nnssl_like"`` (checkpoint path, sha256, the
pretraining plans name) and ``"nnssl_architecture"`` (so ``nnssl_train -p`` finds the trainer).

Channels: a target with C channels and a checkpoint with C_p channels works when C is a multiple
of C_p (channel c is normalized like the checkpoint's channel c mod C_p; the stem weights are
adapted at injection, see ``nnssl.training.channel_adaptation``); fewer channels are refused.
"""
import os
from typing import Optional

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import write_json
from nnssl.training.channel_adaptation import check_channels_adaptable

LIKE_PREFIX = "nnsslLike"


def like_plans_name(architecture: str, sha256: str) -> str:
    return f"{LIKE_PREFIX}_{architecture}_{sha256[:8]}"


def like_plans_file(target: str, checkpoint: str) -> str:
    """Where ``--like checkpoint`` writes the plans of ``target``."""
    from nnssl.checkpoints import checkpoint_sha256, load_pretraining_checkpoint

    arch = load_pretraining_checkpoint(checkpoint)["architecture"]["name"]
    return os.path.join(paths.preprocessed(), target, like_plans_name(arch, checkpoint_sha256(checkpoint)) + ".json")


def replan_batch_size(planner, patch, arch: dict, num_classes: int, approx_voxels: float) -> int:
    """nnU-Net's batch-size rule for a fixed patch: memory estimate, then the 5 % dataset cap."""
    n_in = len(planner.dataset_json["channel_names"])
    estimate = planner.static_estimate_VRAM_usage(tuple(patch), n_in, num_classes, arch["network_class_name"],
                                                  arch["arch_kwargs"], tuple(arch.get("_kw_requires_import", ())))
    reference = planner.UNet_reference_val_3d * planner.UNet_vram_target_GB / planner.UNet_reference_val_corresp_GB
    batch = round(reference / estimate * planner.UNet_reference_val_corresp_bs_3d)
    cap = round(approx_voxels * planner.max_dataset_covered / np.prod(patch, dtype=np.float64))
    return int(max(min(batch, cap), planner.UNet_min_batch_size))


def write_like_plans(target: str, checkpoint: str, gpu_memory_target: Optional[float] = None) -> str:
    """Plan ``target`` (fingerprint already extracted) like ``checkpoint``; returns the plans file."""
    from nnssl.architectures import ARCHITECTURES
    from nnssl.checkpoints import checkpoint_sha256, load_pretraining_checkpoint
    from nnssl.planning.planners import planner_for

    ckpt = load_pretraining_checkpoint(checkpoint)
    spec = ARCHITECTURES.get(ckpt["architecture"]["name"])
    norm, configuration = ckpt["normalization"], ckpt["configuration"]
    target_json = load_json(os.path.join(paths.raw(), target, "dataset.json"))
    n_target, n_ckpt = len(target_json["channel_names"]), int(ckpt["input_channels"])
    check_channels_adaptable(n_ckpt, n_target, f"Dataset {target}")
    sha = checkpoint_sha256(checkpoint)
    name = like_plans_name(spec.name, sha)

    transpose = [int(t) for t in norm["transpose_forward"]]
    planner = planner_for(spec, target, gpu_memory_target, None)
    planner.plans_identifier = name
    if norm["spacing"] is not None:  # None: a foreign checkpoint without one; the target's own spacing
        spacing = [float(s) for s in norm["spacing"]]
        # nnU-Net's overwrite_target_spacing is in the images' own axis order, the plans' in transposed order.
        planner.overwrite_target_spacing = [spacing[i] for i in np.argsort(transpose)]
    planner.plan_experiment()
    plans = load_json(planner.plans_file())  # as nnU-Net saved it (plain JSON types)
    if configuration not in plans["configurations"]:
        raise NnsslError(f"The {spec.name} planner wrote no '{configuration}' configuration for {target}, which the "
                         f"checkpoint {checkpoint} was pretrained with; --like needs that configuration.")
    cfg = dict(plans["configurations"][configuration])
    patch = [int(p) for p in norm["patch_size"]]
    cfg.update({
        "data_identifier": f"{name}_{configuration}",
        "spacing": cfg["spacing"] if norm["spacing"] is None else spacing,
        "patch_size": patch,
        "normalization_schemes": [norm["normalization_schemes"][c % n_ckpt] for c in range(n_target)],
        "use_mask_for_norm": [norm["use_mask_for_norm"][c % n_ckpt] for c in range(n_target)],
        "architecture": {"network_class_name": ckpt["architecture"]["network_class_name"],
                         "arch_kwargs": ckpt["architecture"]["arch_kwargs"],
                         "_kw_requires_import": ckpt["architecture"]["_kw_requires_import"]},
    })
    approx_voxels = float(np.prod(cfg["median_image_size_in_voxels"], dtype=np.float64)) * len(planner.dataset)
    cfg["batch_size"] = replan_batch_size(planner, patch, cfg["architecture"], len(target_json["labels"]), approx_voxels)
    props = norm["foreground_intensity_properties_per_channel"] or {}
    plans.update({
        "plans_name": name,
        "configurations": {configuration: cfg},
        "transpose_forward": transpose,
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "foreground_intensity_properties_per_channel": {str(c): props.get(str(c % n_ckpt), {})
                                                        for c in range(n_target)},
        "nnssl_architecture": spec.name,
        "nnssl_like": {"checkpoint": os.path.abspath(checkpoint), "sha256": sha,
                       "pretraining_plans_name": ckpt["plans_name"], "pretraining_dataset": ckpt["dataset"]},
    })
    plans_file = os.path.join(paths.preprocessed(), target, name + ".json")
    write_json(plans, plans_file)
    print(f"Plans like {checkpoint} were saved to {plans_file}")
    return plans_file
