"""Weight injection: pretrained weights into a freshly initialized fine-tuning network (SPEC §5).

Rules, per tensor of the network (parameters and persistent buffers such as BatchNorm running
statistics):

- output heads (names containing ``.seg_layers.``) always keep their fresh initialization;
- a tensor is *transferable* when it is in the checkpoint's transferable part: names starting
  with ``encoder.`` for ``transfer == "encoder"``, every name for ``"encoder+decoder"``;
- a transferable tensor is loaded when the checkpoint has the same name with the same shape;
  otherwise it is skipped (shape mismatch) or left random (not in the checkpoint).

Tensors are counted once: nnU-Net's networks reach the same module under several names
(``decoder.encoder.*`` is ``encoder.*``; ``convs.0.all_modules.0`` is ``convs.0.conv``), and
``named_parameters()`` lists each tensor under its first name only.

Before anything is copied, :func:`nnssl.checkpoints.load_pretraining_checkpoint` refuses a
checkpoint whose network class or ``arch_kwargs`` differ from the fine-tuning plans (input
channels may grow: the stem weights are adapted by ``nnssl.training.channel_adaptation``). The comparison of ``arch_kwargs`` is exact: nnssl's planner writes the same kwargs for
the same target dataset, architecture and preset, so pretraining and fine-tuning with the same
plans always match; a checkpoint pretrained under other plans (another patch size that changed
the number of stages, another preset) is refused rather than half loaded.

Then :func:`nnssl.checkpoints.compare_plans` compares the plans the checkpoint was pretrained
under with the fine-tuning plans: a difference that changes what the network sees (spacing,
normalization and its intensity statistics, ``transpose_forward``) is refused with the list of
differences, unless ``allow_plans_mismatch`` (``nnssl_train --allow_plans_mismatch``) is set;
harmless differences (plans name, patch size, ...) are reported in the log and in the JSON report.

Last, the checkpoint's pretraining cases are compared with the fold's validation cases
(:mod:`nnssl.training.pretraining_cases`): an overlap is printed as a leakage warning and recorded
as ``pretraining_cases_in_validation``.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from nnssl import paths
from nnssl.checkpoints import (checkpoint_sha256, compare_plans, is_output_head, load_pretraining_checkpoint,
                               plans_facts, unwrap_network)
from nnssl.errors import NnsslError
from nnssl.io import write_json
from nnssl.training.channel_adaptation import adapt_input_channels
from nnssl.training.pretraining_cases import leakage_check, leakage_warning
from nnssl.ssl.base import TRANSFERS
REPORT_FILE = "nnssl_pretrained.json"

LOADED, SKIPPED_SHAPE, SKIPPED_NOT_TRANSFERABLE, NOT_IN_CHECKPOINT, OUTPUT_HEAD = (
    "loaded", "skipped_shape_mismatch", "skipped_not_transferable", "not_in_checkpoint", "output_head")
STATUSES = (LOADED, SKIPPED_SHAPE, SKIPPED_NOT_TRANSFERABLE, NOT_IN_CHECKPOINT, OUTPUT_HEAD)


def module_prefix(key: str) -> str:
    """First two name components: 'encoder.stages.0.0.convs.0.conv.weight' -> 'encoder.stages'."""
    return ".".join(key.split(".")[:2])


@dataclass
class InjectionReport:
    transfer: str
    status: Dict[str, str] = field(default_factory=OrderedDict)  # network tensor name -> one of STATUSES
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)  # (ckpt, net)
    numel: Dict[str, int] = field(default_factory=dict)
    unused_checkpoint_keys: List[str] = field(default_factory=list)  # names this network does not have

    def keys(self, status: str) -> List[str]:
        return [k for k, s in self.status.items() if s == status]

    @property
    def n_loaded(self) -> int:
        return len(self.keys(LOADED))

    @property
    def n_skipped(self) -> int:
        return len(self.keys(SKIPPED_SHAPE)) + len(self.keys(SKIPPED_NOT_TRANSFERABLE))

    @property
    def n_left_random(self) -> int:
        return len(self.status) - self.n_loaded

    def counts(self) -> Dict[str, int]:
        c = {s: len(self.keys(s)) for s in STATUSES}
        c.update(total=len(self.status), left_random=self.n_left_random,
                 loaded_values=sum(self.numel[k] for k in self.keys(LOADED)),
                 unused_checkpoint_keys=len(self.unused_checkpoint_keys))
        return c

    def by_prefix(self) -> Dict[str, Dict[str, int]]:
        """{prefix: {"loaded", "skipped", "left_random"}}; skipped tensors count as left random too."""
        out: Dict[str, Dict[str, int]] = OrderedDict()
        for k, s in self.status.items():
            row = out.setdefault(module_prefix(k), {"loaded": 0, "skipped": 0, "left_random": 0})
            if s == LOADED:
                row["loaded"] += 1
            else:
                row["left_random"] += 1
                row["skipped"] += s in (SKIPPED_SHAPE, SKIPPED_NOT_TRANSFERABLE)
        return out

    def to_dict(self) -> dict:
        return {
            "transfer": self.transfer,
            "counts": self.counts(),
            "by_prefix": self.by_prefix(),
            "keys": {s: self.keys(s) for s in STATUSES},
            "shape_mismatches": {k: {"checkpoint": list(self.shapes[k][0]), "network": list(self.shapes[k][1])}
                                 for k in self.keys(SKIPPED_SHAPE)},
            "unused_checkpoint_keys": self.unused_checkpoint_keys,
        }

    def format(self) -> str:
        c = self.counts()
        lines = [
            f"loaded {c[LOADED]} of {c['total']} tensors ({c['loaded_values']:,} values, transfer '{self.transfer}'); "
            f"skipped {self.n_skipped} (shape mismatch {c[SKIPPED_SHAPE]}, not transferable "
            f"{c[SKIPPED_NOT_TRANSFERABLE]}); left random {c['left_random']} (output heads {c[OUTPUT_HEAD]}, not in "
            f"checkpoint {c[NOT_IN_CHECKPOINT]}); checkpoint tensors this network lacks: {c['unused_checkpoint_keys']}",
            f"  {'module prefix':<32}{'loaded':>8}{'skipped':>9}{'left random':>13}",
        ]
        for prefix, row in self.by_prefix().items():
            lines.append(f"  {prefix:<32}{row['loaded']:>8}{row['skipped']:>9}{row['left_random']:>13}")
        for k in self.keys(SKIPPED_SHAPE)[:10]:
            lines.append(f"  shape mismatch {k}: checkpoint {list(self.shapes[k][0])}, network {list(self.shapes[k][1])}")
        return "\n".join(lines)


def _network_tensors(net: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Each parameter / persistent buffer once, under its first name (see module docstring)."""
    persistent = set(net.state_dict().keys())
    tensors = OrderedDict(net.named_parameters())
    tensors.update((k, b) for k, b in net.named_buffers() if k in persistent)
    return tensors


def transfer_weights(network: nn.Module, weights: Dict[str, torch.Tensor], transfer: str) -> InjectionReport:
    """Copy the transferable, name- and shape-matching tensors of ``weights`` into ``network`` in place."""
    if transfer not in TRANSFERS:
        raise NnsslError(f"The checkpoint's 'transfer' is '{transfer}'; nnssl knows {', '.join(TRANSFERS)}. "
                         f"The checkpoint was not written by nnssl_pretrain, or by a newer nnssl.")
    net = unwrap_network(network)
    report = InjectionReport(transfer=transfer)
    tensors = _network_tensors(net)
    with torch.no_grad():
        for name, tensor in tensors.items():
            report.numel[name] = tensor.numel()
            if is_output_head(name):
                report.status[name] = OUTPUT_HEAD
            elif name not in weights:
                report.status[name] = NOT_IN_CHECKPOINT
            elif transfer == "encoder" and not name.startswith("encoder."):
                report.status[name] = SKIPPED_NOT_TRANSFERABLE
            elif tuple(weights[name].shape) != tuple(tensor.shape):
                report.status[name] = SKIPPED_SHAPE
                report.shapes[name] = (tuple(weights[name].shape), tuple(tensor.shape))
            else:
                tensor.copy_(weights[name])
                report.status[name] = LOADED
    known = set(net.state_dict().keys())
    report.unused_checkpoint_keys = sorted(k for k in weights if k not in known)
    return report


def check_plans(ckpt: dict, checkpoint_path: str, plans_manager, configuration: str,
                allow_plans_mismatch: bool = False):
    """Compare the checkpoint's plans with the fine-tuning plans; NnsslError on a refused difference
    unless ``allow_plans_mismatch``. Returns the :class:`~nnssl.checkpoints.PlansComparison`."""
    comparison = compare_plans(ckpt, plans_facts(plans_manager, configuration))
    if comparison.refused and not allow_plans_mismatch:
        harmless = f" (Harmless, for information: {'; '.join(comparison.harmless)}.)" if comparison.harmless else ""
        raise NnsslError(
            f"Checkpoint {checkpoint_path} was pretrained on images preprocessed differently from the fine-tuning "
            f"plans '{plans_manager.plans_name}' ({configuration}): " + "; ".join(comparison.refused) + ". The "
            f"pretrained weights would see other intensities or voxel sizes than they learned on. "
            f"{_fitting_plans_hint(ckpt, checkpoint_path, plans_manager.dataset_name, configuration)}, or pass "
            f"--allow_plans_mismatch to fine-tune anyway." + harmless)
    return comparison


def check_leakage(trainer, ckpt: dict, checkpoint_path: str) -> dict:
    """:func:`~nnssl.training.pretraining_cases.leakage_check` for the trainer's fold (nnU-Net's split);
    a non-empty overlap is printed and logged as a warning."""
    fold, dataset = trainer.fold, trainer.plans_manager.dataset_name
    validation = [] if str(fold) == "all" else list(trainer.do_split()[1])
    result = leakage_check(ckpt, checkpoint_path, dataset, fold, validation)
    overlap = result["pretraining_cases_in_validation"]
    if overlap:
        warning = leakage_warning(overlap, len(validation), dataset, fold, ckpt["method"].get("name"))
        trainer.print_to_log_file(warning)  # also on the console
    else:
        trainer.print_to_log_file(f"nnssl: pretraining cases in the validation cases: "
                                  f"{'none' if overlap == [] else 'not checked'} ({result['pretraining_cases_check']})")
    return result


def _fitting_plans_hint(ckpt: dict, checkpoint_path: str, dataset: str, configuration: str) -> str:
    """Name plans of ``dataset`` that preprocess like the checkpoint, or the command that writes them."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = os.path.join(paths.preprocessed(), dataset)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        try:
            pm = PlansManager(os.path.join(folder, name))
            fits = configuration in pm.available_configurations and not compare_plans(
                ckpt, plans_facts(pm, configuration)).refused
        except (OSError, KeyError, TypeError, ValueError, AttributeError, AssertionError):
            continue  # dataset.json, the fingerprint, splits and other files that are no plans
        if fits:
            return f"Fine-tune with {dataset}'s plans that match it (-p {pm.plans_name})"
    return (f"No plans of {dataset} match it: write some with `nnssl_plan_and_preprocess -d {dataset} --like "
            f"{checkpoint_path}` and fine-tune with the -p it prints")


def inject_pretrained(trainer, checkpoint_path: str, allow_plans_mismatch: bool = False) -> InjectionReport:
    """Load a pretraining checkpoint into an initialized nnU-Net trainer's network.

    Refuses (NnsslError) a checkpoint that does not fit the trainer's network or plans (see the
    module docstring; ``allow_plans_mismatch`` turns a plans refusal into a logged warning); prints
    the report, writes it to the trainer's log and, with the checkpoint's identity and the plans
    differences, to ``<fold folder>/nnssl_pretrained.json``.
    """
    if not trainer.was_initialized:
        raise RuntimeError("inject_pretrained needs an initialized trainer (call trainer.initialize() first)")
    cm = trainer.configuration_manager
    # Input channels are not compared here: more channels than the pretraining are adapted below.
    ckpt = load_pretraining_checkpoint(checkpoint_path, expected_architecture_class=cm.network_arch_class_name,
                                       expected_arch_kwargs=cm.network_arch_init_kwargs)
    plans = check_plans(ckpt, checkpoint_path, trainer.plans_manager, trainer.configuration_name,
                        allow_plans_mismatch)
    weights, adapted = adapt_input_channels(ckpt["network_weights"], unwrap_network(trainer.network).state_dict(),
                                            int(ckpt["input_channels"]), int(trainer.num_input_channels))
    report = transfer_weights(trainer.network, weights, ckpt["transfer"])
    if report.n_loaded == 0:
        raise NnsslError(f"No tensor of checkpoint {checkpoint_path} matches the fine-tuning network by name and "
                         f"shape, so fine-tuning would start from scratch. Check that it was pretrained with the "
                         f"architecture and plans you fine-tune with.")
    method = ckpt["method"].get("name")
    trainer.print_to_log_file(f"nnssl: pretrained weights from {checkpoint_path} (method {method}, iteration "
                              f"{ckpt['iteration']})\n" + report.format())
    if adapted:
        trainer.print_to_log_file(
            f"nnssl: input channels adapted from {ckpt['input_channels']} (pretraining) to {trainer.num_input_channels}: "
            f"{len(adapted)} stem tensor(s) repeated over the channels and divided by "
            f"{trainer.num_input_channels // int(ckpt['input_channels'])} ({', '.join(adapted)})")
    for line in plans.refused:
        trainer.print_to_log_file(f"nnssl: WARNING plans differ (allowed by --allow_plans_mismatch): {line}")
    for line in plans.harmless:
        trainer.print_to_log_file(f"nnssl: plans differ (harmless): {line}")
    leakage = check_leakage(trainer, ckpt, checkpoint_path)
    write_json({
        "checkpoint": os.path.abspath(checkpoint_path),
        "sha256": checkpoint_sha256(checkpoint_path),
        "method": method,
        "method_config": ckpt["method"].get("config"),
        "iteration": ckpt["iteration"],
        "pretraining_data": ckpt["pretraining_data"],
        "architecture": ckpt["architecture"].get("name"),
        "plans_name": ckpt["plans_name"],
        "plans_differences": {**plans.to_dict(), "allowed": bool(plans.refused)},
        "report": report.to_dict(),
        "input_channels_adapted": {"from": int(ckpt["input_channels"]), "to": int(trainer.num_input_channels),
                                   "tensors": adapted},
        **leakage,
    }, os.path.join(trainer.output_folder, REPORT_FILE))
    return report
