"""Experiment planners: nnU-Net's for its own U-Nets, and a generic base for nnssl's architectures.

Every planner here is an nnU-Net ``ExperimentPlanner`` subclass, so target spacing,
transpose, normalization schemes and resampling are nnU-Net's own. On top of that, every
planner (through :class:`_NnsslPlannerMixin`):

- applies an optional size preset (``--preset tiny``): a dict of planner attribute overrides
  set after nnU-Net's ``__init__``, looked up in the planner's ``presets`` class attribute or
  in the registered :class:`~nnssl.architectures.spec.ArchitectureSpec` whose ``planner`` is
  this class; the preset name is recorded as the top-level ``"nnssl_preset"`` key;
- writes its plans file atomically (nnU-Net's own ``save_plans`` does the writing, into a
  temporary name that is then renamed);
- answers :meth:`~_NnsslPlannerMixin.network_for_patch`, the hook behind
  :func:`nnssl.architectures.build_network`: the plans' ``architecture`` block the planner
  would write for a given patch and spacing. It runs the planner's own
  ``get_plans_for_configuration`` (the very code that plans a dataset) with the patch as the
  median image shape and the memory budget lifted, on a planner made by
  :meth:`~_NnsslPlannerMixin.without_dataset`, so planning and ``build_network`` cannot drift.

:class:`nnsslArchitecturePlanner` plans a network that is not one of nnU-Net's U-Nets: a
subclass only names the network class and says how its kwargs and its patch divisibility
follow from the patch size and spacing.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import ClassVar, Dict, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL,
    nnUNetPlannerResEncM,
)

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import atomic_path

# nnU-Net's own data identifier prefix: configurations that share it share preprocessed data.
SHARED_DATA_PREFIX = "nnUNetPlans"
_UNBOUNDED_GB = 1e12  # finite: nnU-Net computes a batch size from it (then capped by the dataset size)
# The stand-in dataset of a planner made without a dataset (build_network); never written to nnUNet_raw.
_STANDIN_DATASET = "Dataset999_nnsslBuildNetwork"
# The spacing build_network plans for when none is given (isotropic: no axis is treated as thick).
ISOTROPIC_SPACING = (1.0, 1.0, 1.0)


def registered_presets(planner_cls: type) -> Dict[str, Dict[str, object]]:
    """Presets of the registered architecture whose planner is ``planner_cls`` (empty if none)."""
    from nnssl.architectures import ARCHITECTURES

    dotted = f"{planner_cls.__module__}.{planner_cls.__qualname__}"
    for _, spec in ARCHITECTURES.items():
        if spec.planner == dotted:
            return dict(spec.presets)
    return {}


@contextlib.contextmanager
def _at_least_one(env_var: str):
    old = os.environ.get(env_var)
    if old is not None and old.strip() == "0":
        os.environ[env_var] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ[env_var] = old


class _NnsslPlannerMixin:
    """Preset handling and atomic plans writing; put it before the nnU-Net planner in the bases."""

    presets: ClassVar[Dict[str, Dict[str, object]]] = {}

    def __init__(self, *args, preset: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preset = preset
        if preset is not None:
            for attr, value in self.preset_overrides(preset).items():
                if not hasattr(self, attr):  # a typo in a preset must not pass silently
                    raise ValueError(f"Preset '{preset}' of {type(self).__name__} sets unknown planner "
                                     f"attribute '{attr}'.")
                setattr(self, attr, value)

    @classmethod
    def preset_overrides(cls, preset: str) -> Dict[str, object]:
        available = {**registered_presets(cls), **cls.presets}
        if preset not in available:
            raise NnsslError(
                f"Planner {cls.__name__} has no preset '{preset}' (--preset). Available: "
                f"{', '.join(sorted(available)) or 'none'}; leave --preset out to plan the full-size network.")
        return dict(available[preset])

    @staticmethod
    def static_estimate_VRAM_usage(*args, **kwargs):
        # nnU-Net's estimate sets torch's thread count to nnUNet_n_proc_DA, which fails for 0 (the
        # documented "augment in the main process" setting), so it sees at least 1 while planning.
        with _at_least_one("nnUNet_n_proc_DA"):
            return ExperimentPlanner.static_estimate_VRAM_usage(*args, **kwargs)

    def plans_file(self) -> str:
        return os.path.join(paths.preprocessed(), self.dataset_name, self.plans_identifier + ".json")

    # --- build_network's hook -----------------------------------------------------------
    @classmethod
    def without_dataset(cls, input_channels: int = 1, num_classes: int = 2, preset: Optional[str] = None):
        """This planner for building networks only (no dataset): nnU-Net's own ``__init__`` runs on a
        stand-in dataset (``input_channels`` CT channels, ``num_classes`` labels, no images) held in
        a temporary folder, so every attribute a planner sets (widths, blocks, presets) is its own."""
        with tempfile.TemporaryDirectory(prefix="nnssl_build_network_") as tmp:
            raw, pre = os.path.join(tmp, "raw"), os.path.join(tmp, "preprocessed")
            for folder, name, content in (
                    (raw, "dataset.json", {"channel_names": {str(c): "CT" for c in range(input_channels)},
                                           "labels": {"background": 0, **{f"class{k}": k for k in range(1, num_classes)}},
                                           "numTraining": 0, "file_ending": ".nii.gz", "dataset": {}}),
                    (pre, "dataset_fingerprint.json", {"median_relative_size_after_cropping": 1.0})):
                os.makedirs(os.path.join(folder, _STANDIN_DATASET))
                with open(os.path.join(folder, _STANDIN_DATASET, name), "w", encoding="utf-8") as f:
                    json.dump(content, f)
            # nnU-Net's planner reads its folders from module globals bound at import time.
            with mock.patch.object(default_experiment_planner, "nnUNet_raw", raw), \
                    mock.patch.object(default_experiment_planner, "nnUNet_preprocessed", pre):
                return cls(_STANDIN_DATASET, preset=preset)

    def network_for_patch(self, patch_size: Sequence[int],
                          spacing: Sequence[float] = ISOTROPIC_SPACING) -> dict:
        """The plans' ``architecture`` block (``network_class_name``, ``arch_kwargs``,
        ``_kw_requires_import``) this planner writes for a 3D ``patch_size`` at ``spacing``;
        NnsslError when the architecture cannot take that patch (saying what it must be)."""
        patch = tuple(int(p) for p in patch_size)
        spacing = tuple(float(s) for s in spacing)
        if len(patch) != 3 or len(spacing) != 3 or min(patch) < 1 or min(spacing) <= 0:
            raise NnsslError(f"patch_size {list(patch_size)} / spacing {list(spacing)}: give three positive values "
                             f"each (a 3D patch [D, H, W] in voxels and its voxel spacing).")
        budget = self.UNet_vram_target_GB
        self.UNet_vram_target_GB = _UNBOUNDED_GB  # the patch is given: nothing may shrink it
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                plan = self.get_plans_for_configuration(spacing, patch, "nnssl_build_network",
                                                        float(np.prod(patch, dtype=np.float64)) * 1e3, {})
        except NnsslError:
            plan = None
        finally:
            self.UNet_vram_target_GB = budget
        if plan is None or tuple(int(p) for p in plan["patch_size"]) != patch:
            raise NnsslError(f"Patch {list(patch)} does not fit {type(self).__name__}: {self.patch_rule(patch, spacing)}.")
        return plan["architecture"]

    def patch_rule(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> str:
        """The patch constraint in words, for error messages. nnU-Net's U-Nets: every axis divisible
        by 2 ** (number of poolings nnU-Net's topology gives that axis), at most its initial patch
        (256 voxels per axis at isotropic spacing)."""
        divisor = get_pool_and_conv_props(spacing, patch_size, self.UNet_featuremap_min_edge_length, 999999)[-1]
        return (f"nnU-Net's topology for this patch needs every axis divisible by {tuple(int(d) for d in divisor)} "
                f"(and at most 256 voxels per axis at isotropic spacing)")

    def smallest_patch(self, spacing: Sequence[float] = ISOTROPIC_SPACING) -> Tuple[int, int, int]:
        """A small patch this planner's network accepts (tests and examples). nnU-Net's U-Nets:
        16 voxels per axis (two poolings at nnU-Net's minimal feature-map edge of 4)."""
        return (4 * int(self.UNet_featuremap_min_edge_length),) * 3

    def save_plans(self, plans: dict) -> None:
        if self.preset is not None:
            plans["nnssl_preset"] = self.preset
        final = self.plans_file()
        with atomic_path(final) as tmp:
            # nnU-Net's save_plans keeps custom configurations of an existing plans file, so it
            # must see the current file under the temporary name it writes to.
            if os.path.isfile(final):
                shutil.copyfile(final, tmp)
            identifier = self.plans_identifier
            self.plans_identifier = os.path.basename(tmp)[: -len(".json")]
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it would print the temporary name
                    super().save_plans(plans)
            finally:
                self.plans_identifier = identifier
        print(f"Plans were saved to {final}")


class nnsslPlainConvUNetPlanner(_NnsslPlannerMixin, ExperimentPlanner):
    """nnU-Net's default planner (``nnUNetPlans``, PlainConvUNet) plus presets."""


class nnsslResEncUNetMPlanner(_NnsslPlannerMixin, nnUNetPlannerResEncM):
    """nnU-Net's residual-encoder M planner (``nnUNetResEncUNetMPlans``) plus presets.

    nnU-Net's ResEnc planners already share the 2d/3d_fullres data of ``nnUNetPlans``.
    """


class nnsslResEncUNetLPlanner(_NnsslPlannerMixin, nnUNetPlannerResEncL):
    """nnU-Net's residual-encoder L planner (``nnUNetResEncUNetLPlans``, the OpenMind models'
    network family) plus presets."""


class nnsslArchitecturePlanner(_NnsslPlannerMixin, ExperimentPlanner):
    """Base planner for nnssl's own 3D architectures.

    Subclasses define ``network_class_name`` (dotted path), ``arch_kwargs(patch_size,
    spacing)``, ``patch_divisor(spacing)`` and optionally ``min_patch_size``,
    ``kw_requires_import`` and ``presets``.

    Contract of these hooks (planning a dataset and :func:`nnssl.architectures.build_network`
    both go through them, via :meth:`network_for_patch`):

    - ``arch_kwargs`` and ``patch_divisor`` depend only on their arguments and on planner
      attributes (class attributes, and what a preset overrides); never on the dataset
      (``self.dataset_json``, the fingerprint): ``build_network`` calls them on a planner made by
      :meth:`without_dataset`;
    - ``arch_kwargs(patch, spacing)`` returns JSON-friendly kwargs (lists, not tuples) that build
      the network with ``cls(input_channels, num_classes, deep_supervision=..., **kwargs)``;
    - every patch that is a multiple of ``patch_divisor(spacing)`` and at least
      ``min_patch_size`` must be valid for the network built from those kwargs (the
      registry-driven test builds every architecture at :meth:`smallest_patch` and runs it). The 3D plan starts from nnU-Net's initial patch size
    for the spacing and median shape (before nnU-Net shrinks it for its own U-Net's memory),
    rounds it to the divisor, shrinks it along the axis that is largest relative to the median
    shape until the network's feature-map estimate fits nnU-Net's reference budget (scaled with
    ``gpu_memory_target_in_gb``), and picks the batch size like nnU-Net. The 2d configuration is
    not written (the networks are 3D).
    """

    network_class_name: ClassVar[str] = ""
    min_patch_size: ClassVar[Optional[Tuple[int, int, int]]] = None
    kw_requires_import: ClassVar[Tuple[str, ...]] = ()
    # Assumption: a patch more than twice the median image extent along an axis would be
    # mostly padding, so planning refuses it (raise the factor in a subclass to allow it).
    max_padding_factor: ClassVar[float] = 2.0

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: Optional[str] = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False, preset: Optional[str] = None):
        if plans_name is None:  # nnsslPCTNetPlanner -> nnsslPCTNetPlans
            plans_name = type(self).__name__.removesuffix("Planner") + "Plans"
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, preset=preset)

    # --- what a subclass defines -------------------------------------------------------
    def arch_kwargs(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> dict:
        raise NotImplementedError

    def patch_divisor(self, spacing: Tuple[float, float, float]) -> Tuple[int, int, int]:
        raise NotImplementedError

    # --- nnU-Net hooks ------------------------------------------------------------------
    def generate_data_identifier(self, configuration_name: str) -> str:
        # 2d and 3d_fullres are preprocessed exactly like nnUNetPlans (inherited spacing,
        # normalization, transpose), so share that data. 3d_lowres is not shared: its spacing
        # follows from this planner's patch size (nnU-Net's ResEnc planners do the same).
        if configuration_name in ("2d", "3d_fullres"):
            return f"{SHARED_DATA_PREFIX}_{configuration_name}"
        return f"{self.plans_identifier}_{configuration_name}"

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        # nnU-Net's plan for this spacing: normalization, resampling and its initial patch size. Its
        # memory loop is switched off (budget lifted): it would shrink the patch for PlainConvUNet's
        # memory, while this planner shrinks it for its own network below.
        budget_gb = self.UNet_vram_target_GB
        self.UNet_vram_target_GB = _UNBOUNDED_GB
        try:
            plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
        finally:
            self.UNet_vram_target_GB = budget_gb
        if len(spacing) != 3:
            return plan  # 2d: dropped in save_plans
        spacing = tuple(float(s) for s in spacing)
        median = np.asarray(median_shape, dtype=np.float64)[:3]
        divisor = np.asarray(self.patch_divisor(spacing), dtype=np.int64)
        smallest = self._smallest_patch(divisor)
        self._check_fits_image(smallest, divisor, median)

        patch = np.maximum(np.round(np.asarray(plan["patch_size"]) / divisor) * divisor, smallest).astype(np.int64)
        reference = self.UNet_reference_val_3d * self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB
        estimate = self._estimate(patch, spacing, _cache)
        while estimate > reference:
            can_shrink = patch - divisor >= smallest
            if not can_shrink.any():
                raise NnsslError(
                    f"{type(self).__name__}: the smallest allowed patch {tuple(int(p) for p in patch)} (divisible by "
                    f"{tuple(int(d) for d in divisor)}, at least {tuple(int(s) for s in smallest)}) still needs a "
                    f"feature-map estimate of {estimate:.3g} > the budget {reference:.3g} for "
                    f"{self.UNet_vram_target_GB} GB. Raise -gpu_memory_target or use a smaller preset (--preset).")
            relative = np.where(can_shrink, patch / median, -np.inf)
            axis = int(np.argmax(relative))
            patch[axis] -= divisor[axis]
            estimate = self._estimate(patch, spacing, _cache)

        batch_size = round(reference / estimate * self.UNet_reference_val_corresp_bs_3d)
        bs_5_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        batch_size = max(min(batch_size, bs_5_percent), self.UNet_min_batch_size)

        patch_size = tuple(int(p) for p in patch)
        plan["patch_size"] = patch_size
        plan["batch_size"] = int(batch_size)
        plan["architecture"] = {
            "network_class_name": self.network_class_name,
            "arch_kwargs": self.arch_kwargs(patch_size, spacing),
            "_kw_requires_import": tuple(self.kw_requires_import),
        }
        return plan

    def save_plans(self, plans: dict) -> None:
        plans["configurations"].pop("2d", None)
        super().save_plans(plans)

    def patch_rule(self, patch_size: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> str:
        divisor = np.asarray(self.patch_divisor(spacing), dtype=np.int64)
        smallest = self._smallest_patch(divisor)
        return (f"every axis must be divisible by {tuple(int(d) for d in divisor)} and at least "
                f"{tuple(int(s) for s in smallest)} (at spacing {list(spacing)})")

    def smallest_patch(self, spacing: Sequence[float] = ISOTROPIC_SPACING) -> Tuple[int, int, int]:
        spacing = tuple(float(s) for s in spacing)
        return tuple(int(s) for s in self._smallest_patch(np.asarray(self.patch_divisor(spacing), dtype=np.int64)))

    # --- helpers ------------------------------------------------------------------------
    def _smallest_patch(self, divisor: np.ndarray) -> np.ndarray:
        """Smallest patch allowed per axis: the divisor, or min_patch_size rounded up to it."""
        smallest = divisor.copy()
        if self.min_patch_size is not None:
            smallest = np.maximum(smallest, np.ceil(np.asarray(self.min_patch_size) / divisor) * divisor)
        return smallest.astype(np.int64)

    def _check_fits_image(self, smallest: np.ndarray, divisor: np.ndarray, median: np.ndarray) -> None:
        too_big = smallest > self.max_padding_factor * median
        if too_big.any():
            a = int(np.argmax(too_big))
            raise NnsslError(
                f"{type(self).__name__} ({self.network_class_name}) needs patches divisible by "
                f"{tuple(int(d) for d in divisor)} (and at least {tuple(int(s) for s in smallest)}), but the images "
                f"of {self.dataset_name} are only {median[a]:.0f} voxels along axis {a} after resampling "
                f"(median shape {tuple(int(m) for m in median)}): a patch of {int(smallest[a])} would be mostly "
                f"padding. Use an architecture (-a) or preset (--preset) with fewer downsamplings/smaller windows, "
                f"or larger images.")

    def _estimate(self, patch: np.ndarray, spacing: Tuple[float, ...], cache: dict) -> float:
        """nnU-Net's VRAM proxy: the network's conv feature-map size at this patch (network built without init)."""
        patch_size = tuple(int(p) for p in patch)
        kwargs = self.arch_kwargs(patch_size, spacing)
        # nnU-Net's planner shares this cache with str keys; a tuple key never clashes with them
        key = ("nnssl", self.network_class_name, repr(kwargs), patch_size)
        if key not in cache:
            cache[key] = self.static_estimate_VRAM_usage(
                patch_size, len(self.dataset_json["channel_names"]), len(self.dataset_json["labels"]),
                self.network_class_name, kwargs, tuple(self.kw_requires_import))
        return cache[key]


def planner_for(spec, dataset_full_name: str, gpu_memory_target_in_gb: Optional[float] = None,
                preset: Optional[str] = None) -> ExperimentPlanner:
    """Instantiate the planner of an :class:`ArchitectureSpec` for a dataset (writes ``spec.plans_name``)."""
    kwargs = {"plans_name": spec.plans_name, "preset": preset}
    if gpu_memory_target_in_gb is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target_in_gb)
    return spec.planner_class()(dataset_full_name, **kwargs)

