"""Geometric primitives of the synthetic phantom: smooth random fields, deformed ellipsoids,
tubes and rib arcs, each evaluated on (warped) normalized coordinate arrays.

All shapes live in normalized patient coordinates ``p = (u, v, w)`` (see ``phantom.py``); their
``mask(u, v, w)`` takes three broadcastable float arrays (normally ``[z, y, x]`` crops of the
warped coordinate grid) and returns a boolean array of the broadcast shape. ``bounds()`` gives
an axis-aligned box ``(lo[3], hi[3])`` that contains the shape before warping, so the renderer
only evaluates a crop of the grid.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass
class Sinusoids:
    """A smooth random field ``f(p) = sum_k amp[k] * sin(freq[k] . p + phase[k])`` (K >= 1 terms).

    freq: [K, 3] (rad per normalized unit, ordered u, v, w); phase: [K]; amp: [K] for a scalar
    field or [K, C] for C channels (e.g. C=3 for a displacement field).
    """
    freq: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, terms: int, amp_max: float, freq_range: Tuple[float, float],
             channels: Optional[int] = None) -> "Sinusoids":
        direction = rng.normal(size=(terms, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        freq = direction * rng.uniform(*freq_range, size=(terms, 1))
        phase = rng.uniform(0, 2 * np.pi, size=terms)
        amp = rng.uniform(0, amp_max, size=(terms,) if channels is None else (terms, channels))
        return cls(freq, phase, amp)

    def bound(self) -> float:
        """An upper bound of |f| over all points (and channels)."""
        return float(np.abs(self.amp).sum(axis=0).max())

    def __call__(self, u, v, w):
        """Scalar field: array of the broadcast shape; C channels: list of C such arrays."""
        out = None
        for k in range(len(self.phase)):
            s = np.sin(self.freq[k, 0] * u + self.freq[k, 1] * v + self.freq[k, 2] * w + self.phase[k])
            term = [s * a for a in self.amp[k]] if self.amp.ndim == 2 else s * self.amp[k]
            if out is None:
                out = term
            elif self.amp.ndim == 2:
                out = [o + t for o, t in zip(out, term)]
            else:
                out = out + term
        return out


def rotation(angles) -> np.ndarray:
    """[3, 3] rotation from angles (rad) about w, v, u (applied in that order); columns are the
    rotated u, v, w axes."""
    a, b, c = angles
    rw = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rv = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    ru = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rw @ rv @ ru


@dataclass
class Ellipsoid:
    """An ellipsoid with semi-axes ``axes`` (local frame = columns of ``rotation``) whose radius is
    modulated by ``1 + wobble(q)`` on the local unit-sphere coordinates q, which bends it into a
    smooth organ-like blob."""
    center: np.ndarray  # [3] (u, v, w)
    axes: np.ndarray  # [3]
    rotation: np.ndarray  # [3, 3]
    wobble: Optional[Sinusoids] = None

    def bounds(self):
        grow = 1 + (self.wobble.bound() if self.wobble is not None else 0.0)
        half = np.sqrt(((self.rotation * self.axes[None, :]) ** 2).sum(axis=1)) * grow
        return self.center - half, self.center + half

    def mask(self, u, v, w):
        d = (u - self.center[0], v - self.center[1], w - self.center[2])
        q = [(d[0] * self.rotation[0, j] + d[1] * self.rotation[1, j] + d[2] * self.rotation[2, j]) / self.axes[j]
             for j in range(3)]
        radius = 1.0 + (self.wobble(*q) if self.wobble is not None else 0.0)
        return q[0] ** 2 + q[1] ** 2 + q[2] ** 2 <= radius ** 2


@dataclass
class Tube:
    """A tube around a polyline: points [N, 3], radii [N] linearly interpolated along each segment.
    Coordinates are divided by ``aniso`` [3] first, so aniso > 1 stretches the cross-section
    along that axis (e.g. the flattened inferior vena cava)."""
    points: np.ndarray
    radii: np.ndarray
    aniso: np.ndarray

    def bounds(self):
        half = self.radii.max() * self.aniso
        return self.points.min(axis=0) - half, self.points.max(axis=0) + half

    def mask(self, u, v, w):
        p = (u / self.aniso[0], v / self.aniso[1], w / self.aniso[2])
        pts = self.points / self.aniso
        inside = None
        for a, b, ra, rb in zip(pts[:-1], pts[1:], self.radii[:-1], self.radii[1:]):
            ab = b - a
            t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / max(ab @ ab, 1e-12)
            t = np.clip(t, 0.0, 1.0)
            dist2 = sum((p[i] - a[i] - t * ab[i]) ** 2 for i in range(3))
            seg = dist2 <= (ra + t * (rb - ra)) ** 2
            inside = seg if inside is None else inside | seg
        return inside


def superellipse_radius(u, v, center, axes, power):
    """Generalized radius of (u, v) w.r.t. the superellipse |du/a|^p + |dv/b|^p = 1 (1 on the curve)."""
    du = np.abs((u - center[0]) / axes[0])
    dv = np.abs((v - center[1]) / axes[1])
    return (du ** power + dv ** power) ** (1.0 / power)


@dataclass
class RibArc:
    """A rib cross-section band: the part of the superellipse shell ``rho in [rho_lo, rho_hi]``
    (relative to the body-interior outline) within ``half_span`` rad of the angle
    ``theta + slope * (w - w_center)`` and within ``w_half`` of ``w_center``. The angle is
    atan2(v - cv, u - cu): 0 = patient's left, pi/2 = posterior. The slope tilts the rib so it
    moves around the body from slice to slice like a real rib cut obliquely."""
    center: np.ndarray  # [2] (u, v) of the body outline
    axes: np.ndarray  # [2]
    power: float
    rho_lo: float
    rho_hi: float
    theta: float
    half_span: float
    slope: float
    w_center: float
    w_half: float

    def bounds(self):
        r = self.axes * self.rho_hi
        lo = np.array([self.center[0] - r[0], self.center[1] - r[1], self.w_center - self.w_half])
        hi = np.array([self.center[0] + r[0], self.center[1] + r[1], self.w_center + self.w_half])
        return lo, hi

    def mask(self, u, v, w):
        rho = superellipse_radius(u, v, self.center, self.axes, self.power)
        angle = np.arctan2(v - self.center[1], u - self.center[0])
        target = self.theta + self.slope * (w - self.w_center)
        off = np.abs((angle - target + np.pi) % (2 * np.pi) - np.pi)
        return (rho >= self.rho_lo) & (rho <= self.rho_hi) & (off <= self.half_span) & \
            (np.abs(w - self.w_center) <= self.w_half)
