"""A method's crop inside the planned patch: the largest valid one, and why.

The plans' patch always suits the network. Some methods need more of a crop: HybridMIM whole
sub-volumes (32³) per axis and a reconstruction region on the network's stride grid,
swin_pretext a square rotation plane. Instead of refusing plans that nnU-Net made for the data
(e.g. a 40 x 96 x 96 patch), a method takes the largest crop inside the planned patch that both
the network (:class:`InputRule`) and the method accept, and says so at the start of the run
(:meth:`CropChoice.describe`); ``config.json`` records it (:meth:`CropChoice.record`). Only
where no such crop exists is the run refused.

"Largest" is the most voxels; among crops of equal volume the one that is largest along the
first axis that differs (so the search is deterministic).
"""
import itertools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError


@dataclass(frozen=True)
class InputRule:
    """The crops the run's network accepts, per axis: a multiple of ``divisor`` and at least ``minimum``;
    ``fixed``: only the planned patch (networks whose weights are tied to the token count, e.g. UNETR's
    position embeddings)."""

    divisor: Tuple[int, ...]
    minimum: Tuple[int, ...]
    fixed: bool = False

    @classmethod
    def anything(cls, ndim: int) -> "InputRule":
        """No constraint from the network (a method's rule on its own, e.g. in tests)."""
        return cls((1,) * ndim, (1,) * ndim)

    def sizes(self, axis: int, planned: Sequence[int]) -> List[int]:
        """The sizes along ``axis`` the network accepts up to the planned one, largest first."""
        if self.fixed:
            return [int(planned[axis])]
        d, lo = int(self.divisor[axis]), max(1, int(self.minimum[axis]))
        return [c for c in range(int(planned[axis]) // d * d, lo - 1, -d) if c > 0]

    def describe(self) -> str:
        if self.fixed:
            return "the network takes only its planned patch (weights tied to the token count)"
        return (f"the network takes multiples of {tuple(int(d) for d in self.divisor)} of at least "
                f"{tuple(int(m) for m in self.minimum)}")


@dataclass(frozen=True)
class CropChoice:
    crop: Tuple[int, ...]
    planned: Tuple[int, ...]
    reason: str  # why the crop is smaller than the planned patch ("" when it is the planned patch)

    def describe(self) -> str:
        """The line the run prints at its start."""
        if self.crop == self.planned:
            return f"Crop {list(self.crop)}: the planned patch."
        return (f"Crop {list(self.crop)}: the largest valid crop inside the planned patch {list(self.planned)}, "
                f"because {self.reason}.")

    def record(self) -> dict:
        """What config.json keeps of the decision."""
        return {"crop_size": list(self.crop), "planned_patch_size": list(self.planned), "crop_reason": self.reason}


def _larger(a: Tuple[int, ...], b: Optional[Tuple[int, ...]]) -> bool:
    return b is None or (int(np.prod(a)), a) > (int(np.prod(b)), b)


def largest_crop(planned: Sequence[int], rule: InputRule, axis_ok: Callable[[int, int], bool],
                 joint_ok: Optional[Callable[[Tuple[int, ...]], bool]] = None) -> Optional[Tuple[int, ...]]:
    """The largest crop (see the module docstring) inside ``planned`` whose every axis the network
    (``rule``) and ``axis_ok(axis, size)`` accept, and that ``joint_ok(crop)`` accepts as a whole;
    None when there is none."""
    candidates = [[c for c in rule.sizes(a, planned) if axis_ok(a, c)] for a in range(len(planned))]
    if any(not c for c in candidates):
        return None
    best = tuple(c[0] for c in candidates)
    if joint_ok is None or joint_ok(best):
        return best
    found = None
    for crop in itertools.product(*candidates):
        if _larger(crop, found) and joint_ok(crop):
            found = crop
    return found


def choose(method: str, planned: Sequence[int], rule: InputRule, axis_ok: Callable[[int, int], bool],
           joint_ok: Optional[Callable[[Tuple[int, ...]], bool]], requirement: str) -> CropChoice:
    """:func:`largest_crop` as a :class:`CropChoice` whose reason names the method's ``requirement`` (in
    words) and the network's rule; NnsslError (naming both, and the fix) when no crop fits."""
    planned = tuple(int(p) for p in planned)
    crop = largest_crop(planned, rule, axis_ok, joint_ok)
    why = f"{method} needs {requirement}, and {rule.describe()}" if requirement else rule.describe()
    if crop is None:
        raise NnsslError(f"No crop inside the planned patch {list(planned)} works for {method}: {why}. Plan a patch "
                         f"that allows one (nnssl_plan_and_preprocess; e.g. re-plan, or edit the plans' patch_size), "
                         f"or change the method's settings with --set.")
    return CropChoice(crop, planned, "" if crop == planned else why)
