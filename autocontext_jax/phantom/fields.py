"""Geometric primitives of the phantom: regions, rotations, smooth noise, curves and fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import interpolate


class _Region(NamedTuple):
    """A box of the volume: its slices, open-grid mm coordinates and the requested mm bounds."""

    slices: tuple[slice, slice, slice]
    x: np.ndarray  # (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)
    lo: np.ndarray  # requested bounds; noise lattices hang on these, not on voxels
    hi: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel shape of the box."""
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])


def _rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(yaw) Ry(pitch) Rx(roll), angles in degrees; columns are local axes."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def _rbf_weights(coords: np.ndarray, lo: float, n_nodes: int, step: float) -> np.ndarray:
    """Gaussian interpolation weights (len(coords), n_nodes), rows of unit L2 norm."""
    nodes = lo + step * np.arange(n_nodes)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.7 * step)) ** 2)
    # Unit row norm makes the interpolated white noise exactly unit variance everywhere.
    return (w / np.sqrt((w * w).sum(axis=1, keepdims=True))).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, region: _Region, feature_mm: float) -> np.ndarray:
    """Unit-variance smooth random field over `region` with features of about `feature_mm`."""
    # The lattice hangs on the requested mm bounds, so the same draw gives the same field in mm
    # whatever the voxel spacing.
    counts = [
        int(np.ceil((h - lo) / feature_mm)) + 3 for lo, h in zip(region.lo, region.hi, strict=True)
    ]
    coarse = rng.standard_normal(counts).astype(np.float32)
    axes = (region.x.ravel(), region.y.ravel(), region.z.ravel())
    wx, wy, wz = (
        _rbf_weights(a, lo - feature_mm, n, feature_mm)
        for a, lo, n in zip(axes, region.lo, counts, strict=True)
    )
    field = np.tensordot(wx, coarse, axes=(1, 0))  # (nx, cy, cz)
    field = np.tensordot(field, wy, axes=(1, 1))  # (nx, cz, ny)
    return np.tensordot(field, wz, axes=(1, 1))  # (nx, ny, nz)


def _curve(ctrl: np.ndarray, radii: Sequence[float], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth spline through control points, resampled every ~`step` mm, with radii per point."""
    ctrl = np.asarray(ctrl, dtype=float)
    keep = np.r_[True, np.linalg.norm(np.diff(ctrl, axis=0), axis=1) > 1e-3]
    ctrl, radii = ctrl[keep], np.asarray(radii, dtype=float)[keep]
    s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    ss = np.linspace(0.0, s[-1], n)
    if len(ctrl) < 3:
        pts = ctrl[0] + (ctrl[-1] - ctrl[0]) * (ss / s[-1])[:, None]
    else:
        pts = interpolate.CubicSpline(s, ctrl, axis=0, bc_type="natural")(ss)
    return pts, np.interp(ss, s, radii)


def _wiggle(
    rng: np.random.Generator, waypoints: np.ndarray, every_mm: float, amp_mm: float
) -> np.ndarray:
    """Insert control points every `every_mm` along a polyline and jitter them (tortuosity)."""
    out = [waypoints[0]]
    for a, b in zip(waypoints[:-1], waypoints[1:], strict=True):
        n = max(1, int(round(np.linalg.norm(b - a) / every_mm)))
        for t in np.arange(1, n + 1) / n:
            out.append(a + t * (b - a))
    pts = np.array(out)
    pts[1:-1] += rng.normal(0.0, amp_mm, size=pts[1:-1].shape)
    return pts


def _tube_field(region: _Region, pts: np.ndarray, radii: np.ndarray, margin: float) -> np.ndarray:
    """Signed distance (mm, negative inside) to a tube of varying radius around a polyline."""
    field = np.full(region.shape, np.inf, dtype=np.float32)
    axes = (region.x.ravel(), region.y.ravel(), region.z.ravel())
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:], strict=True):
        # Only the segment's own bounding box can be within reach: keeps this O(tube volume).
        reach = max(ra, rb) + margin
        lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
        idx = [
            (int(np.searchsorted(ax, l0, "left")), int(np.searchsorted(ax, h0, "right")))
            for ax, l0, h0 in zip(axes, lo, hi, strict=True)
        ]
        if any(i1 <= i0 for i0, i1 in idx):
            continue
        (i0, i1), (j0, j1), (k0, k1) = idx
        dx = axes[0][i0:i1, None, None] - a[0]
        dy = axes[1][None, j0:j1, None] - a[1]
        dz = axes[2][None, None, k0:k1] - a[2]
        d = b - a
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
        ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
        f = np.sqrt(ex * ex + ey * ey + ez * ez) - (ra + t * (rb - ra))
        sub = field[i0:i1, j0:j1, k0:k1]
        np.minimum(sub, f, out=sub)
    return field


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two implicit fields (a rounded union), blending over about `k`."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _ellipsoid_field(
    region: _Region, centre: np.ndarray, semi: np.ndarray, rot: np.ndarray
) -> np.ndarray:
    """Normalised radius minus one of a rotated ellipsoid (negative inside)."""
    d = (region.x - centre[0], region.y - centre[1], region.z - centre[2])
    rho2 = 0.0
    for i in range(3):  # project onto each local axis (a column of rot)
        local = d[0] * rot[0, i] + d[1] * rot[1, i] + d[2] * rot[2, i]
        rho2 = rho2 + (local / semi[i]) ** 2
    return np.sqrt(rho2) - 1.0
