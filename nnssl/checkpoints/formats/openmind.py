"""OpenMind / MIC-DKFZ nnssl checkpoints (``.pth``): read into the contract, and written from it
(``nnssl_export_pretrained --format nnunet``) for nnU-Net master's ``nnUNetv2_preprocess_like_nnssl``
+ ``nnUNetv2_train_pretrained``.

The layout (MIC-DKFZ/nnssl: ``AbstractBaseTrainer.save_checkpoint``, ``AdaptationPlan.serialize``),
loadable with ``torch.load(weights_only=True)``:

- ``network_weights``: the state dict of the pretraining network (a dynamic_network_architectures
  ``ResidualEncoderUNet`` / ``PlainConvUNet``, or Primus);
- ``nnssl_adaptation_plan``: ``architecture_plans`` {``arch_class_name`` (a short name:
  ``"ResEncL"``, ``"ResidualEncoderUNet"``, ``"PlainConvUNet"``, ``"PrimusM"``, ...),
  ``arch_kwargs`` (None for the named presets), ``arch_kwargs_requiring_import``},
  ``pretrain_plan`` {``dataset_name``, ``plans_name``, ``transpose_forward``, ``configurations``:
  {name: {``spacing``, ``patch_size``, ``normalization_schemes``, ``use_mask_for_norm``, ...}}},
  ``pretrain_num_input_channels``, ``recommended_downstream_patchsize``, ``key_to_encoder``,
  ``key_to_stem``, ``keys_to_in_proj``, ``key_to_lpe``;
- optimizer / logging / trainer state, and optionally ``citations`` (a list of {type, name,
  apa_citations}), which nnU-Net prints when fine-tuning.

Reading builds the network from the plan's own kwargs (any ``ResidualEncoderUNet`` /
``PlainConvUNet`` configuration; ``"ResEncL"`` is MIC-DKFZ nnssl's fixed preset below), moves the
tensors under ``key_to_encoder`` / ``key_to_stem`` to the built network's encoder / stem (as
nnU-Net's ``PretrainedTrainer.load_pretrained_weights`` does) and refuses a file whose encoder
does not fill the network's encoder exactly. Spacing, normalization and the recommended patch
become the contract's plans facts (what ``--like`` plans with); ``transfer`` is "encoder", as in
nnU-Net. The class is mapped directly (resolving a short name by importing every module of
``dynamic_network_architectures.architectures`` pulls in timm and torchvision). Primus is refused:
nnssl has no Primus architecture, and dynamic_network_architectures' primus module needs timm.
"""
import os
import pydoc
from typing import Optional

import torch

from nnssl.checkpoints.contract import CHECKPOINT_VERSION, is_output_head, strip_prefixes, to_plain
from nnssl.checkpoints.foreign import UNKNOWN, ForeignFormat, register_format
from nnssl.checkpoints.plans_check import scheme_uses_intensity_statistics
from nnssl.errors import NnsslError

NAME = "openmind"
PLAN_KEY = "nnssl_adaptation_plan"
_UNET = "dynamic_network_architectures.architectures.unet."
# the plan's short class name -> (nnssl architecture, the class nnU-Net plans name)
CLASSES = {
    "ResEncL": ("resenc_l", _UNET + "ResidualEncoderUNet"),
    "ResidualEncoderUNet": ("resenc_l", _UNET + "ResidualEncoderUNet"),
    "PlainConvUNet": ("plainconvunet", _UNET + "PlainConvUNet"),
}
# nnssl architecture -> the short name the writer puts into the plan
WRITABLE = {"plainconvunet": "PlainConvUNet", "resenc": "ResidualEncoderUNet", "resenc_l": "ResidualEncoderUNet"}
IMPORT_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
# MIC-DKFZ nnssl's "ResEncL" (architecture_registry.get_res_enc_l; its plans carry no kwargs for it),
# spelled as nnU-Net's ResEnc L planner writes the same network at a 160^3 patch, 1 mm.
RESENC_L_KWARGS = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def detect(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get(PLAN_KEY), dict) and isinstance(obj.get("network_weights"), dict)


def build_meta_network(class_path: str, arch_kwargs: dict, requires_import, input_channels: int, where: str):
    """The network on the meta device (shapes and names only, no memory). Only ``torch.nn`` classes
    are imported for the kwargs: the strings come from someone else's file."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    cls = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}[class_path.rsplit(".", 1)[-1]]
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        if kwargs.get(key) is None:
            continue
        if not str(kwargs[key]).startswith("torch.nn.") or pydoc.locate(kwargs[key]) is None:
            raise NnsslError(f"{where}: arch_kwargs['{key}'] = {kwargs[key]!r} is not a torch.nn class; nnssl only "
                             f"builds networks from torch.nn operations.")
        kwargs[key] = pydoc.locate(kwargs[key])
    try:
        with torch.device("meta"):
            return cls(input_channels=input_channels, num_classes=2, deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError) as e:
        raise NnsslError(f"{where}: the plan's arch_kwargs do not build a {cls.__name__} ({type(e).__name__}: {e}); "
                         f"the file is damaged or from an unsupported nnssl version.") from None


def _rename(key: str, moves) -> str:
    """Move ``key`` from the file's encoder/stem prefix to the network's (longest prefix first:
    PlainConvUNet's stem lies inside its encoder)."""
    for src, dst in moves:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return key


def _architecture(arch: dict, where: str):
    """(nnssl architecture name, class path, arch_kwargs, _kw_requires_import) of the plan's block."""
    short = str(arch.get("arch_class_name", "")).rsplit(".", 1)[-1]
    if short not in CLASSES:
        why = ("nnssl has no Primus architecture (and dynamic_network_architectures' primus module imports timm)"
               if short.startswith("Primus") else f"nnssl reads {', '.join(CLASSES)}")
        raise NnsslError(f"{where}: architecture '{arch.get('arch_class_name')}' cannot be built here: {why}.")
    name, class_path = CLASSES[short]
    kwargs = RESENC_L_KWARGS if short == "ResEncL" else arch.get("arch_kwargs")
    if not isinstance(kwargs, dict):
        raise NnsslError(f"{where}: the plan names {short} but gives no arch_kwargs to build it with.")
    kwargs = to_plain(kwargs)
    return name, class_path, kwargs, [k for k in IMPORT_KWARGS if k in kwargs]


def _plans_facts(plan: dict, n_channels: int, where: str) -> dict:
    pretrain = plan.get("pretrain_plan") or {}
    configurations = pretrain.get("configurations") or {}
    if not configurations:
        raise NnsslError(f"{where}: the adaptation plan has no pretraining configuration (spacing, normalization).")
    source_configuration, cfg = next(iter(configurations.items()))  # nnU-Net's like_nnssl takes the first too
    if cfg.get("spacing") is None or None in list(cfg["spacing"]):
        raise NnsslError(f"{where}: the model was pretrained without a target spacing (no resampling); nnssl plans "
                         f"the fine-tuning with the pretraining's spacing, so it cannot use this file.")
    schemes = list(cfg.get("normalization_schemes") or [])
    if len(schemes) != n_channels:
        raise NnsslError(f"{where}: {len(schemes)} normalization schemes for {n_channels} input channels.")
    if any(scheme_uses_intensity_statistics(s) for s in schemes):
        raise NnsslError(f"{where}: normalization {schemes} needs intensity statistics the adaptation plan does not "
                         f"carry; nnssl cannot reproduce the pretraining's intensities.")
    mask = cfg.get("use_mask_for_norm")
    mask = [bool(m) for m in mask] if isinstance(mask, (list, tuple)) else [bool(mask)] * n_channels
    return {"plans_name": pretrain.get("plans_name", "unknown"), "configuration": "3d_fullres",
            "data_identifier": cfg.get("data_identifier", "unknown"),
            "normalization": {"normalization_schemes": schemes, "use_mask_for_norm": mask,
                              "foreground_intensity_properties_per_channel": {},
                              "spacing": [float(s) for s in cfg["spacing"]],
                              "patch_size": [int(p) for p in plan["recommended_downstream_patchsize"]],
                              "transpose_forward": [int(t) for t in pretrain.get("transpose_forward", [0, 1, 2])]},
            "_source_configuration": source_configuration}


def to_native(obj: dict, path: str) -> dict:
    plan = obj[PLAN_KEY]
    where = f"OpenMind/nnssl checkpoint {path}"
    missing = [k for k in ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                           "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem") if k not in plan]
    if missing:
        raise NnsslError(f"{where}: nnssl_adaptation_plan lacks {', '.join(missing)}; the file is damaged.")
    name, class_path, kwargs, requires = _architecture(plan["architecture_plans"], where)
    channels = int(plan["pretrain_num_input_channels"])
    facts = _plans_facts(plan, channels, where)
    net = build_meta_network(class_path, kwargs, requires, channels, where)
    moves = sorted(((plan["key_to_stem"], net.key_to_stem), (plan["key_to_encoder"], net.key_to_encoder)),
                   key=lambda m: -len(m[0]))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items() if not is_output_head(k)}
    weights, dropped = {}, []
    for key, tensor in obj["network_weights"].items():
        new = _rename(strip_prefixes(key), moves)
        if expected.get(new) == tuple(tensor.shape):
            weights[new] = tensor
        else:
            dropped.append(key)
    unfilled = [k for k in expected if k.startswith("encoder.") and k not in weights]
    if unfilled:
        raise NnsslError(f"{where}: its weights do not fill the encoder of the {class_path.rsplit('.', 1)[-1]} its "
                         f"plan describes ({len(unfilled)} tensors missing or of another shape, e.g. "
                         f"{', '.join(unfilled[:3])}); the file is damaged or the plan does not match the weights.")
    divisor = [int(torch.tensor([s[a] for s in kwargs["strides"]]).prod()) for a in range(3)]
    patch = facts["normalization"]["patch_size"]
    if any(p % d for p, d in zip(patch, divisor)):
        raise NnsslError(f"{where}: recommended_downstream_patchsize {patch} is not divisible by the network's "
                         f"downsampling {divisor}.")
    source_configuration = facts.pop("_source_configuration")
    dataset = (plan.get("pretrain_plan") or {}).get("dataset_name", "unknown")
    source = {"format": "MIC-DKFZ nnssl nnssl_adaptation_plan", "file": os.path.basename(path),
              "arch_class_name": plan["architecture_plans"].get("arch_class_name"),
              "trainer_name": obj.get("trainer_name"), "epochs": obj.get("current_epoch"),
              "pretrain_configuration": source_configuration, "key_to_encoder": plan["key_to_encoder"],
              "key_to_stem": plan["key_to_stem"], "citations": obj.get("citations", []), "dropped_keys": dropped}
    return {"nnssl_checkpoint_version": CHECKPOINT_VERSION,
            "architecture": {"name": name, "network_class_name": class_path, "arch_kwargs": kwargs,
                             "_kw_requires_import": requires},
            **facts, "input_channels": channels, "method": {"name": NAME, "config": to_plain({"source": source})},
            "pretraining_data": dataset, "dataset": dataset, "iteration": UNKNOWN, "transfer": "encoder",
            "seed": UNKNOWN, "network_weights": weights}


def from_native(ckpt: dict, plans: Optional[dict] = None) -> dict:
    """The contract dict ``ckpt`` with an ``nnssl_adaptation_plan`` (and ``citations``) added, as
    nnU-Net master's like_nnssl / PretrainedTrainer read it; ``plans``: the pretraining plans file
    (reader/writer, resampling, median spacing; defaults where absent)."""
    from nnssl.citations import method_citation

    arch = ckpt["architecture"]
    if arch["name"] not in WRITABLE:
        raise NnsslError(f"--format nnunet: nnU-Net's PretrainedTrainer builds PlainConvUNet and ResidualEncoderUNet "
                         f"only; this checkpoint's architecture is '{arch['name']}' (export plainconvunet, resenc or "
                         f"resenc_l models for nnU-Net).")
    norm, channels = ckpt["normalization"], int(ckpt["input_channels"])
    net = build_meta_network(arch["network_class_name"], arch["arch_kwargs"], arch.get("_kw_requires_import") or (),
                             channels, "--format nnunet")
    plans = plans or {}
    cfg_plans = (plans.get("configurations") or {}).get(ckpt["configuration"], {})
    kwargs = to_plain(arch["arch_kwargs"])
    configuration = {
        "data_identifier": ckpt["data_identifier"], "preprocessor_name": "DefaultPreprocessor",
        # Assumption: nnssl plans resample to the planned spacing, which the format calls "median".
        "spacing_style": "median",
        "normalization_schemes": list(norm["normalization_schemes"]), "use_mask_for_norm": list(norm["use_mask_for_norm"]),
        "resampling_fn_data": cfg_plans.get("resampling_fn_data", "resample_data_or_seg_to_shape"),
        "resampling_fn_data_kwargs": cfg_plans.get("resampling_fn_data_kwargs", {}),
        "resampling_fn_mask": cfg_plans.get("resampling_fn_seg", "resample_data_or_seg_to_shape"),
        "resampling_fn_mask_kwargs": cfg_plans.get("resampling_fn_seg_kwargs", {}),
        "spacing": [float(s) for s in norm["spacing"]], "patch_size": [int(p) for p in norm["patch_size"]],
    }
    transpose = [int(t) for t in norm["transpose_forward"]]
    plan = {
        "architecture_plans": {"arch_class_name": WRITABLE[arch["name"]], "arch_kwargs": kwargs,
                               "arch_kwargs_requiring_import": [k for k in IMPORT_KWARGS if kwargs.get(k) is not None]},
        "pretrain_plan": {
            "dataset_name": ckpt["dataset"], "plans_name": ckpt["plans_name"],
            "original_median_spacing_after_transp": plans.get("original_median_spacing_after_transp",
                                                              configuration["spacing"]),
            "image_reader_writer": plans.get("image_reader_writer", "SimpleITKIO"),
            "transpose_forward": transpose,
            "transpose_backward": plans.get("transpose_backward", [transpose.index(i) for i in range(3)]),
            "configurations": {ckpt["configuration"]: configuration},
            "experiment_planner_used": plans.get("experiment_planner_used", "nnssl"),
        },
        "pretrain_num_input_channels": channels,
        "recommended_downstream_patchsize": [int(p) for p in norm["patch_size"]],
        "key_to_encoder": net.key_to_encoder, "key_to_stem": net.key_to_stem,
        "keys_to_in_proj": list(net.keys_to_in_proj), "key_to_lpe": None,
    }
    method = ckpt["method"]["name"]
    citations = [{"type": "pretraining method", "name": method, "apa_citations": [method_citation(method)]}]
    return {**ckpt, PLAN_KEY: to_plain(plan), "citations": citations}


register_format(ForeignFormat(
    name=NAME, description="MIC-DKFZ nnssl / OpenMind .pth with network_weights and nnssl_adaptation_plan",
    detect=detect, to_native=to_native, from_native=from_native))
