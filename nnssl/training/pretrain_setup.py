"""Everything a pretraining run (or a pretext preview) resolves before it starts.

Command-line names -> the target dataset, the method and its config (``--set`` overrides
parsed against the config dataclass's field types), the architecture's plans and
configuration, the preprocessed pretraining data, crop and batch sizes, and the network built
from the plans' ``architecture`` block (exactly as fine-tuning will build it).

The crop is the method's choice inside the planned patch (:mod:`nnssl.ssl.crops`), given what
the plans' network accepts (:func:`network_input_rule`).
"""
import collections.abc
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch.distributed as dist
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

import nnssl.architectures  # noqa: F401  (fills the architecture registry)
import nnssl.ssl  # noqa: F401  (fills the method registry)
from nnssl import datasets, paths
from nnssl.architectures.spec import ARCHITECTURES, ArchitectureSpec
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, check_compatible
from nnssl.ssl.crops import CropChoice, InputRule
from nnssl.planning.pretraining_data import (INTASK, TEST_CASE_PREFIX, find_pretraining_data, is_own_images,
                                             pretraining_cases)
from nnssl.training.pretraining_cases import fold_training_cases

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _convert(key: str, raw: str, tp) -> Any:
    """Parse ``raw`` as type ``tp`` (int, float, bool, str, Optional[...], Tuple[...], List[...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(key, raw, inner[0])
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        parts = [p for p in raw.split(",") if p.strip() != ""]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise NnsslError(f"--set {key}={raw}: expected {len(args)} comma-separated values.")
            return tuple(_convert(key, p, a) for p, a in zip(parts, args))
        elem = args[0] if args else str
        values = [_convert(key, p, elem) for p in parts]
        return tuple(values) if (origin is tuple or tp is tuple) else values
    raw = raw.strip()
    try:
        if tp is bool:
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError
            return raw.lower() in _TRUE
        if tp in (int, float, str):
            return tp(raw)
    except ValueError:
        raise NnsslError(f"--set {key}={raw}: '{raw}' is not a valid {tp.__name__} (the type of config field "
                         f"'{key}').") from None
    raise NnsslError(f"--set {key}: field type {tp} cannot be set from the command line.")


def apply_overrides(cfg, overrides: Sequence[str]):
    """``cfg`` with ``key=value`` overrides applied (types from the dataclass annotations)."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    values = {}
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NnsslError(f"--set '{item}': expected key=value, e.g. --set lr=1e-4.")
        if key not in names:
            raise NnsslError(f"--set {key}: unknown config key for {type(cfg).__name__}. "
                             f"Valid keys: {', '.join(names)}.")
        values[key] = _convert(key, raw, hints.get(key, type(getattr(cfg, key))))
    return dataclasses.replace(cfg, **values)


@dataclass
class PretrainSetup:
    target: str  # DatasetXXX_NAME
    method_name: str
    method_cls: type
    cfg: Any  # method config dataclass (overrides and batch size applied)
    arch: ArchitectureSpec
    plans_manager: PlansManager
    configuration: str
    cm: ConfigurationManager
    input_channels: int
    source: str  # "intask" or the pretraining dataset's full name
    data_folder: str
    crop_size: Tuple[int, ...]
    batch_size: int  # per process
    crop_choice: CropChoice  # the crop, the planned patch and why they differ
    cases: Tuple[str, ...]  # sorted identifiers pretrained on (all of the data, or fold K's training cases)
    fold: Optional[int]  # -pd intask --fold K
    includes_test_images: bool  # the cases include the target's imagesTs (--intask_include_test)

    def build_network(self):
        """The segmentation network from the plans (no deep supervision), outputs as the method asks."""
        cm = self.cm
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, self.input_channels,
                                      self.method_cls.network_output_channels(self.cfg), allow_init=True,
                                      deep_supervision=False)


def network_input_rule(arch: ArchitectureSpec, pm: PlansManager, cm: ConfigurationManager,
                       input_channels: int) -> InputRule:
    """The input sizes the plans' network accepts. Networks sized for the planned patch (``img_size`` in
    the arch_kwargs: UNETR, UNETR++): that patch only. nnU-Net's U-Nets: multiples of the product of their
    pooling strides. nnssl's architectures: their planner's ``patch_divisor`` and smallest patch at the
    plans' spacing (with the plans' size preset)."""
    kwargs = cm.network_arch_init_kwargs
    planned = tuple(int(p) for p in cm.patch_size)
    if "img_size" in kwargs:
        return InputRule(planned, planned, fixed=True)
    if "strides" in kwargs:
        per_stage = np.array([np.broadcast_to(np.asarray(s, dtype=np.int64), (len(planned),))
                              for s in kwargs["strides"]])
        divisor = tuple(int(d) for d in per_stage.prod(axis=0))
        return InputRule(divisor, divisor)
    planner = arch.planner_class().without_dataset(input_channels, preset=pm.plans.get("nnssl_preset"))
    spacing = tuple(float(s) for s in cm.spacing)
    return InputRule(tuple(int(d) for d in planner.patch_divisor(spacing)), planner.smallest_patch(spacing))


def prepare(dataset, method: str, architecture: str = "plainconvunet", pretraining_data: str = "intask",
            configuration: str = "3d_fullres", overrides: Sequence[str] = (), batch_size=None,
            world_size: int = 1, fold: Optional[int] = None) -> PretrainSetup:
    """Resolve names and files; NnsslError (with the fix) for anything missing or inconsistent,
    starting with a method the architecture cannot run (:func:`nnssl.ssl.base.check_compatible`).
    ``fold``: pretrain on fold ``fold``'s training cases of the in-task data only."""
    paths.ensure_paths()
    method_cls = METHODS.get(method)
    arch = ARCHITECTURES.get(architecture)
    # The one capability check of pretraining and nnssl_show_pretext, before any file is read.
    check_compatible(method, architecture)
    target = datasets.resolve(dataset)
    plans_file = os.path.join(paths.preprocessed(), target, arch.plans_name + ".json")
    if not os.path.isfile(plans_file):
        raise NnsslError(f"No plans {plans_file} for architecture '{architecture}'. Run "
                         f"`nnssl_plan_and_preprocess -d {target} -a {architecture}` first.")
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise NnsslError(f"Configuration '{configuration}' is not in {plans_file}; choose one of "
                         f"{', '.join(pm.available_configurations)} (-c).")
    cm = pm.get_configuration(configuration)
    with open(os.path.join(paths.preprocessed(), target, "dataset.json"), encoding="utf-8") as f:
        input_channels = determine_num_input_channels(pm, cm, json.load(f))

    cfg = apply_overrides(method_cls.default_config(architecture), overrides)
    has_bs = "batch_size" in {f.name for f in dataclasses.fields(cfg)}
    global_bs = int(batch_size if batch_size is not None else (cfg.batch_size if has_bs else cm.batch_size))
    if has_bs:
        cfg = dataclasses.replace(cfg, batch_size=global_bs)
    if global_bs % world_size:
        raise NnsslError(f"Batch size {global_bs} is not divisible by the {world_size} processes; the batch size is "
                         f"global and split evenly over the processes. Pass --batch_size as a multiple of "
                         f"{world_size}.")
    per_process = global_bs // world_size
    if per_process < method_cls.min_batch_size:
        raise NnsslError(
            f"Batch size {per_process} per process is too small for '{method}': it needs at least "
            f"{method_cls.min_batch_size} samples per process (e.g. Volume Fusion fuses sample i with sample i+1 "
            f"of the same batch). Pass --batch_size {method_cls.min_batch_size * world_size} or more.")

    source = INTASK if pretraining_data == INTASK else datasets.resolve(pretraining_data)
    if fold is not None and source != INTASK:
        raise NnsslError(f"--fold {fold} selects fold {fold}'s training cases of {target}'s own images: it needs "
                         f"-pd intask (the default), not -pd {pretraining_data}.")
    folder = find_pretraining_data(target, source, cm.data_identifier, architecture)
    cases = pretraining_cases(folder)
    if fold is not None:
        cases = fold_training_cases(target, cm.data_identifier, fold, cases)
    choice = method_cls.choose_crop(cfg, cm.patch_size, network_input_rule(arch, pm, cm, int(input_channels)))
    return PretrainSetup(target, method, method_cls, cfg, arch, pm, configuration, cm, int(input_channels),
                         source, folder, choice.crop, per_process, choice, tuple(cases), fold,
                         any(c.startswith(TEST_CASE_PREFIX) for c in cases) and is_own_images(target, source))


def prepare_method(setup: PretrainSetup, seed: int, distributed: bool = False) -> PretrainSetup:
    """Run the method's one-time ``prepare`` (e.g. masked_kmeans' pseudo-label cache) and ``configure``
    (e.g. order_reconstruction's slab count) and keep the config they return. Under DDP rank 0 goes
    first and tells the others whether it succeeded (so a failure stops every rank instead of leaving
    them waiting); they then find its cached result."""
    identifiers = list(setup.cases)

    def run():
        cfg = setup.method_cls.prepare(setup.cfg, setup.data_folder, identifiers, int(seed))
        # then the config fields that depend on the network (SSLMethod.configure)
        return setup.method_cls.configure(cfg, dataclasses.replace(setup, cfg=cfg).build_network, setup.crop_size,
                                          setup.input_channels)

    if not distributed:
        return dataclasses.replace(setup, cfg=run())
    status = [None]
    if dist.get_rank() == 0:
        try:
            cfg = run()
        except Exception as e:
            dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
            raise
        dist.broadcast_object_list(status, src=0)
    else:
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise NnsslError(f"Rank 0 failed to prepare '{setup.method_name}': {status[0]}")
        cfg = run()
    return dataclasses.replace(setup, cfg=cfg)
