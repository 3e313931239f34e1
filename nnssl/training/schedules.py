"""Learning-rate schedules as pure functions of (iteration, total iterations), sized to the run.

The engine sets every parameter group's lr from :meth:`LRSchedule.lr` before each step
instead of keeping a stateful torch scheduler: the lr then depends on nothing but the
iteration index and ``--iterations``, which is what makes a resumed run follow exactly the
schedule of an uninterrupted one.

Kinds (method config field ``lr_schedule``):

- ``"step"``: ``lr * gamma ** (it // step_iterations)`` (Volume Fusion: Adam, halved every
  20 % of the run);
- ``"poly"``: ``lr * (1 - it / total) ** 0.9`` (nnU-Net's PolyLRScheduler);
- ``"cosine"``: cosine decay from ``lr`` to 0 at ``total`` (Masked LoGoNet, Swin-style SSL,
  HybridMIM).

Every kind can start with a linear warm-up: ``lr * (it + 1) / warmup_iterations`` for the
first ``warmup_iterations`` steps, so the peak ``lr`` is reached at step ``warmup - 1``.

Config fields the engine reads (all optional; :func:`schedule_from_config`). A method declares
the ones its paper specifies in its config dataclass (which also makes them settable with
``--set``); lengths that the paper gives relative to its run go in as *fractions*, so that
``--iterations N`` gives the paper's shape at any N:

- ``lr`` (float): peak learning rate (default: the engine's 1e-4);
- ``lr_schedule`` (str): one of :data:`KINDS` (default ``"cosine"``);
- ``warmup_fraction`` (float in [0, 1)): warm-up length as a share of ``--iterations``
  (e.g. 0.1 for "10 warm-up epochs of 100"); rounded half up, at most ``total - 1``;
- ``warmup_iterations`` (Optional[int]): an absolute warm-up; when not None it wins over
  ``warmup_fraction`` (for papers that give iterations, or ``--set warmup_iterations=500``);
- ``lr_step_fraction`` (float > 0): for ``"step"``, the decay period as a share of the run
  (Volume Fusion: 20k of 100k = 0.2);
- ``lr_step_iterations`` (Optional[int]): an absolute decay period; wins over the fraction;
- ``lr_gamma`` (float): the factor of each step decay (default 0.5).

A warm-up that is not shorter than the run is refused (an lr that never reaches its peak
silently trains a different method). :func:`summarize_lrs` describes any lr curve (warm-up
end, decay points, peak and final lr); the engine prints it once at start, and the fine-tuning
trainers print the same for their per-epoch curves.
"""
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

from nnssl.errors import NnsslError

KINDS = ("step", "poly", "cosine")
POLY_EXPONENT = 0.9  # nnU-Net's value
# A curve with more decreases than this after its peak is reported as a continuous decay
# (cosine, poly) instead of a list of decay points.
MAX_LISTED_DECAYS = 20


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    base_lr: float
    total_iterations: int
    warmup_iterations: int = 0
    step_iterations: int = 0
    gamma: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise NnsslError(f"Unknown lr_schedule '{self.kind}'. Choose one of {', '.join(KINDS)} "
                             f"(e.g. --set lr_schedule=cosine).")
        if self.kind == "step" and self.step_iterations <= 0:
            raise NnsslError(f"lr_schedule=step needs a decay period > 0 (got {self.step_iterations}); "
                             f"pass e.g. --set lr_step_fraction=0.2 or --set lr_step_iterations=20000.")
        if self.warmup_iterations < 0:
            raise NnsslError(f"warmup_iterations must be >= 0 (got {self.warmup_iterations}).")
        if self.warmup_iterations and self.warmup_iterations >= self.total_iterations:
            raise NnsslError(f"The warm-up ({self.warmup_iterations}) must be shorter than the run "
                             f"({self.total_iterations}); shorten the warm-up or lengthen the run.")

    def lr(self, iteration: int) -> float:
        """Learning rate for the step that is about to run as step number ``iteration`` (0-based)."""
        it = int(iteration)
        if it < self.warmup_iterations:
            # (it + 1) so that the very first step does not run at lr 0.
            return self.base_lr * (it + 1) / self.warmup_iterations
        if self.kind == "step":
            return self.base_lr * self.gamma ** (it // self.step_iterations)
        if self.kind == "poly":
            return self.base_lr * max(0.0, 1.0 - it / self.total_iterations) ** POLY_EXPONENT
        span = max(1, self.total_iterations - self.warmup_iterations)
        progress = min(1.0, (it - self.warmup_iterations) / span)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def curve(self) -> List[float]:
        """The lr of every step of the run: [lr(0), ..., lr(total - 1)]."""
        return [self.lr(i) for i in range(self.total_iterations)]

    def describe(self, unit: str = "iteration") -> str:
        """One line: the kind and :func:`summarize_lrs` of the whole run."""
        return f"lr schedule ({self.kind}): " + format_lr_summary(summarize_lrs(self.curve()), unit)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_lrs(lrs: Sequence[float]) -> dict:
    """What a user needs to know about an lr curve (one value per step or epoch, ``len >= 1``).

    Returns ``{"length", "peak_lr", "peak_at", "warmup_steps", "decay_points", "final_lr"}``:
    ``peak_at`` is the first index at the maximum; ``warmup_steps`` = ``peak_at + 1`` when the
    curve rises to its peak, else 0; ``decay_points`` lists the indices where the lr drops
    below the previous value after the peak, or is None when there are more than
    :data:`MAX_LISTED_DECAYS` of them (a continuous decay); ``final_lr`` is the last value.
    """
    lrs = [float(v) for v in lrs]
    peak = max(lrs)
    peak_at = lrs.index(peak)
    drops = [i for i in range(peak_at + 1, len(lrs)) if lrs[i] < lrs[i - 1]]
    return {"length": len(lrs), "peak_lr": peak, "peak_at": peak_at,
            "warmup_steps": peak_at + 1 if lrs[0] < peak else 0,
            "decay_points": drops if len(drops) <= MAX_LISTED_DECAYS else None, "final_lr": lrs[-1]}


def format_lr_summary(s: dict, unit: str = "iteration") -> str:
    """The summary of :func:`summarize_lrs` as one line, ``unit`` = "iteration" or "epoch"."""
    n = s["length"]
    parts = [f"{n} {unit}s"]
    if s["warmup_steps"]:
        parts.append(f"linear warm-up over {unit}s 0-{s['peak_at']} ({100 * s['warmup_steps'] / n:.3g}% of the run)")
    parts.append(f"peak lr {s['peak_lr']:.4g} from {unit} {s['peak_at']}")
    if s["decay_points"] is None:
        parts.append(f"continuous decay after {unit} {s['peak_at']}")
    elif s["decay_points"]:
        parts.append(f"lowered at {unit}s " + ", ".join(map(str, s["decay_points"])))
    else:
        parts.append("no decay within the run")
    parts.append(f"final lr {s['final_lr']:.4g} ({unit} {n - 1})")
    return "; ".join(parts)


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _length(cfg, absolute: str, fraction: str, total: int, default_fraction: float) -> Optional[int]:
    """An absolute length field (wins when not None) or a fraction of ``total``; None if neither."""
    value = getattr(cfg, absolute, None)
    if value is not None:
        return int(value)
    frac = getattr(cfg, fraction, default_fraction)
    return None if frac is None else _half_up(float(frac) * total)


def schedule_from_config(cfg, total_iterations: int, default_lr: float) -> LRSchedule:
    """Build the schedule of a ``total_iterations`` run from the method config's optional fields
    (see the module docstring; defaults: cosine, no warm-up); bad lengths are refused naming the
    ``--set`` key or ``--iterations``."""
    total = int(total_iterations)
    frac = getattr(cfg, "warmup_fraction", None)
    if frac is not None and not 0.0 <= float(frac) < 1.0:
        raise NnsslError(f"warmup_fraction={frac} must be in [0, 1) (a share of --iterations); fix it with "
                         f"--set warmup_fraction=0.1.")
    warmup = _length(cfg, "warmup_iterations", "warmup_fraction", total, 0.0)
    if getattr(cfg, "warmup_iterations", None) is None:
        warmup = min(warmup, total - 1)  # a fraction < 1 always leaves the run at least one step after it
    elif warmup >= total:
        raise NnsslError(f"The warm-up (--set warmup_iterations={warmup}) is not shorter than the run "
                         f"(--iterations {total}), so the lr would never reach its peak. Pass a larger --iterations, "
                         f"a smaller --set warmup_iterations, or --set warmup_iterations=None to use "
                         f"warmup_fraction ({frac if frac is not None else 0}) of the run.")
    step = 0
    if str(getattr(cfg, "lr_schedule", "cosine")) == "step":
        frac_step = getattr(cfg, "lr_step_fraction", None)
        if getattr(cfg, "lr_step_iterations", None) is None and (frac_step is None or float(frac_step) <= 0):
            raise NnsslError(f"lr_schedule=step needs lr_step_fraction > 0 (got {frac_step}) or lr_step_iterations; "
                             f"pass e.g. --set lr_step_fraction=0.2.")
        step = _length(cfg, "lr_step_iterations", "lr_step_fraction", total, None)
        if getattr(cfg, "lr_step_iterations", None) is None:
            step = max(1, step)  # a fraction of a very short run still decays once per step at most
    return LRSchedule(
        kind=str(getattr(cfg, "lr_schedule", "cosine")),
        base_lr=float(getattr(cfg, "lr", default_lr)),
        total_iterations=total,
        warmup_iterations=int(warmup),
        step_iterations=step,
        gamma=float(getattr(cfg, "lr_gamma", 0.5)),
    )
