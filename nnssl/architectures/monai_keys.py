"""State-dict key mapping between nnssl networks and their MONAI counterparts.

nnssl networks keep MONAI's module names below two nnssl prefixes that the network contract needs
(``nnssl/architectures/spec.py``): ``encoder.`` (what "encoder" transfer moves) and ``decoder.``,
and the output conv lives in ``decoder.seg_layers.0`` (never transferred) where MONAI has
``out.conv.conv``. A mapping is an ordered list of ``(nnssl prefix, MONAI prefix)`` pairs; a key
is renamed by its first matching prefix, and keys that match none are refused (a silent
pass-through would hide a naming mismatch).
"""
from collections import OrderedDict
from typing import Dict, Iterable, Sequence, Tuple

import torch

Mapping = Sequence[Tuple[str, str]]


def _rename(key: str, pairs: Iterable[Tuple[str, str]]) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"state-dict key '{key}' matches none of the mapped prefixes {[s for s, _ in pairs]}")


def from_monai(state_dict: Dict[str, torch.Tensor], mapping: Mapping,
               drop: Sequence[str] = ()) -> "OrderedDict[str, torch.Tensor]":
    """A MONAI state dict with nnssl key names. Keys containing any string of ``drop`` are left out
    (MONAI modules that the nnssl network does not have because they never take part in its forward)."""
    pairs = [(m, n) for n, m in mapping]
    return OrderedDict((_rename(k, pairs), v) for k, v in state_dict.items() if not any(d in k for d in drop))


def to_monai(state_dict: Dict[str, torch.Tensor], mapping: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """An nnssl state dict with MONAI key names (modules listed in ``drop`` of :func:`from_monai` are
    absent; load with ``strict=False`` into MONAI, or add them)."""
    return OrderedDict((_rename(k, mapping), v) for k, v in state_dict.items())
