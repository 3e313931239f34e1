"""Learning-rate schedules as pure functions of (iteration, total iterations).

The engine sets every parameter group's lr from :meth:`LRSchedule.lr` before each step
instead of keeping a stateful torch scheduler: the lr then depends on nothing but the
iteration index and ``--iterations``, which is what makes a resumed run follow exactly the
schedule of an uninterrupted one.

Kinds (method config field ``lr_schedule``):

- ``"step"``: ``lr * gamma ** (it // step_iterations)`` (Volume Fusion: Adam, halved every
  20k-50k iterations);
- ``"poly"``: ``lr * (1 - it / total) ** 0.9`` (nnU-Net's PolyLRScheduler);
- ``"cosine"``: linear warm-up over ``warmup_iterations`` then cosine decay to 0 at ``total``
  (Masked LoGoNet, Swin-style SSL, HybridMIM).
"""
import math
from dataclasses import asdict, dataclass

from nnssl.errors import NnsslError

KINDS = ("step", "poly", "cosine")
POLY_EXPONENT = 0.9  # nnU-Net's value


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
            raise NnsslError(f"lr_schedule=step needs lr_step_iterations > 0 (got {self.step_iterations}); "
                             f"pass e.g. --set lr_step_iterations=20000.")
        if self.warmup_iterations < 0:
            raise NnsslError(f"warmup_iterations must be >= 0 (got {self.warmup_iterations}).")

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

    def to_dict(self) -> dict:
        return asdict(self)


def schedule_from_config(cfg, total_iterations: int, default_lr: float) -> LRSchedule:
    """Build the schedule from the method config's optional fields (defaults: cosine, no warm-up)."""
    return LRSchedule(
        kind=str(getattr(cfg, "lr_schedule", "cosine")),
        base_lr=float(getattr(cfg, "lr", default_lr)),
        total_iterations=int(total_iterations),
        warmup_iterations=int(getattr(cfg, "warmup_iterations", 0)),
        step_iterations=int(getattr(cfg, "lr_step_iterations", 0)),
        gamma=float(getattr(cfg, "lr_gamma", 0.5)),
    )
