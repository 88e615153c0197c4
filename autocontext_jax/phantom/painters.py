"""Painting one random abdomen: the per-case painter and one function per structure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from autocontext_jax.phantom.anatomy import _BONE, _REF_SEMI_AXES, _T
from autocontext_jax.phantom.fields import (
    _curve,
    _ellipsoid_field,
    _Region,
    _rotation,
    _smooth_min,
    _smooth_noise,
    _tube_field,
    _wiggle,
)


class _Painter:
    """The tissue volume of one case plus the random frame that maps reference mm to it."""

    def __init__(
        self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray
    ) -> None:
        self.rng = rng
        self.spacing = spacing
        fov_half = np.asarray(shape) * spacing / 2.0
        # Body: fills 80-90 % of the field of view in x-y, shifted by a few mm.
        fill = np.array([rng.uniform(0.82, 0.92), rng.uniform(0.78, 0.88)])
        self.semi = np.array([*(fill * fov_half[:2]), fov_half[2]])
        room = np.maximum(fov_half - self.semi, 0.0)
        shift = rng.uniform(-1.0, 1.0, 3) * np.array([min(room[0], 6.0), min(room[1], 5.0), 6.0])
        # Every anatomical position is reference mm times this per-axis scale.
        self.k = self.semi / np.array(_REF_SEMI_AXES)
        # Vessels keep their absolute size unless the field of view is small.
        self.vessel_scale = float(min(1.0, self.k.mean()))
        self.axes = tuple(
            ((np.arange(n) - (n - 1) / 2.0) * s - c).astype(np.float32)
            for n, s, c in zip(shape, spacing, shift, strict=True)
        )
        self.fov_lo = -fov_half - shift
        self.fov_hi = fov_half - shift
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.cavity = np.zeros(shape, dtype=bool)
        # Landmarks that later painting steps attach to (aorta centreline, porta hepatis, ...).
        self.marks: dict[str, np.ndarray] = {}

    def at(self, x: float, y: float, z: float, sd: float = 0.0) -> np.ndarray:
        """Reference-mm point mapped into this body, jittered by `sd` reference mm."""
        return (np.array([x, y, z]) + self.rng.normal(0.0, sd, 3)) * self.k

    def size(self, a: float, b: float, c: float, var: float = 0.15) -> np.ndarray:
        """Reference-mm semi-axes scaled into this body with a random size factor of +-`var`."""
        overall = self.rng.uniform(1.0 - var, 1.0 + var)
        return np.array([a, b, c]) * self.k * overall * self.rng.uniform(0.95, 1.05, 3)

    def full(self) -> _Region:
        """The whole volume as a region."""
        return self.region(np.array([-np.inf] * 3), np.array([np.inf] * 3))

    def region(self, lo: np.ndarray, hi: np.ndarray) -> _Region | None:
        """Voxels inside the mm box [lo, hi]; None when it misses the volume."""
        sl = []
        for ax, l0, h0 in zip(self.axes, lo, hi, strict=True):
            i0, i1 = int(np.searchsorted(ax, l0, "left")), int(np.searchsorted(ax, h0, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        x, y, z = (ax[s] for ax, s in zip(self.axes, sl, strict=True))
        # Clip to the field-of-view edges, which (unlike voxel centres) do not depend on spacing.
        lo = np.maximum(lo, self.fov_lo)
        hi = np.minimum(hi, self.fov_hi)
        return _Region(tuple(sl), x[:, None, None], y[None, :, None], z[None, None, :], lo, hi)

    def paint(
        self,
        region: _Region,
        mask: np.ndarray,
        tissue: str,
        *,
        in_cavity: bool = False,
        over: Sequence[int] | None = None,
        keep: Sequence[int] = (),
    ) -> None:
        """Set `tissue` where mask holds, optionally only in the cavity / over given tissues."""
        view = self.tissue[region.slices]
        mask = np.broadcast_to(mask, region.shape)
        if in_cavity:
            mask = mask & self.cavity[region.slices]
        if over is not None:
            mask = mask & np.isin(view, over)
        if keep:
            mask = mask & ~np.isin(view, keep)
        view[mask] = _T[tissue]

    def ellipsoid(
        self,
        centre: np.ndarray,
        semi: np.ndarray,
        rot: np.ndarray,
        noise: float = 0.0,
        feature_mm: float = 30.0,
    ) -> tuple[_Region | None, np.ndarray | None]:
        """Region and perturbed implicit field (unitless, <0 inside) of a random ellipsoid."""
        reach = semi.max() * (1.0 + 3.0 * noise)
        region = self.region(centre - reach, centre + reach)
        if region is None:
            return None, None
        field = _ellipsoid_field(region, centre, semi, rot)
        if noise:
            field = field + noise * _smooth_noise(self.rng, region, feature_mm)
        return region, field

    def tube(
        self,
        ctrl: np.ndarray,
        radii: Sequence[float],
        noise_mm: float = 0.0,
        feature_mm: float = 15.0,
    ) -> tuple[_Region | None, np.ndarray | None, np.ndarray]:
        """Region, perturbed signed distance (mm) and centreline of a smooth tube."""
        radii = np.asarray(radii, dtype=float)
        # Sample densely relative to the radius so capsule joints do not show.
        step = float(np.clip(0.6 * radii.min(), 0.75, 4.0))
        pts, r = _curve(ctrl, radii, step)
        margin = 3.0 * noise_mm + 1.0  # mm, independent of spacing (see _smooth_noise)
        region = self.region(pts.min(0) - r.max() - margin, pts.max(0) + r.max() + margin)
        if region is None:
            return None, None, pts
        field = _tube_field(region, pts, r, margin)
        if noise_mm:
            field = field + noise_mm * _smooth_noise(self.rng, region, feature_mm)
        return region, field, pts

    def vessel(
        self,
        waypoints: Sequence[np.ndarray],
        radii: Sequence[float],
        tissue: str,
        *,
        wiggle_mm: float = 2.0,
        every_mm: float = 15.0,
        over: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Paint a smooth tortuous vessel (radii in absolute mm) and return its centreline."""
        way = np.array(waypoints, dtype=float)
        seg = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(way, axis=0), axis=1))]
        ctrl = _wiggle(self.rng, way, every_mm, wiggle_mm)
        cs = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
        # Radii are given at the waypoints; carry them over to the inserted control points.
        r = np.interp(cs / max(cs[-1], 1e-9), seg / max(seg[-1], 1e-9), radii)
        region, field, pts = self.tube(ctrl, r * self.vessel_scale)
        if region is not None:
            self.paint(region, field <= 0.0, tissue, over=over, keep=_BONE)
        return pts


def _at_height(curve: np.ndarray, z: float) -> np.ndarray:
    """The point of a (roughly vertical) centreline at height `z`."""
    return curve[int(np.argmin(np.abs(curve[:, 2] - z)))]


def _surface_point(
    centre: np.ndarray, semi: np.ndarray, rot: np.ndarray, direction: Sequence[float]
) -> np.ndarray:
    """Where a ray from the centre of an ellipsoid along `direction` leaves it."""
    u = np.asarray(direction, dtype=float)
    u = u / np.linalg.norm(u)
    local = rot.T @ u
    return centre + u / np.sqrt(np.sum((local / semi) ** 2))


# ----------------------------------------------------------------------------------------------
# Anatomy, painted from low to high label priority (later paint wins).


def _paint_body(p: _Painter) -> None:
    """Air, subcutaneous fat, muscle wall and the visceral fat cavity."""
    rng = p.rng
    region = p.full()
    taper = 1.0 + rng.uniform(-0.04, 0.04) * region.z / p.semi[2]  # waist vs chest
    fat = rng.uniform(6.0, 14.0) * p.k[:2].mean()
    wall = rng.uniform(4.0, 7.0) * p.k[:2].mean()

    def rho(shrink: float) -> np.ndarray:
        ax, ay = (p.semi[0] - shrink) * taper, (p.semi[1] - shrink) * taper
        # A super-ellipse (exponent 2.4) gives the flatter back and sides of a real abdomen.
        return np.abs(region.x / ax) ** 2.4 + np.abs(region.y / ay) ** 2.4

    p.paint(region, rho(0.0) <= 1.0, "subcutaneous_fat")
    p.paint(region, rho(fat) <= 1.0, "muscle")
    interior = rho(fat + wall) <= 1.0
    p.paint(region, interior, "visceral_fat")
    p.cavity[...] = interior
    p.marks["rib_semi"] = p.semi[:2] - fat - 0.5 * wall


def _paint_ribs(p: _Painter) -> None:
    """Lower ribs in the body wall, sloping down from the spine to the front."""
    rng = p.rng
    a, b = p.marks["rib_semi"]
    wall = (_T["subcutaneous_fat"], _T["muscle"], _T["visceral_fat"], _T["lung"])
    z0 = rng.uniform(70.0, 82.0)
    for i in range(4):
        # Lower ribs are shorter (floating ribs end laterally).
        front = np.deg2rad(40.0 - 22.0 * i + rng.normal(0.0, 5.0))
        theta = np.linspace(np.deg2rad(-68.0), front, 12)
        # Super-ellipse parametrisation matching the body outline of _paint_body.
        c, s = np.cos(theta), np.sin(theta)
        u = np.sign(c) * np.abs(c) ** (2 / 2.4)
        v = np.sign(s) * np.abs(s) ** (2 / 2.4)
        z = (z0 - 24.0 * i - 28.0 * (theta - theta[0]) / (np.pi / 2)) * p.k[2]
        for side in (1.0, -1.0):
            ctrl = np.stack([side * a * u, b * v, z], axis=1)
            region, field, _ = p.tube(ctrl, [3.5 * p.k[:2].mean()] * len(ctrl))
            if region is not None:
                p.paint(region, field <= 0.0, "cortical_bone", over=wall)
                p.paint(region, field <= -1.5, "cancellous_bone", over=(_T["cortical_bone"],))


def _paint_spine(p: _Painter) -> None:
    """Vertebral bodies with discs, spinal canal and arch, psoas and back muscles."""
    rng = p.rng
    region = p.full()
    k = p.k
    x, y, z = region.x / k[0], region.y / k[1], region.z / k[2]  # reference mm
    # Psoas grows caudally from its origin near T12/L1.
    r_psoas = 3.0 + 9.0 * np.clip((15.0 - z) / 80.0, 0.0, 1.0)
    psoas = ((np.abs(x) - 23.0) ** 2 + (y + 30.0) ** 2) <= r_psoas**2
    erector = ((np.abs(x) - 19.0) / 13.0) ** 2 + ((y + 57.0) / 9.0) ** 2 <= 1.0
    body = (x / 15.0) ** 2 + ((y + 30.0) / 12.0) ** 2
    canal = x**2 + (y + 48.0) ** 2
    arch = (canal <= 10.5**2) & (y < -46.0)
    spinous = (np.abs(x) <= 3.0) & (y < -55.0) & (y > -66.0)
    period, phase = rng.uniform(26.0, 30.0), rng.uniform(0.0, 30.0)
    disc = ((z - phase) % period) < 6.0

    p.paint(region, psoas | erector, "muscle")
    p.paint(region, body <= 1.0, "cortical_bone")
    p.paint(region, (body <= 0.78) & ~disc, "cancellous_bone")
    p.paint(region, (body <= 1.0) & disc, "disc")
    p.paint(region, arch | spinous, "cortical_bone")
    p.paint(region, canal <= 6.0**2, "csf")
    p.cavity &= ~(psoas | erector | (body <= 1.15) | (canal <= 11.5**2) | spinous)


def _paint_lungs(p: _Painter) -> None:
    """Lung bases above the two domes of the diaphragm, at the top of the field of view."""
    rng = p.rng
    region = p.full()
    x, y, z = region.x / p.k[0], region.y / p.k[1], region.z / p.k[2]
    # Each hemidiaphragm is a dome over the liver or spleen; it falls off towards the wall and
    # lowest posteriorly, so the lungs show as posterolateral crescents (costophrenic recesses).
    peak = rng.uniform(76.0, 86.0)
    dome = peak - 34.0 * ((np.abs(x) - 36.0) / 45.0) ** 2 - 40.0 * ((y + 5.0) / 55.0) ** 2
    p.paint(region, z > dome, "lung", in_cavity=True)


def _paint_bowel_tube(
    p: _Painter, waypoints: Sequence[np.ndarray], radius: float, content: str
) -> None:
    """Paint one bowel segment: a wall and a fluid, air or stool-and-air lumen."""
    rng = p.rng
    r = radius * p.k[:2].mean() * rng.uniform(0.85, 1.15)
    ctrl = _wiggle(rng, np.array(waypoints), 15.0, 3.0)
    region, field, _ = p.tube(ctrl, [r] * len(ctrl), noise_mm=1.0)
    if region is None:
        return
    wall = rng.uniform(2.0, 3.0)
    p.paint(region, field <= 0.0, "bowel_wall", in_cavity=True)
    lumen = field <= -wall
    if content == "stool":
        # Faeces are mottled gas and solid matter.
        gas = _smooth_noise(rng, region, 6.0) > rng.uniform(-0.5, 0.5)
        p.paint(region, lumen & gas, "bowel_air", in_cavity=True)
        p.paint(region, lumen & ~gas, "stool", in_cavity=True)
    else:
        p.paint(region, lumen, content, in_cavity=True)


def _paint_bowel(p: _Painter) -> None:
    """Colon frame, duodenal C-loop and a few small-bowel loops (all unlabelled)."""
    rng = p.rng
    colon = [
        p.at(-52, 2, -80, 3),
        p.at(-54, 6, -45, 4),
        p.at(-48, 20, -28, 4),
        p.at(-12, 42, -26, 5),
        p.at(28, 40, -18, 5),
        p.at(54, 18, -6, 4),
        p.at(56, -4, -30, 4),
        p.at(56, -2, -80, 3),
    ]
    _paint_bowel_tube(p, colon, 12.0, "stool")
    duodenum = [
        p.at(-14, 34, 6, 2),
        p.at(-30, 24, 2, 2),
        p.at(-38, 8, -10, 2),
        p.at(-36, 8, -34, 2),
        p.at(-12, 12, -44, 2),
        p.at(14, 12, -40, 2),
        p.at(22, 16, -28, 2),
    ]
    _paint_bowel_tube(p, duodenum, 7.5, str(rng.choice(["bowel_fluid", "bowel_air"])))
    lo, hi = np.array([-30.0, 0.0, -70.0]), np.array([40.0, 42.0, -34.0])
    for _ in range(rng.integers(2, 5)):
        # Small bowel: a short random walk through the lower anterior abdomen.
        pts = [rng.uniform(lo, hi)]
        for _ in range(rng.integers(3, 6)):
            pts.append(np.clip(pts[-1] + rng.normal(0.0, 16.0, 3), lo, hi))
        pts = [q * p.k for q in pts]
        _paint_bowel_tube(p, pts, 8.0, "bowel_fluid")


class _Liver(NamedTuple):
    """The two lobes of the liver (centre, semi-axes, rotation)."""

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    left_centre: np.ndarray
    left_semi: np.ndarray


def _paint_liver(p: _Painter) -> _Liver:
    """Liver: right lobe plus anterior left lobe, perturbed, clipped to the cavity."""
    rng = p.rng
    scale = rng.uniform(0.88, 1.12)
    centre = p.at(-32, -2, 30, 3)
    semi = p.size(38, 48, 46, 0.05) * scale
    rot = _rotation(rng.uniform(-10, 10), rng.uniform(-8, 8), rng.uniform(-5, 5))
    left_centre = p.at(-2, 24, 42, 3)
    left_semi = p.size(30, 18, 22, 0.05) * scale
    left_rot = _rotation(rng.uniform(-15, 15))
    reach = np.maximum(semi.max(), left_semi.max()) * 1.3
    lo = np.minimum(centre, left_centre) - reach
    hi = np.maximum(centre, left_centre) + reach
    region = p.region(lo, hi)
    # A smooth union bridges the lobes, as the real liver has no gap between them.
    field = _smooth_min(
        _ellipsoid_field(region, centre, semi, rot),
        _ellipsoid_field(region, left_centre, left_semi, left_rot),
        0.12,
    )
    field = field + 0.07 * _smooth_noise(rng, region, 30.0)
    # The liver does not reach across the aorta and crura posteriorly (it wraps the IVC only).
    x, y = region.x / p.k[0], region.y / p.k[1]
    crus = ((x - 6.0) / 20.0) ** 2 + ((y + 14.0) / 16.0) ** 2 <= 1.0
    p.paint(region, (field <= 0.0) & ~crus, "liver", in_cavity=True)
    return _Liver(centre, semi, rot, left_centre, left_semi)


def _paint_spleen(p: _Painter) -> np.ndarray:
    """Spleen along the left posterolateral wall; returns its hilum."""
    rng = p.rng
    centre = p.at(48, -28, 28, 3)
    semi = p.size(12, 28, 25, 0.18)
    # Long axis along the wall (posteromedial to anterolateral), hilum facing anteromedially.
    rot = _rotation(rng.uniform(-50, -38), rng.uniform(-10, 10), rng.uniform(-15, 15))
    region, field = p.ellipsoid(centre, semi, rot, noise=0.08, feature_mm=25.0)
    p.paint(region, field <= 0.0, "spleen", in_cavity=True)
    return centre - 0.8 * semi[0] * rot[:, 0]


def _paint_kidneys(p: _Painter) -> dict[str, np.ndarray]:
    """Kidneys with bright cortex, medulla and sinus fat; returns the two hila."""
    rng = p.rng
    hila = {}
    for side, sign, z in (("left", 1.0, -8.0), ("right", -1.0, -16.0)):
        centre = p.at(sign * 40.0, -36.0, z, 3)
        semi = p.size(12, 16, 30, 0.12)
        # Hilum faces anteromedially, upper pole tilts medially.
        rot = _rotation(-sign * rng.uniform(30, 45), -sign * rng.uniform(8, 16))
        region, field = p.ellipsoid(centre, semi, rot, noise=0.03, feature_mm=20.0)
        if region is None:
            continue
        depth = field * semi.min()  # approximate mm inside the surface
        p.paint(region, field <= 0.0, "kidney_cortex")
        p.paint(region, depth <= -rng.uniform(4.0, 6.0), "kidney_medulla")
        # Local x points posterolaterally on the left, anteromedially on the right.
        medial = -sign * rot[:, 0]
        sinus_c = centre + 0.55 * semi[0] * medial
        sinus = _ellipsoid_field(region, sinus_c, semi * [0.45, 0.4, 0.45], rot) <= 0.0
        p.paint(region, sinus & (field <= 0.0), "visceral_fat")
        hila[side] = centre + 1.0 * semi[0] * medial
    return hila


def _paint_stomach(p: _Painter) -> None:
    """J-shaped stomach: wall, then gas anteriorly (non-dependent) above fluid."""
    rng = p.rng
    s = rng.uniform(0.85, 1.15)
    way = [
        (p.at(28, 4, 64, 3), 14.0),
        (p.at(34, 12, 48, 3), 18.0),
        (p.at(32, 26, 26, 3), 16.0),
        (p.at(16, 40, 2, 3), 12.0),
        (p.at(-4, 40, 2, 2), 8.0),
        (p.at(-14, 35, 6, 2), 7.0),
    ]
    ctrl = np.array([w for w, _ in way])
    radii = np.array([r for _, r in way]) * s * p.k[:2].mean()
    region, field, _ = p.tube(ctrl, radii, noise_mm=1.5, feature_mm=12.0)
    wall = rng.uniform(3.0, 5.0)
    p.paint(region, field <= 0.0, "stomach_wall", in_cavity=True)
    lumen = field <= -wall
    # Supine patient: gas rises anteriorly (+y); the level is random, from all gas to all fluid.
    level = rng.uniform(-25.0, 45.0) * p.k[1]
    p.paint(region, lumen & (region.y < level), "stomach_fluid", in_cavity=True)
    p.paint(region, lumen & (region.y >= level), "stomach_air", in_cavity=True)


class _Pancreas(NamedTuple):
    """Centreline points (mm) and radii (mm) of the pancreas, by part name."""

    centre: dict[str, np.ndarray]
    radius: dict[str, float]


def _paint_pancreas(p: _Painter, spleen_hilum: np.ndarray) -> _Pancreas:
    """Pancreas from head (right, in the duodenal loop) to tail (splenic hilum)."""
    s = p.rng.uniform(0.85, 1.15)
    tail_end = spleen_hilum + np.array([-6.0, 7.0, -8.0]) * p.k
    parts = {
        "uncinate": (p.at(-18, 12, -18, 2), 8.0),
        "head": (p.at(-22, 15, -5, 2), 11.0),
        "neck": (p.at(-5, 27, 2, 2), 7.5),
        "body": (p.at(15, 25, 8, 2), 7.0),
        "tail": (p.at(32, 10, 14, 2), 6.5),
        "tail_end": (tail_end, 5.5),
    }
    ctrl = np.array([c for c, _ in parts.values()])
    radii = np.array([r for _, r in parts.values()]) * s * p.k[:2].mean()
    region, field, _ = p.tube(ctrl, radii, noise_mm=1.2, feature_mm=8.0)
    p.paint(region, field <= 0.0, "pancreas", in_cavity=True)
    return _Pancreas(
        {name: c for name, (c, _) in parts.items()},
        {name: float(r) for name, r in zip(parts, radii, strict=True)},
    )


def _paint_gallbladder(p: _Painter, liver: _Liver) -> None:
    """Gallbladder in its fossa at the inferior-anterior surface of the right lobe."""
    rng = p.rng
    direction = (rng.uniform(-0.3, -0.05), 0.7, -0.7)
    surface = _surface_point(liver.centre, liver.semi, liver.rot, direction)
    semi = p.size(10, 10, 19, 0.18)
    centre = surface - 0.3 * semi[0] * np.asarray(direction) / np.linalg.norm(direction)
    # Neck points posterosuperiorly, fundus anteroinferiorly.
    rot = _rotation(rng.uniform(-20, 20), 0.0, rng.uniform(25, 45))
    region, field = p.ellipsoid(centre, semi, rot, noise=0.04, feature_mm=20.0)
    p.paint(region, field <= 0.0, "gallbladder", in_cavity=True)


def _paint_systemic_veins(p: _Painter, liver: _Liver, hila: dict[str, np.ndarray]) -> None:
    """IVC, left renal vein and the (dark, liver-labelled) hepatic veins."""
    rng = p.rng
    r = rng.uniform(7.0, 9.0)
    ivc = p.vessel(
        [p.at(-23, -8, -80), p.at(-23, -7, -20, 1), p.at(-21, -7, 20, 1), p.at(-15, -13, 80)],
        [r, r, r, r],
        "systemic_vein",
    )
    aorta = p.marks["aorta"]
    if "left" in hila:
        # The left renal vein crosses between the aorta and the SMA (nutcracker position).
        z = hila["left"][2]
        front = _at_height(aorta, z) + np.array([0.0, p.marks["r_aorta"] + 3.0, 0.0])
        p.vessel([hila["left"], front, _at_height(ivc, z)], [3.5, 3.5, 4.0], "systemic_vein")
    top = _at_height(ivc, liver.centre[2] + 0.75 * liver.semi[2])
    c, a, lc, la = liver.centre, liver.semi, liver.left_centre, liver.left_semi
    for tip in (
        c + a * [-0.6, 0.05, -0.3],
        c + a * [0.15, 0.55, -0.35],
        lc + la * [0.35, 0.2, -0.1],
    ):
        mid = 0.5 * (top + tip) + rng.normal(0.0, 3.0, 3)
        p.vessel([top, mid, tip], [4.5, 3.0, 1.5], "hepatic_vein", over=(_T["liver"],))


def _paint_portal(
    p: _Painter, liver: _Liver, pancreas: _Pancreas, spleen_hilum: np.ndarray
) -> None:
    """Portal venous system: SMV, splenic vein, portal trunk and intrahepatic branches."""
    rng = p.rng
    r_trunk = rng.uniform(5.0, 6.5)
    r_smv = rng.uniform(3.5, 4.5)
    r_sv = rng.uniform(3.0, 4.0)
    back = np.array([0.0, 1.0, 0.0])
    # The confluence lies behind the pancreatic neck.
    confluence = pancreas.centre["neck"] - back * (pancreas.radius["neck"] + r_trunk + 1.0)
    porta = liver.centre + liver.semi * [0.22, 0.2, -0.12] + rng.normal(0.0, 2.0, 3)
    p.marks["porta"] = porta
    p.vessel(
        [p.at(-12, 24, -80), p.at(-10, 22, -45, 2), p.at(-8, 16, -20, 2), confluence],
        [r_smv, r_smv, r_smv, r_smv],
        "portal_vein",
    )
    # The splenic vein runs along the posterior surface of the pancreas.
    sv = [pancreas.centre[n] - back * (pancreas.radius[n] + 0.3 * r_sv) for n in ("tail", "body")]
    p.vessel([spleen_hilum, *sv, confluence], [r_sv] * 4, "portal_vein", wiggle_mm=1.5)
    mid = 0.5 * (confluence + porta) + rng.normal(0.0, 2.0, 3)
    p.vessel([confluence, mid, porta], [r_trunk] * 3, "portal_vein", wiggle_mm=1.0)
    c, a, lc, la = liver.centre, liver.semi, liver.left_centre, liver.left_semi
    right = c + a * [-0.3, -0.08, 0.12] + rng.normal(0.0, 2.0, 3)
    left = porta + (lc - porta) * 0.45 + rng.normal(0.0, 2.0, 3)
    r_lr = rng.uniform(3.5, 4.5)
    r_seg = rng.uniform(2.5, 3.0)
    p.vessel([porta, right], [r_lr, r_lr], "portal_vein")
    p.vessel([porta, left], [r_lr, r_lr], "portal_vein")
    for tip in (a * [-0.6, 0.35, 0.3], a * [-0.55, -0.5, 0.25], a * [-0.5, 0.05, -0.45]):
        p.vessel([right, c + tip], [r_seg, 2.0], "portal_vein", wiggle_mm=3.0)
    for tip in (la * [0.55, 0.1, 0.2], la * [0.05, 0.55, -0.1], la * [-0.3, 0.3, 0.45]):
        p.vessel([left, lc + tip], [r_seg, 2.0], "portal_vein", wiggle_mm=3.0)


def _place_aorta(p: _Painter) -> np.ndarray:
    """Centreline of the aorta, anterior-left of the spine (painted last, with the arteries)."""
    rng = p.rng
    r = rng.uniform(6.0, 7.5)
    p.marks["r_aorta"] = r
    way = [p.at(9, -11, -80, 1), p.at(9, -10, -30, 1.5), p.at(9, -10, 10, 1.5), p.at(8, -14, 80)]
    ctrl = _wiggle(rng, np.array(way), 25.0, 1.5)
    pts, _ = _curve(ctrl, [r] * len(ctrl), 2.0)
    p.marks["aorta"] = pts
    p.marks["aorta_ctrl"] = ctrl
    return pts


def _paint_arteries(
    p: _Painter, pancreas: _Pancreas, spleen_hilum: np.ndarray, hila: dict[str, np.ndarray]
) -> None:
    """Aorta, celiac trunk (splenic, hepatic), SMA with jejunal branches, renal arteries."""
    rng = p.rng
    aorta, r_a = p.marks["aorta"], p.marks["r_aorta"]
    ctrl = p.marks["aorta_ctrl"]
    p.vessel(ctrl, np.linspace(0.9 * r_a, r_a, len(ctrl)), "artery", wiggle_mm=0.0)
    fwd = np.array([0.0, 1.0, 0.0])

    # Celiac trunk: short, anterior, then splits.
    z_celiac = rng.uniform(18.0, 28.0) * p.k[2]
    origin = _at_height(aorta, z_celiac)
    split = origin + fwd * r_a + np.array([-1.0, 10.0, 4.0]) * p.k + rng.normal(0.0, 1.5, 3)
    p.vessel([origin, split], [3.5, 3.0], "artery", wiggle_mm=0.0)
    porta = p.marks["porta"]
    hepatic = porta + np.array([5.0, 7.0, 1.0]) * p.k + rng.normal(0.0, 1.5, 3)
    r_cha = rng.uniform(2.3, 2.8)
    via = 0.5 * (split + hepatic) + np.array([0.0, 4.0, -6.0]) * p.k
    p.vessel([split, via, hepatic], [r_cha] * 3, "artery", wiggle_mm=2.0, every_mm=10.0)
    for d in ([-18.0, -4.0, 10.0], [12.0, 10.0, 10.0]):
        p.vessel([hepatic, hepatic + np.array(d) * p.k], [2.2, 1.8], "artery", wiggle_mm=2.0)
    # Splenic artery: tortuous, along the upper border of the pancreas.
    r_spl = rng.uniform(2.4, 3.2)
    way = [split] + [
        pancreas.centre[n] + np.array([0.0, -2.0, pancreas.radius[n] + 4.0])
        for n in ("body", "tail")
    ]
    way.append(spleen_hilum + np.array([0.0, 2.0, 4.0]) * p.k)
    p.vessel(way, [r_spl] * 4, "artery", wiggle_mm=4.0, every_mm=9.0)

    # SMA: leaves the aorta below the celiac trunk and runs down behind the pancreatic neck.
    r_sma = rng.uniform(2.5, 3.5)
    o = _at_height(aorta, z_celiac - rng.uniform(10.0, 16.0) * p.k[2])
    front = o + fwd * (r_a + 7.0 + r_sma)
    sma = p.vessel(
        [o, front - [0.0, 0.0, 8.0], p.at(7, 12, -25, 2), p.at(4, 18, -50, 2), p.at(2, 22, -80)],
        [r_sma] * 5,
        "artery",
    )
    for z in (-28.0, -48.0):
        start = _at_height(sma, z * p.k[2])
        tip = start + np.array([rng.uniform(25, 40), 10.0, -15.0]) * p.k
        p.vessel([start, tip], [2.2, 1.8], "artery", wiggle_mm=3.0)
    # Renal arteries; the right one passes behind the IVC, in front of the right psoas.
    for side, hilum in hila.items():
        start = _at_height(aorta, hilum[2] + rng.uniform(0.0, 8.0))
        if side == "right":
            bend = np.array([-14.0, -19.0, 0.0]) * p.k
        else:
            bend = 0.5 * (start + hilum) + np.array([0.0, -2.0, 0.0]) * p.k
        bend[2] = 0.5 * (start[2] + hilum[2])
        p.vessel([start, bend, hilum], [2.6, 2.6, 2.4], "artery", every_mm=30.0)


def _paint_tissues(p: _Painter) -> None:
    """Paint one random abdomen into `p.tissue`, lowest label priority first."""
    _paint_body(p)
    _paint_spine(p)
    _paint_lungs(p)
    _paint_ribs(p)
    _place_aorta(p)
    _paint_bowel(p)
    liver = _paint_liver(p)
    spleen_hilum = _paint_spleen(p)
    hila = _paint_kidneys(p)
    _paint_stomach(p)
    pancreas = _paint_pancreas(p, spleen_hilum)
    _paint_gallbladder(p, liver)
    _paint_systemic_veins(p, liver, hila)
    _paint_portal(p, liver, pancreas, spleen_hilum)
    _paint_arteries(p, pancreas, spleen_hilum, hila)
