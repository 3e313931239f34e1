"""Plans check (:func:`compare_plans`): fine-tuning compares the plans facts the checkpoint was
pretrained under with those of the fine-tuning plans.

Differences that change what the network sees (target spacing, ``transpose_forward``,
normalization schemes, ``use_mask_for_norm``, the intensity statistics a scheme normalizes with,
e.g. CTNormalization's clipping percentiles, mean and std) are *refused*; the others (plans name,
configuration name, data identifier, patch size, statistics no scheme uses) are *harmless* and
only reported.
"""
from dataclasses import dataclass, field
from typing import List

import numpy as np

from nnssl.checkpoints.contract import to_plain


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

    if a.get("spacing") is None:  # a foreign checkpoint that does not record its pretraining spacing
        diff(out.harmless, "spacing (not recorded by the checkpoint)", None, b.get("spacing"))
    elif not _close(a.get("spacing"), b.get("spacing")):
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
