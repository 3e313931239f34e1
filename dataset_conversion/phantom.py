"""A BTCV-like abdominal CT phantom (SPEC §8): body layers, spine, ribs, bowel and the 13 BTCV organs.

Coordinates. Anatomy is drawn in normalized patient coordinates ``(u, v, w)``; the field of view
spans ``[-fov_scale, fov_scale]`` on every axis, so the body fills the in-plane field whatever
the voxel count (a miniature abdomen at small sizes). u runs from the patient's right (-) to
left (+), v from anterior (-) to posterior (+), w from inferior (-) to superior (+). The array
order is ``[Z, Y, X] = [w, v, u]``; with the identity direction (ITK's LPS world: +x left,
+y posterior, +z superior) the patient's right is on the image left (radiological convention).
Cases with a flipped direction matrix have their arrays flipped to match, so the anatomy stays
where it belongs in world space; small rotations tilt the patient in the scanner.

Randomness: :func:`sample_params` draws every random number of a case (body, organs, spacing,
orientation, bias, noise seed); :func:`render_anatomy` and :func:`realize` are deterministic
functions of those draws. ``make_phantom(rng)`` = ``realize(sample_params(rng))``.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from nnssl.dataset_conversion.phantom_shapes import Ellipsoid, RibArc, Sinusoids, Tube, rotation, superellipse_radius
from nnssl.errors import NnsslError

DEFAULT_SHAPE = (40, 96, 96)  # (Z, Y, X)

# BTCV label ids (SPEC §8).
LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
          7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic veins", 11: "pancreas",
          12: "right adrenal gland", 13: "left adrenal gland"}
# Base HU per label: soft organs nearly alike (so position and shape matter), contrast-enhanced
# kidneys and vessels bright. Assumption: per case, vessels and kidneys share a contrast-phase
# offset in [-25, 25] HU and every organ gets its own +-3 HU.
ORGAN_HU = {1: 55.0, 2: 150.0, 3: 150.0, 4: 15.0, 5: 40.0, 6: 60.0, 7: 30.0, 8: 200.0, 9: 180.0, 10: 190.0,
            11: 45.0, 12: 35.0, 13: 35.0}
AIR, FAT, MUSCLE, VISCERAL, BOWEL_GAS = -1000.0, -100.0, 50.0, -80.0, -800.0
CORTICAL, CANCELLOUS, DISC, CSF, RIB = 700.0, 250.0, 90.0, 15.0, 600.0
SPACING_INPLANE = (0.6, 1.0)  # mm, SPEC §8
SPACING_SLICE = (2.5, 5.0)  # mm, SPEC §8
# Assumption: one case in three gets a non-identity direction (flip or small rotation).
P_NON_IDENTITY = 1.0 / 3.0


@dataclass
class Phantom:
    """image: [Z, Y, X] int16 HU; label: [Z, Y, X] uint8 (0..13) or None; spacing, origin: (x, y, z)
    in mm; direction: 9 floats, row-major (SimpleITK convention)."""
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]


@dataclass
class Structure:
    """One painted structure: voxels inside ``shape`` (and inside the region) get ``hu`` and ``label``."""
    name: str
    label: int
    hu: float
    shape: object  # Ellipsoid | Tube | RibArc
    region: str  # "body" or "interior" (inside the abdominal wall)


@dataclass
class Body:
    center: np.ndarray  # [2] (u, v)
    axes: np.ndarray  # [2] outer semi-axes
    power: float  # superellipse exponent (> 2 flattens the back and sides)
    fat: float  # subcutaneous fat thickness (normalized units)
    muscle: float  # abdominal wall muscle thickness

    @property
    def interior_axes(self) -> np.ndarray:
        return self.axes - self.fat - self.muscle


@dataclass
class PhantomParams:
    """Every random draw of one case; rendering is a deterministic function of this."""
    shape: Tuple[int, int, int]
    fov_scale: float
    body: Body
    warp: Sinusoids  # 3-channel smooth displacement of all coordinates
    structures: List[Structure]  # painted in order; later ones win
    bias_mult: Sinusoids  # multiplicative field on attenuation (HU + 1000)
    bias_add: Sinusoids  # additive HU field inside the body
    noise_sigma: float
    noise_seed: int
    spacing: Tuple[float, float, float]
    orientation: str  # "identity", "flip_xy", "flip_z" or "rotation"
    direction: Tuple[float, ...]
    origin: Tuple[float, float, float]


def check_shape(shape) -> Tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise NnsslError(f"Phantom shape {tuple(shape)} is invalid: give three positive integers Z Y X "
                         f"(e.g. --shape {' '.join(map(str, DEFAULT_SHAPE))}).")
    return tuple(int(s) for s in shape)


def _wobbly_ellipsoid(rng, center, axes, angles, wobble=0.06) -> Ellipsoid:
    return Ellipsoid(np.asarray(center, float), np.asarray(axes, float), rotation(angles),
                     Sinusoids.draw(rng, 3, wobble, (1.5, 3.0)))


def _organs(rng, body: Body) -> List[Structure]:
    """The 13 BTCV organs, jittered around canonical positions given relative to the body interior
    (``(ur, vr)`` in units of the interior semi-axes; sizes scale with the body)."""
    ai, bi = body.interior_axes
    s = float(np.sqrt(ai * bi) / np.sqrt(0.72 * 0.55))
    contrast = rng.uniform(-25, 25)

    def pos(ur, vr, w, jitter=0.04):
        j = rng.uniform(-jitter, jitter, 3)
        return np.array([body.center[0] + (ur + j[0]) * ai, body.center[1] + (vr + j[1]) * bi, w + j[2]])

    def size(au, av, aw):
        return np.array([au * s, av * s, aw]) * rng.uniform(0.88, 1.12, 3)

    def angles(yaw, spread=0.2):
        return (yaw + rng.uniform(-spread, spread), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15))

    def tube(points, radii, aniso=(1.0, 1.0, 1.5)):
        pts = np.stack([pos(*p, jitter=0.03) for p in points])
        return Tube(pts, np.asarray(radii, float) * s * rng.uniform(0.88, 1.12), np.asarray(aniso, float))

    def hu(label):
        base = ORGAN_HU[label] + rng.uniform(-3, 3)
        return base + contrast if label in (2, 3, 8, 9, 10) else base

    hus = {k: hu(k) for k in sorted(LABELS)}  # one value per label (the liver has two lobes)
    e = _wobbly_ellipsoid
    organs = [
        (6, e(rng, pos(-0.45, -0.1, 0.5), size(0.32, 0.42, 0.55), angles(0.0, 0.1))),  # liver, right lobe
        (6, e(rng, pos(0.05, -0.45, 0.62), size(0.28, 0.2, 0.3), angles(0.3))),  # liver, left lobe
        (4, e(rng, pos(-0.35, -0.55, 0.1), size(0.07, 0.09, 0.16), angles(0.6))),  # gallbladder
        (7, e(rng, pos(0.35, -0.35, 0.45), size(0.2, 0.18, 0.3), angles(0.5))),  # stomach
        (1, e(rng, pos(0.68, 0.35, 0.5), size(0.1, 0.2, 0.22), angles(-0.6))),  # spleen
        (11, tube([(-0.18, 0.0, 0.0), (0.0, 0.05, 0.08), (0.25, 0.15, 0.15), (0.55, 0.25, 0.25)],
                  [0.065, 0.05, 0.045, 0.04])),  # pancreas: head, neck, body, tail
        (2, e(rng, pos(-0.45, 0.5, -0.15), size(0.1, 0.14, 0.25), angles(-0.6))),  # right kidney
        (3, e(rng, pos(0.45, 0.5, -0.05), size(0.1, 0.14, 0.25), angles(0.6))),  # left kidney
        (5, tube([(-0.04, 0.08, 1.1), (0.08, 0.0, 0.75), (0.25, -0.15, 0.5)], [0.04, 0.04, 0.045])),  # esophagus
        (9, tube([(-0.2, 0.28, -1.1), (-0.2, 0.25, 0.3), (-0.15, 0.2, 0.9)], [0.055, 0.06, 0.06],
                 aniso=(1.3, 1.0, 1.5))),  # inferior vena cava
        (8, tube([(0.06, 0.32, -1.1), (0.06, 0.32, 0.5), (0.04, 0.36, 1.1)], [0.045, 0.05, 0.05])),  # aorta
        (10, tube([(-0.35, 0.0, 0.35), (-0.05, 0.12, 0.1), (0.25, 0.25, 0.18), (0.55, 0.35, 0.3)],
                  [0.035, 0.035, 0.03, 0.03])),  # portal vein -> confluence -> splenic vein
        (12, e(rng, pos(-0.3, 0.45, 0.32), size(0.045, 0.07, 0.12), angles(0.8), wobble=0.04)),  # r. adrenal
        (13, e(rng, pos(0.28, 0.38, 0.32), size(0.045, 0.07, 0.12), angles(-0.8), wobble=0.04)),  # l. adrenal
    ]
    return [Structure(LABELS[k], k, hus[k], shape, "interior") for k, shape in organs]


def _skeleton_and_muscles(rng, body: Body) -> Tuple[List[Structure], List[Structure]]:
    """(muscles, bones): psoas and paraspinal muscles; vertebral column with discs and posterior
    arch; ribs in the upper abdomen. Bones are painted last so they cut through everything."""
    ai, bi = body.interior_axes
    cu, cv = body.center
    s = float(np.sqrt(ai * bi) / np.sqrt(0.72 * 0.55))
    vb = np.array([cu, cv + 0.62 * bi])  # vertebral body centre
    r_vb = 0.09 * s * rng.uniform(0.9, 1.1)

    def vertical(u, v, r, aniso=(1.0, 1.0, 1.0)) -> Tube:  # craniocaudal, through any field of view
        return Tube(np.array([[u, v, -10.0], [u, v, 10.0]]), np.array([r, r]), np.asarray(aniso, float))

    muscles = []
    for side in (-1, 1):
        muscles.append(Structure("paraspinal", 0, MUSCLE, vertical(cu + side * 0.13 * s, vb[1] + 0.17 * s, 0.08 * s,
                                                                   (1.2, 1.0, 1.0)), "body"))
        psoas = Tube(np.array([[cu + side * 0.14 * s, vb[1] - 0.02 * s, -1.2], [cu + side * 0.1 * s, vb[1], 0.2]]),
                     np.array([0.07, 0.02]) * s, np.ones(3))
        muscles.append(Structure("psoas", 0, MUSCLE, psoas, "interior"))
    canal = np.array([cu, vb[1] + r_vb + 0.045 * s])
    bones = [Structure("vertebral cortex", 0, CORTICAL, vertical(*vb, r_vb), "body"),
             Structure("vertebral spongiosa", 0, CANCELLOUS, vertical(*vb, r_vb - 0.02 * s), "body")]
    period = rng.uniform(0.3, 0.4)  # vertebral height in w units
    for w in np.arange(-1.3, 1.3, period) + rng.uniform(0, period):
        disc = Ellipsoid(np.array([vb[0], vb[1], w]), np.array([r_vb * 1.02, r_vb * 1.02, 0.035]), np.eye(3))
        bones.append(Structure("disc", 0, DISC, disc, "body"))
    bones += [Structure("posterior arch", 0, RIB, vertical(*canal, 0.06 * s), "body"),
              Structure("spinous process", 0, RIB, vertical(cu, canal[1] + 0.08 * s, 0.03 * s, (1.0, 2.5, 1.0)),
                        "body"),
              Structure("spinal canal", 0, CSF, vertical(*canal, 0.035 * s), "body")]
    rib_gap = rng.uniform(0.22, 0.3)
    for w in np.arange(1.1, -0.3, -rib_gap):
        for side in (-1, 1):  # left side angles measured from +u; the right side is mirrored
            theta = rng.uniform(0.2, 0.9)
            theta = theta if side > 0 else np.pi - theta
            arc = RibArc(body.center.copy(), body.interior_axes.copy(), body.power, 0.98, 0.98 + 0.06 / ai,
                         theta, rng.uniform(0.25, 0.45), side * rng.uniform(-2.0, -1.0), w, 0.05)
            bones.append(Structure("rib", 0, RIB, arc, "body"))
    return muscles, bones


def _bowel(rng, body: Body, loops: int = 8) -> List[Structure]:
    """Unlabeled bowel loops (soft tissue, some with gas) as distractors in the lower abdomen."""
    ai, bi = body.interior_axes
    out = []
    for _ in range(loops):
        c = np.array([body.center[0] + rng.uniform(-0.55, 0.55) * ai, body.center[1] + rng.uniform(-0.7, 0.1) * bi,
                      rng.uniform(-1.0, 0.1)])
        axes = np.array([rng.uniform(0.06, 0.12), rng.uniform(0.06, 0.12), rng.uniform(0.1, 0.25)])
        out.append(Structure("bowel", 0, rng.uniform(20, 45), _wobbly_ellipsoid(rng, c, axes, rng.uniform(-1, 1, 3)),
                             "interior"))
        if rng.random() < 0.4:
            out.append(Structure("bowel gas", 0, BOWEL_GAS, _wobbly_ellipsoid(rng, c, axes * 0.45, (0, 0, 0)),
                                 "interior"))
    return out


def _orientation(rng) -> Tuple[str, np.ndarray]:
    kind = "identity"
    if rng.random() < P_NON_IDENTITY:
        kind = ("flip_xy", "flip_z", "rotation")[int(rng.integers(3))]
    angle = rng.choice([-1.0, 1.0]) * np.deg2rad(rng.uniform(3, 12))
    about_z = rng.random() < 0.5
    if kind == "flip_xy":
        return kind, np.diag([-1.0, -1.0, 1.0])
    if kind == "flip_z":
        return kind, np.diag([1.0, 1.0, -1.0])
    if kind == "rotation":  # in-plane rotation (about z) or a gantry-like tilt (about x)
        c, s_ = np.cos(angle), np.sin(angle)
        m = [[c, -s_, 0], [s_, c, 0], [0, 0, 1]] if about_z else [[1, 0, 0], [0, c, -s_], [0, s_, c]]
        return kind, np.array(m)
    return kind, np.eye(3)


def sample_params(rng: np.random.Generator, shape=DEFAULT_SHAPE, spacing=None, fov_scale: float = 1.0) -> PhantomParams:
    """Draw every random quantity of one case. ``spacing`` (x, y, z mm) overrides the drawn one."""
    shape = check_shape(shape)
    if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(x) and x > 0 for x in spacing)):
        raise NnsslError(f"Phantom spacing {spacing} is invalid: give three positive numbers (x, y, z) in mm.")
    if not (np.isfinite(fov_scale) and fov_scale > 0):
        raise NnsslError(f"Field-of-view scale {fov_scale} is invalid: give a positive number (1 = default).")
    body = Body(center=np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.05)]),
                axes=np.array([rng.uniform(0.8, 0.93), rng.uniform(0.62, 0.76)]), power=rng.uniform(2.0, 2.6),
                fat=rng.uniform(0.06, 0.14), muscle=rng.uniform(0.035, 0.055))
    warp = Sinusoids.draw(rng, 3, 0.02, (1.0, 2.5), channels=3)
    muscles, bones = _skeleton_and_muscles(rng, body)
    structures = muscles + _bowel(rng, body) + _organs(rng, body) + bones
    bias_mult = Sinusoids.draw(rng, 3, 0.005, (0.5, 1.5))
    bias_add = Sinusoids.draw(rng, 3, 1.7, (0.5, 1.5))
    noise_sigma = rng.uniform(8.0, 16.0)
    noise_seed = int(rng.integers(2 ** 63))
    inplane = round(float(rng.uniform(*SPACING_INPLANE)), 4)
    drawn = (inplane, inplane, round(float(rng.uniform(*SPACING_SLICE)), 4))
    # Assumption: a different field of view keeps the anatomy's physical size, so the spacing
    # scales with it (fov_scale 2 = twice the region at the same matrix size).
    sp = tuple(round(float(x) * fov_scale, 6) for x in (drawn if spacing is None else spacing))
    orientation, direction = _orientation(rng)
    extent = np.array(sp) * (np.array(shape[::-1]) - 1)  # (x, y, z) mm between first and last voxel
    centre = rng.uniform([-30, -30, -300], [30, 30, 300])
    origin = tuple(float(o) for o in centre - direction @ (extent / 2))
    return PhantomParams(shape, float(fov_scale), body, warp, structures, bias_mult, bias_add, float(noise_sigma),
                         noise_seed, sp, orientation, tuple(float(d) for d in direction.ravel()), origin)


def _axis_coords(n: int, fov: float) -> np.ndarray:
    return fov * ((2 * np.arange(n) + 1) / n - 1)  # voxel centres in [-fov, fov]


def _crop(lo, hi, coords, margin) -> Tuple[slice, ...]:
    """Index slices [z, y, x] of the voxels whose unwarped (u, v, w) lie in [lo - margin, hi + margin]."""
    out = []
    for axis in (2, 1, 0):  # w -> z, v -> y, u -> x
        c = coords[axis]
        start, stop = np.searchsorted(c, lo[axis] - margin), np.searchsorted(c, hi[axis] + margin, "right")
        out.append(slice(int(start), int(stop)))
    return tuple(out)


def render_anatomy(params: PhantomParams):
    """Noise-free anatomy: (hu [Z, Y, X] float32, label [Z, Y, X] uint8, body mask [Z, Y, X] bool).

    Every voxel with label k holds exactly organ k's HU (painted in the same pass)."""
    zn, yn, xn = params.shape
    u0, v0, w0 = (_axis_coords(n, params.fov_scale) for n in (xn, yn, zn))
    w, v, u = np.meshgrid(w0, v0, u0, indexing="ij")
    du, dv, dw = params.warp(u, v, w)
    u, v, w = u + du, v + dv, w + dw  # smooth random deformation of all anatomy
    margin = params.warp.bound()
    b = params.body
    body = superellipse_radius(u, v, b.center, b.axes, b.power) <= 1.0
    interior = superellipse_radius(u, v, b.center, b.interior_axes, b.power) <= 1.0
    hu = np.full(params.shape, AIR, np.float32)
    hu[body] = FAT
    hu[superellipse_radius(u, v, b.center, b.axes - b.fat, b.power) <= 1.0] = MUSCLE
    hu[interior] = VISCERAL
    label = np.zeros(params.shape, np.uint8)
    regions = {"body": body, "interior": interior}
    for st in params.structures:
        lo, hi = st.shape.bounds()
        sl = _crop(lo, hi, (u0, v0, w0), margin)
        if any(s.start >= s.stop for s in sl):
            continue
        m = st.shape.mask(u[sl], v[sl], w[sl]) & regions[st.region][sl]
        hu[sl][m] = st.hu
        label[sl][m] = st.label
    return hu, label, body


def realize(params: PhantomParams, labeled: bool = True) -> Phantom:
    """Render the anatomy, add the acquisition effects (bias fields, Gaussian noise) and orient it."""
    hu, label, body = render_anatomy(params)
    zn, yn, xn = params.shape
    w, v, u = np.meshgrid(*(_axis_coords(n, params.fov_scale) for n in (zn, yn, xn)), indexing="ij", sparse=True)
    # Bias acts on attenuation (HU + 1000) so air stays at -1000; the additive part is confined to
    # the body (scatter / beam hardening have no effect in the surrounding air).
    img = (hu + 1000.0) * (1.0 + params.bias_mult(u, v, w)) - 1000.0 + params.bias_add(u, v, w) * body
    img = img + np.random.default_rng(params.noise_seed).normal(0.0, params.noise_sigma, params.shape)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    flips = {"flip_xy": (1, 2), "flip_z": (0,)}.get(params.orientation, ())
    if flips:
        img = np.ascontiguousarray(np.flip(img, flips))
        label = np.ascontiguousarray(np.flip(label, flips))
    return Phantom(img, label if labeled else None, params.spacing, params.origin, params.direction)


def make_phantom(rng: np.random.Generator, shape=DEFAULT_SHAPE, spacing=None, labeled: bool = True,
                 fov_scale: float = 1.0) -> Phantom:
    """One synthetic abdominal CT case. shape: (Z, Y, X); spacing: (x, y, z) mm or None (drawn:
    in-plane 0.6-1.0, slices 2.5-5.0); fov_scale > 1 shows more of the surroundings, < 1 crops
    into the body. The image is the same whether or not the label is returned."""
    return realize(sample_params(rng, shape, spacing, fov_scale), labeled)
