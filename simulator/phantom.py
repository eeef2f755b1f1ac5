"""Analytic head phantom with known ground truth, in continuous RAS+ millimetres.

The phantom is a function of position, not a voxel grid, so a moved head is sampled
exactly at any point (no interpolation). It is built from nested smooth surfaces
(logistic edges, scale :data:`EDGE_MM`), outside in:

* scalp (``SCALP_MM`` thick, fat-suppressed, dim), skull (``SKULL_MM``, dark),
* a CSF layer (``CSF_MM``), the grey-matter cortex (``GM_MM`` thick on average,
  1.5-7.5 mm, folded by a fixed sum of sinusoids) and white matter,
* two lateral ventricles of different size and a midline fissure (CSF),

all multiplied by a smooth low-frequency texture (a few plane waves and Gaussian
blobs drawn from ``seed``) so that rigid registration has features in every direction.

The anatomy itself (head shape, folds, ventricles) is fixed and deliberately
asymmetric: the head is egg-shaped (narrower anteriorly and superiorly), tilted a few
degrees, off-centre, and its left ventricle is larger than the right. No rotation or
reflection maps it onto itself, whatever the seed.

The head spans about 140 x 170 x 120 mm (R-L x A-P x S-I) around
:data:`HEAD_CENTER_RAS`; a grid of at least 150 x 180 x 130 mm covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from rtsc.conventions import rotation_matrix
from simulator._phantom_kernels import sample_points

__all__ = [
    "Grid",
    "BrainPhantom",
    "HEAD_CENTER_RAS",
    "HEAD_SEMI_AXES_MM",
    "INTENSITY",
]

#: Centre of the head ellipsoid, RAS+ mm (slightly off the grid centre on purpose).
HEAD_CENTER_RAS = np.array([1.5, -4.0, 1.0])
#: Semi-axes of the head ellipsoid before shaping, mm (R-L, A-P, S-I).
HEAD_SEMI_AXES_MM = (70.0, 85.0, 60.0)
#: Fixed tilt of the head, degrees, about x (pitch), y (roll), z (yaw).
HEAD_TILT_DEG = (6.0, 2.5, -3.0)
#: Layer thicknesses, mm.
SCALP_MM = 5.0
SKULL_MM = 6.0
CSF_MM = 3.0
GM_MM = 4.5
#: Logistic scale of every tissue edge, mm (the 10-90 % rise takes 4.4 * EDGE_MM).
EDGE_MM = 0.5
#: Baseline EPI intensities (arbitrary units, before texture).
INTENSITY = {
    "background": 0.0,
    "scalp": 350.0,
    "skull": 60.0,
    "csf": 1300.0,
    "gm": 900.0,
    "wm": 650.0,
}
#: Activated region: a ball of this radius (mm), logistic edge of ACTIVATION_EDGE_MM,
#: centred in the grey matter of the left (x < 0) superior, slightly posterior cortex.
ACTIVATION_RADIUS_MM = 12.0
ACTIVATION_EDGE_MM = 1.0
_ACTIVATION_DIRECTION = np.array([-0.55, -0.12, 0.83])

# Cortical folding: depth offsets (mm) as sums of plane waves in head coordinates.
# Each row: wave vector (rad/mm, 3), phase (rad), amplitude (mm).
_PIAL_FOLDS = np.array(
    [
        [0.21, 0.07, -0.11, 0.4, 0.6],
        [-0.06, 0.24, 0.09, 1.9, 0.5],
        [0.10, -0.13, 0.22, 4.1, 0.5],
    ]
)
_WM_FOLDS = np.array(
    [
        [0.26, -0.05, 0.12, 2.7, 1.0],
        [0.04, 0.29, -0.10, 0.9, 1.0],
        [-0.15, 0.11, 0.27, 5.3, 1.0],
    ]
)
# Lateral ventricles in head coordinates: centre (mm, 3), semi-axes (mm, 3).
_VENTRICLES = np.array(
    [
        [-7.5, -3.0, 9.0, 6.5, 24.0, 9.5],  # left (larger)
        [6.0, -1.0, 10.0, 5.0, 20.0, 8.0],  # right
    ]
)
# Midline fissure: half-width (mm) and the head-frame z (mm) where it starts.
_FISSURE_HALF_WIDTH_MM = 1.5
_FISSURE_Z0_MM = 20.0

_CHUNK = 1 << 16
# Points this many edge scales outside the scalp are background (exactly 0).
_OUTSIDE_EDGES = 10.0


@dataclass(frozen=True)
class Grid:
    """A DICOM-native axial voxel grid centred on the RAS+ origin.

    Attributes
    ----------
    shape : tuple of 3 int
        (nx, ny, nz) voxels.
    voxel_size_mm : tuple of 3 float
        (dx, dy, dz) voxel size, mm.

    Notes
    -----
    Axis i runs right to left, j anterior to posterior, k inferior to superior (the
    row, column and slice directions of an axial DICOM acquisition). Voxel
    ``(n - 1) / 2`` (the grid centre) maps to RAS (0, 0, 0).
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"Grid.shape must be 3 positive ints, got {self.shape!r}")
        if len(self.voxel_size_mm) != 3 or any(not float(v) > 0 for v in self.voxel_size_mm):
            raise ValueError(
                f"Grid.voxel_size_mm must be 3 positive floats, got {self.voxel_size_mm!r}"
            )
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "voxel_size_mm", tuple(float(v) for v in self.voxel_size_mm))

    @property
    def n_voxels(self) -> int:
        """Number of voxels, nx * ny * nz."""
        nx, ny, nz = self.shape
        return nx * ny * nz

    def affine(self) -> np.ndarray:
        """Voxel -> RAS+ mm affine.

        Returns
        -------
        affine : (4, 4) float64
            ``diag(-dx, -dy, +dz)`` with the translation that puts voxel
            ``(n - 1) / 2`` at the origin.
        """
        dx, dy, dz = self.voxel_size_mm
        nx, ny, nz = self.shape
        aff = np.diag([-dx, -dy, dz, 1.0])
        aff[:3, 3] = [dx * (nx - 1) / 2.0, dy * (ny - 1) / 2.0, -dz * (nz - 1) / 2.0]
        return aff

    def center_ras(self) -> np.ndarray:
        """RAS+ position of the grid centre, mm, (3,) float64 (the origin by construction)."""
        centre = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine()[:3, :3] @ centre + self.affine()[:3, 3]

    def ras_coordinates(self) -> np.ndarray:
        """RAS+ positions of every voxel centre.

        Returns
        -------
        xyz : (nx * ny * nz, 3) float64, mm
            In C order over (i, j, k): row ``(i * ny + j) * nz + k``, so
            ``values.reshape(grid.shape)`` puts a per-point result on the grid.
        """
        aff = self.affine()
        axes = [
            aff[a, a] * np.arange(n, dtype=np.float64) + aff[a, 3]
            for a, n in enumerate(self.shape)
        ]
        xyz = np.empty(self.shape + (3,), dtype=np.float64)
        xyz[..., 0] = axes[0][:, None, None]
        xyz[..., 1] = axes[1][None, :, None]
        xyz[..., 2] = axes[2][None, None, :]
        return xyz.reshape(-1, 3)


def _waves(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sum of amp * sin(k . u + phase) over the rows of ``table`` (k, phase, amp)."""
    out = np.zeros_like(ux)
    for kx, ky, kz, phase, amp in table:
        out += amp * np.sin(kx * ux + ky * uy + kz * uz + phase)
    return out


@dataclass
class _Tissues:
    """Per-point occupancies (fractions in [0, 1]) of the nested compartments."""

    head: np.ndarray  # inside the scalp surface
    skull: np.ndarray  # inside the inner scalp surface
    csf: np.ndarray  # inside the inner skull surface
    pial: np.ndarray  # inside the pial surface (the brain)
    wm: np.ndarray  # inside the grey/white boundary
    ventricle: np.ndarray
    fissure: np.ndarray  # midline CSF, already restricted to the brain
    texture: np.ndarray  # multiplicative, about 1


class BrainPhantom:
    """Analytic head phantom in RAS+ mm with a known activated region.

    Parameters
    ----------
    seed : int
        Seeds the smooth texture (plane waves and Gaussian blobs). The anatomy (head
        shape, folds, ventricles, activated region) does not depend on it.

    Attributes
    ----------
    activation_center_ras : (3,) float64
        Centre of the activated ball, RAS+ mm (left superior cortex, in grey matter).
    seed : int

    Notes
    -----
    Every method takes positions ``xyz`` of shape (..., 3) (RAS+ mm) and returns
    arrays of shape (...). Evaluation is vectorised NumPy in chunks of 65536 points.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._center = HEAD_CENTER_RAS.astype(np.float64)
        # Columns of _rot are the head axes in RAS: u = _rot.T @ (x - centre).
        self._rot = rotation_matrix(*np.deg2rad(HEAD_TILT_DEG))
        self._semi = np.asarray(HEAD_SEMI_AXES_MM, dtype=np.float64)
        rng = np.random.default_rng([self.seed, 0x5EED])
        # Plane waves: wavelength 45-110 mm, random direction, amplitude 2-3.5 %.
        n_waves = 5
        direction = rng.normal(size=(n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(45.0, 110.0, size=n_waves)
        self._texture_waves = np.column_stack(
            [
                direction * (2.0 * np.pi / wavelength)[:, None],
                rng.uniform(0.0, 2.0 * np.pi, size=n_waves),
                rng.uniform(0.02, 0.035, size=n_waves),
            ]
        )
        # Gaussian blobs inside the brain: sigma 8-18 mm, amplitude +-(5-10) %.
        n_blobs = 7
        centres = rng.uniform(-1.0, 1.0, size=(n_blobs, 3)) * (self._semi - 25.0)
        sign = rng.choice([-1.0, 1.0], size=n_blobs)
        self._blobs = np.column_stack(
            [
                centres,
                rng.uniform(8.0, 18.0, size=n_blobs),
                sign * rng.uniform(0.05, 0.10, size=n_blobs),
            ]
        )
        self.activation_center_ras = self._find_activation_center()
        # The kernel's arguments (simulator._phantom_kernels.sample_points), made once.
        self._layers = np.array([SCALP_MM, SKULL_MM, CSF_MM, GM_MM, EDGE_MM, _OUTSIDE_EDGES])
        self._fissure = np.array([_FISSURE_HALF_WIDTH_MM, _FISSURE_Z0_MM])
        self._intensities = np.array([INTENSITY[k] for k in ("scalp", "skull", "csf", "gm",
                                                              "wm")])
        self._activation_ball = np.array([*self.activation_center_ras, ACTIVATION_RADIUS_MM,
                                          ACTIVATION_EDGE_MM,
                                          ACTIVATION_RADIUS_MM + 8.0 * ACTIVATION_EDGE_MM])

    # ------------------------------------------------------------------ public API

    def intensity(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Baseline (noise-free, unactivated) EPI intensity.

        Parameters
        ----------
        xyz_ras : (..., 3) array_like, RAS+ mm

        Returns
        -------
        intensity : (...) float64
            0 in the background, about 900 in grey matter, 650 in white matter,
            1300 in CSF.
        """
        return self.sample(xyz_ras)[0]

    def activation(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Weight of the activated region.

        Parameters
        ----------
        xyz_ras : (..., 3) array_like, RAS+ mm

        Returns
        -------
        weight : (...) float64 in [0, 1]
            A ball of radius :data:`ACTIVATION_RADIUS_MM` around
            :attr:`activation_center_ras` (logistic edge), times the fraction of brain
            parenchyma (grey + white matter, not CSF); exactly 0 more than
            8 edge widths outside the ball.
        """
        return self.sample(xyz_ras)[1]

    def activation_mask(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Hard-edged activated region: ``activation(xyz) > 0.5``, (...) bool."""
        return self.activation(xyz_ras) > 0.5

    def brain_mask(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Inside the pial surface (brain including ventricles), (...) bool."""
        return self._map(xyz_ras, lambda t: t.pial)[0] > 0.5

    def tissue_fractions(self, xyz_ras: np.ndarray) -> dict[str, np.ndarray]:
        """Partial-volume fractions of grey matter, white matter and brain CSF.

        Parameters
        ----------
        xyz_ras : (..., 3) array_like, RAS+ mm

        Returns
        -------
        fractions : dict
            ``"gm"``, ``"wm"``, ``"csf"`` (CSF layer, ventricles and fissure), each
            (...) float64 in [0, 1].
        """
        gm, wm, csf = self._map(
            xyz_ras, lambda t: self._gm(t), lambda t: self._wm(t), lambda t: self._brain_csf(t)
        )
        return {"gm": gm, "wm": wm, "csf": csf}

    def sample(self, xyz_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intensity and activation weight in one pass (cheaper than two calls).

        Parameters
        ----------
        xyz_ras : (..., 3) array_like, RAS+ mm

        Returns
        -------
        intensity : (...) float64
            As :meth:`intensity`.
        activation : (...) float64
            As :meth:`activation`.
        """
        xyz = np.asarray(xyz_ras, dtype=np.float64)
        if xyz.shape[-1:] != (3,):
            raise ValueError(f"xyz_ras must have shape (..., 3), got {xyz.shape}")
        shape = xyz.shape[:-1]
        flat = np.ascontiguousarray(xyz.reshape(-1, 3))
        intensity = np.empty(flat.shape[0])
        activation = np.empty(flat.shape[0])
        sample_points(flat, self._center, self._rot, self._semi, self._layers, _PIAL_FOLDS,
                      _WM_FOLDS, _VENTRICLES, self._fissure, self._texture_waves,
                      self._blobs, self._intensities, self._activation_ball, intensity,
                      activation)
        return intensity.reshape(shape), activation.reshape(shape)

    def sample_reference(self, xyz_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample` in NumPy, term by term (the kernel's reference in the tests)."""
        return self._map(xyz_ras, self._intensity, None)

    # ------------------------------------------------------------------ internals

    def _map(
        self, xyz_ras: np.ndarray, *funcs: Callable[[_Tissues], np.ndarray] | None
    ) -> tuple[np.ndarray, ...]:
        """Evaluate ``func(tissues)`` for each func over chunks of points.

        ``None`` in ``funcs`` stands for the activation weight (which needs positions).
        Points more than 10 edge scales outside the scalp get exactly 0 from every func
        and are skipped.
        """
        xyz = np.asarray(xyz_ras, dtype=np.float64)
        if xyz.shape[-1:] != (3,):
            raise ValueError(f"xyz_ras must have shape (..., 3), got {xyz.shape}")
        shape = xyz.shape[:-1]
        flat = xyz.reshape(-1, 3)
        n = flat.shape[0]
        outs = [np.zeros(n, dtype=np.float64) for _ in funcs]
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            u = self._head_coords(flat[start:stop, 0], flat[start:stop, 1], flat[start:stop, 2])
            depth = self._depth(*u)
            inside = np.flatnonzero(depth > -_OUTSIDE_EDGES * EDGE_MM)
            if inside.size == 0:
                continue
            u = tuple(c[inside] for c in u)
            tis = self._tissues(*u, depth[inside])
            for out, func in zip(outs, funcs):
                dest = out[start:stop]
                if func is None:
                    dest[inside] = self._activation(tis, flat[start:stop][inside])
                else:
                    dest[inside] = func(tis)
        return tuple(o.reshape(shape) for o in outs)

    def _head_coords(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame coordinates u = R_tilt.T @ (x - centre), mm."""
        dx = x - self._center[0]
        dy = y - self._center[1]
        dz = z - self._center[2]
        r = self._rot
        ux = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
        uy = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
        uz = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        return ux, uy, uz

    def _depth(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        """Approximate depth below the scalp surface, mm (negative outside the head)."""
        a, b, c = self._semi
        # Egg shape: narrower anteriorly (+y) and superiorly (+z).
        ex = ux / (1.0 - 0.07 * np.clip(uy / b, -1.5, 1.5) - 0.08 * np.clip(uz / c, -1.5, 1.5))
        ey = uy / (1.0 - 0.05 * np.clip(uz / c, -1.5, 1.5))
        ez = uz
        # Signed distance to the ellipsoid surface, to first order: (q - 1) / |grad q|.
        gx, gy, gz = ex / (a * a), ey / (b * b), ez / (c * c)
        q = np.sqrt(ex * gx + ey * gy + ez * gz)
        return (1.0 - q) * q / (np.sqrt(gx * gx + gy * gy + gz * gz) + 1e-12)

    def _tissues(
        self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray, depth: np.ndarray
    ) -> _Tissues:
        """Compartment occupancies at head-frame points of known depth."""
        inv_w = 1.0 / EDGE_MM
        head = expit(depth * inv_w)
        skull = expit((depth - SCALP_MM) * inv_w)
        csf = expit((depth - SCALP_MM - SKULL_MM) * inv_w)
        pial_depth = SCALP_MM + SKULL_MM + CSF_MM + _waves(ux, uy, uz, _PIAL_FOLDS)
        pial = expit((depth - pial_depth) * inv_w)
        wm_depth = pial_depth + GM_MM + _waves(ux, uy, uz, _WM_FOLDS)
        wm = expit((depth - wm_depth) * inv_w)
        ventricle = np.zeros_like(ux)
        for cx, cy, cz, sa, sb, sc in _VENTRICLES:
            vx, vy, vz = (ux - cx) / sa, (uy - cy) / sb, (uz - cz) / sc
            qv = np.sqrt(vx * vx + vy * vy + vz * vz)
            # distance scale: the smallest semi-axis
            np.maximum(ventricle, expit((1.0 - qv) * min(sa, sb, sc) * inv_w), out=ventricle)
        fissure = (
            expit((_FISSURE_HALF_WIDTH_MM - np.abs(ux)) * inv_w)
            * expit((uz - _FISSURE_Z0_MM) / 3.0)
            * pial
        )
        texture = 1.0 + _waves(ux, uy, uz, self._texture_waves)
        for bx, by, bz, sigma, amp in self._blobs:
            r2 = (ux - bx) ** 2 + (uy - by) ** 2 + (uz - bz) ** 2
            texture += amp * np.exp(r2 * (-0.5 / (sigma * sigma)))
        return _Tissues(head, skull, csf, pial, wm, ventricle, fissure, texture)

    @staticmethod
    def _intensity(t: _Tissues) -> np.ndarray:
        i = INTENSITY
        val = (
            t.head * i["scalp"]
            + t.skull * (i["skull"] - i["scalp"])
            + t.csf * (i["csf"] - i["skull"])
            + t.pial * (i["gm"] - i["csf"])
            + t.wm * (i["wm"] - i["gm"])
            + t.ventricle * t.wm * (i["csf"] - i["wm"])
        )
        val += t.fissure * (i["csf"] - val)
        return val * t.texture

    @staticmethod
    def _parenchyma(t: _Tissues) -> np.ndarray:
        return np.clip(t.pial - t.ventricle * t.wm, 0.0, 1.0) * (1.0 - t.fissure)

    @staticmethod
    def _gm(t: _Tissues) -> np.ndarray:
        return np.clip(t.pial - t.wm, 0.0, 1.0) * (1.0 - t.fissure)

    @staticmethod
    def _wm(t: _Tissues) -> np.ndarray:
        return np.clip(t.wm - t.ventricle * t.wm, 0.0, 1.0) * (1.0 - t.fissure)

    @staticmethod
    def _brain_csf(t: _Tissues) -> np.ndarray:
        outer = np.clip(t.csf - t.pial, 0.0, 1.0)
        return np.clip(outer + t.ventricle * t.wm * (1.0 - t.fissure) + t.fissure, 0.0, 1.0)

    def _activation(self, t: _Tissues, xyz: np.ndarray) -> np.ndarray:
        r = np.sqrt(((xyz - self.activation_center_ras) ** 2).sum(axis=1))
        near = np.flatnonzero(r <= ACTIVATION_RADIUS_MM + 8.0 * ACTIVATION_EDGE_MM)
        weight = np.zeros(r.shape)
        if near.size:
            ball = expit((ACTIVATION_RADIUS_MM - r[near]) / ACTIVATION_EDGE_MM)
            weight[near] = ball * self._parenchyma(t)[near]
        return weight

    def _find_activation_center(self) -> np.ndarray:
        """Deepest-grey-matter point along a fixed ray from the head centre."""
        direction = _ACTIVATION_DIRECTION / np.linalg.norm(_ACTIVATION_DIRECTION)
        radii = np.arange(0.0, 90.0, 0.1)
        pts = self._center + (self._rot @ direction)[None, :] * radii[:, None]
        (gm,) = self._map(pts, self._gm)
        return pts[int(np.argmax(gm))].copy()
