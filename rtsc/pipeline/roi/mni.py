"""Affine registration of an acquired EPI volume to the MNI152 template, for ROIs given
in MNI space (:mod:`rtsc.pipeline.roi.spec`: an atlas label, an MNI mask, an MNI sphere).

Template
--------
The ICBM 2009 symmetric MNI152 T1 template (brain-extracted, 1 mm) that nilearn ships in
its package data (``nilearn/datasets/data``; the files are read with nibabel, nilearn is
not imported and nothing is downloaded), averaged to 2 mm. Its brain mask is T1 > 0.2 of
the maximum (nilearn's ``load_mni152_brain_mask`` rule). Loaded once per process.

Cost
----
The correlation ratio (Roche et al. 1998; FSL FLIRT's inter-modal cost): template points
are put in bins by their T1 intensity, and the cost is the share of the EPI intensities'
variance, sampled at the points (trilinear), that is left within the bins,
``1 - eta**2``. It asks only that EPI intensity be a function of T1 intensity, whatever
the function (CSF is dark in T1, bright in EPI). The bins are fixed on the template
side, so the cost is smooth in the parameters and has an analytic gradient
(:mod:`rtsc.pipeline.roi._mni_kernels`). Points are template voxels inside the brain
mask dilated by :data:`MARGIN_MM`; those that fall outside the acquired field of view do
not count (a slab that cuts the brain is registered on what it holds).

Search
------
The template maps to scanner RAS+ as ``x = B (p - c) + t`` (``p`` MNI mm, ``c`` the
template brain's centroid, ``B`` 3 x 3, ``t`` mm). The head is assumed roughly in the
scanner's anatomical orientation (as DICOM's patient frame gives it: head first or feet
first, supine or prone are all in the affine). Start: ``B = I``, ``t`` the centroid of
the bright voxels of the volume, then a grid of translations (:data:`_SHIFTS_MM`) at the
coarsest level; then L-BFGS on three levels of points and smoothing
(:data:`LEVELS`): rigid plus one scale, then all 12 parameters twice.

Quality
-------
:class:`MniRegistration` holds ``eta2`` (the variance explained, 0 to 1), the share of
the template brain inside the field of view and the singular values of ``B`` (head size
against MNI's). :func:`registration_problems` says what is implausible; the ROI stage
turns that into the ``mni_registration_poor`` alert.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize

from rtsc.errors import RtscError
from rtsc.pipeline.roi._mni_kernels import correlation_ratio

#: Dilation of the template brain mask for the cost's points, mm: the brain's edge and
#: what lies just outside it (CSF, skull: dark in EPI) carry the boundary.
MARGIN_MM = 6.0
#: Levels of the search: (point spacing mm, template and volume smoothing sigma mm,
#: parameters: 7 rigid + isotropic scale, 12 affine).
LEVELS = ((8.0, 4.0, 7), (6.0, 3.0, 12), (4.0, 1.5, 12))
#: Intensity bins of the template T1 inside the brain (the margin is one more bin).
N_BINS = 16
#: Weight of the prior ``||B'B - I||**2`` against the cost (0 to 1): a head 0.7 times
#: MNI's along one axis costs 0.026, the cost's difference between the rival fits of a
#: 75 mm slab.
SHAPE_PRIOR = 0.3
#: Below this explained variance the registration is called poor.
MIN_ETA2 = 0.35
#: Share of the template brain's points inside the field of view below which the 12
#: parameters rest on too little of the brain (a slab of a few slices).
MIN_COVERAGE = 0.45
#: Plausible head size against the template (singular values of B); a slab that cuts
#: the brain leaves its height loosely determined, hence the wide range.
SCALE_RANGE = (0.65, 1.4)
#: Lever arm (mm) that makes one unit of a linear parameter move points about a mm.
_LEVER_MM = 50.0
#: Translations tried from the start (mm, per axis x, y, z) at the coarsest level.
_SHIFTS_MM = (np.arange(-8.0, 8.1, 8.0), np.arange(-16.0, 16.1, 8.0),
              np.arange(-32.0, 32.1, 8.0))

_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


class MniError(RtscError, ValueError):
    """The MNI template cannot be read, or a volume cannot be registered to it."""


@dataclass(frozen=True, eq=False)
class MniTemplate:
    """The MNI152 T1 template at 2 mm.

    Attributes
    ----------
    t1 : (nx, ny, nz) float32, intensity 0-1
    brain : (nx, ny, nz) bool
    affine : (4, 4) float64, voxel -> MNI mm
    centre_mm : (3,) float64, centroid of the brain mask, MNI mm
    """

    t1: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray


def template_path() -> Path:
    """The template file inside the installed nilearn package (not imported).

    Raises
    ------
    MniError
        nilearn is not installed (``pip install nilearn``: ROIs in MNI space need it).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MniError("ROIs in MNI space need the MNI152 template that nilearn ships: "
                       "pip install nilearn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _TEMPLATE_FILE
    if not path.is_file():
        raise MniError(f"the MNI152 template is missing from nilearn's package data: {path}")
    return path


@functools.lru_cache(maxsize=1)
def load_template() -> MniTemplate:
    """The 2 mm template (cached: reading and averaging the 1 mm file takes ~0.5 s)."""
    import nibabel as nib

    image = nib.load(str(template_path()))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data /= float(data.max())
    # 2 x 2 x 2 block means (the 1 mm grid's odd last plane is dropped)
    n = [s // 2 for s in data.shape]
    t1 = data[:2 * n[0], :2 * n[1], :2 * n[2]].reshape(n[0], 2, n[1], 2, n[2], 2)
    t1 = np.ascontiguousarray(t1.mean(axis=(1, 3, 5)), dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64) @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.25)  # a block's centre
    brain = t1 > 0.2
    centre = affine[:3, :3] @ np.argwhere(brain).mean(axis=0) + affine[:3, 3]
    return MniTemplate(t1, brain, affine, centre)


@dataclass(frozen=True)
class _Points:
    """One level's template points: MNI mm relative to the centre, and their bins."""

    xyz: np.ndarray      # (n, 3) float64
    bins: np.ndarray     # (n,) int64
    in_brain: np.ndarray  # (n,) bool


@functools.lru_cache(maxsize=len(LEVELS))
def _level_points(spacing_mm: float, sigma_mm: float) -> _Points:
    template = load_template()
    voxel = 2.0
    smooth = ndimage.gaussian_filter(template.t1, sigma_mm / voxel)
    margin = ndimage.binary_dilation(template.brain, iterations=int(round(MARGIN_MM / voxel)))
    step = max(1, int(round(spacing_mm / voxel)))
    sub = (slice(None, None, step),) * 3
    ijk = np.argwhere(margin[sub]) * step
    xyz = ijk @ template.affine[:3, :3].T + template.affine[:3, 3] - template.centre_mm
    in_brain = template.brain[tuple(ijk.T)]
    values = smooth[tuple(ijk.T)]
    edges = np.quantile(values[in_brain], np.linspace(0.0, 1.0, N_BINS + 1)[1:-1])
    bins = np.where(in_brain, 1 + np.searchsorted(edges, values), 0).astype(np.int64)
    return _Points(np.ascontiguousarray(xyz, dtype=np.float64), bins, in_brain)


@dataclass(frozen=True)
class MniRegistration:
    """Where the template lies in the scanner frame.

    Attributes
    ----------
    scanner_from_mni : (4, 4) float64, MNI mm -> scanner RAS+ mm
    eta2 : float, 0-1, variance of the volume at the template points explained by the
        template's intensity bins (correlation ratio), at the finest level
    coverage : float, 0-1, share of the template brain's points inside the field of view
    scales : (3,) float64, singular values of the linear part (head size / MNI's)
    seconds : float, wall time of the registration, s
    """

    scanner_from_mni: np.ndarray
    eta2: float
    coverage: float
    scales: tuple[float, float, float]
    seconds: float

    @property
    def mni_from_scanner(self) -> np.ndarray:
        """(4, 4) float64, scanner RAS+ mm -> MNI mm."""
        return np.linalg.inv(self.scanner_from_mni)

    def as_message(self) -> dict:
        """The ``mni_registration`` field (docs/messages.md)."""
        return {"eta2": round(self.eta2, 4), "coverage": round(self.coverage, 4),
                "scales": [round(s, 4) for s in self.scales],
                "seconds": round(self.seconds, 3),
                "scanner_from_mni": np.round(self.scanner_from_mni, 4).tolist()}


def registration_problems(reg: MniRegistration, min_eta2: float = MIN_ETA2) -> list[str]:
    """What makes a registration implausible (empty when it looks right)."""
    problems = []
    if reg.eta2 < min_eta2:
        problems.append(f"the template explains {reg.eta2:.2f} of the volume's variance "
                        f"(at least {min_eta2:.2f} expected)")
    if reg.coverage < MIN_COVERAGE:
        problems.append(f"only {100 * reg.coverage:.0f}% of the template brain lies in the "
                        "field of view")
    lo, hi = SCALE_RANGE
    if min(reg.scales) < lo or max(reg.scales) > hi:
        problems.append(f"head size {', '.join(f'{s:.2f}' for s in reg.scales)} x MNI's "
                        f"(plausible {lo}-{hi})")
    return problems


class _Cost:
    """The correlation ratio of one smoothed volume at one level's points, as a function
    of the template -> scanner map, with its gradient."""

    def __init__(self, volume: np.ndarray, voxel_from_scanner: np.ndarray,
                 points: _Points) -> None:
        self.flat = np.asfortranarray(volume, dtype=np.float32).ravel(order="F")
        self.shape = volume.shape
        self.lin = voxel_from_scanner[:3, :3]
        self.off = voxel_from_scanner[:3, 3]
        self.points = points
        n = points.xyz.shape[0]
        self._work = (np.empty(n), np.empty((n, 3)), np.empty(n, dtype=np.bool_),
                      np.empty(N_BINS + 1), np.empty(N_BINS + 1))
        self._grad_g = np.empty((3, 4))

    def __call__(self, b: np.ndarray, t: np.ndarray, gradient: bool
                 ) -> tuple[float, np.ndarray, np.ndarray, int]:
        """Cost, d cost / d B (3, 3), d cost / d t (3,), points inside."""
        g = np.empty((3, 4))
        g[:, :3] = self.lin @ b
        g[:, 3] = self.lin @ t + self.off
        cost, inside = correlation_ratio(self.flat, *self.shape, self.points.xyz,
                                         self.points.bins, N_BINS + 1, g, gradient,
                                         self._grad_g, *self._work)
        return (cost, self.lin.T @ self._grad_g[:, :3], self.lin.T @ self._grad_g[:, 3],
                inside)

    def brain_eta2(self) -> float:
        """Correlation ratio among the brain points alone at the last call: how much of
        the variance inside the brain the template's grey / white / CSF structure
        explains (a uniform phantom's boundary with air does not count here)."""
        values, _, inside, _, _ = self._work
        keep = inside & self.points.in_brain
        if np.count_nonzero(keep) < 2:
            return 0.0
        v = values[keep]
        bins = self.points.bins[keep]
        counts = np.bincount(bins, minlength=N_BINS + 1)
        means = np.bincount(bins, v, minlength=N_BINS + 1) / np.maximum(counts, 1)
        spread = float(np.sum((v - v.mean()) ** 2))
        return 0.0 if spread <= 0.0 else 1.0 - float(np.sum((v - means[bins]) ** 2)) / spread

    def coverage(self) -> float:
        """Share of the brain points inside the volume at the last call."""
        inside = self._work[2]
        brain = self.points.in_brain
        return float(np.count_nonzero(inside & brain)) / max(1, int(np.count_nonzero(brain)))


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _rigid_scale(theta: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """B for 7 parameters: rotation (3, radians x lever) and log scale (x lever) about
    ``b0``."""
    return np.exp(theta[6] / _LEVER_MM) * _rotation(theta[3:6] / _LEVER_MM) @ b0


def _fit(cost: _Cost, b0: np.ndarray, t0: np.ndarray, n_params: int,
         max_iter: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS from (b0, t0) over 7 (rigid + scale) or 12 parameters."""
    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = t0 + theta[:3]
        if n_params == 7:
            return _rigid_scale(theta, b0), t
        return b0 + theta[3:].reshape(3, 3) / _LEVER_MM, t

    def value(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, t = unpack(theta)
        c, d_b, d_t, _ = cost(b, t, True)
        # the head-size prior: a slab that cuts the brain leaves scale and position along
        # the cut traded against each other; B'B = I (a rotation) is preferred
        strain = b.T @ b - np.eye(3)
        c += SHAPE_PRIOR * float(np.sum(strain * strain))
        d_b = d_b + 4.0 * SHAPE_PRIOR * b @ strain
        grad = np.empty(n_params)
        grad[:3] = d_t
        if n_params == 12:
            grad[3:] = d_b.ravel() / _LEVER_MM
        else:  # chain rule through B(theta) by central differences of the 3 x 3 map
            for j in range(3, 7):
                step = np.zeros(7)
                step[j] = 1e-4
                d_bj = (_rigid_scale(theta + step, b0) - _rigid_scale(theta - step, b0)) / 2e-4
                grad[j] = float(np.sum(d_b * d_bj))
        return c, grad

    result = optimize.minimize(value, np.zeros(n_params), jac=True, method="L-BFGS-B",
                               options={"maxiter": max_iter})
    return unpack(result.x)


def _head_centroid(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Scanner RAS+ mm of the centroid of the voxels brighter than a fifth of the 99th
    percentile (the head, for the starting translation)."""
    finite = np.nan_to_num(volume, nan=0.0)
    bright = finite > 0.2 * np.percentile(finite, 99)
    if not bright.any():
        raise MniError("the volume has no bright voxels to place the template on")
    return affine[:3, :3] @ np.argwhere(bright).mean(axis=0) + affine[:3, 3]


def register_to_mni(volume: np.ndarray, affine: np.ndarray) -> MniRegistration:
    """Register the template to a volume (see the module docstring).

    Parameters
    ----------
    volume : (nx, ny, nz) float, the acquired volume (any order)
    affine : (4, 4) float64, its voxel -> scanner RAS+ mm

    Returns
    -------
    MniRegistration

    Raises
    ------
    MniError
        No template, or nothing to register.
    """
    started = time.perf_counter()
    template = load_template()
    affine = np.asarray(affine, dtype=np.float64)
    voxel_from_scanner = np.linalg.inv(affine)
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
    volume = np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0)
    b = np.eye(3)
    t = _head_centroid(volume, affine)
    cost = None
    for level, (spacing, sigma, n_params) in enumerate(LEVELS):
        smoothed = ndimage.gaussian_filter(volume, sigma / voxel_mm)
        cost = _Cost(smoothed, voxel_from_scanner, _level_points(spacing, sigma))
        if level == 0:
            t = _best_shift(cost, b, t)
        b, t = _fit(cost, b, t, n_params)
    assert cost is not None
    final, _, _, _ = cost(b, t, False)
    scanner_from_mni = np.eye(4)
    scanner_from_mni[:3, :3] = b
    scanner_from_mni[:3, 3] = t - b @ template.centre_mm
    scales = np.linalg.svd(b, compute_uv=False)
    return MniRegistration(scanner_from_mni, float(1.0 - final), cost.coverage(),
                           tuple(float(s) for s in scales),  # type: ignore[arg-type]
                           time.perf_counter() - started)


def _best_shift(cost: _Cost, b: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """The translation of the grid :data:`_SHIFTS_MM` around ``t0`` of least cost, among
    those that keep at least :data:`MIN_COVERAGE` of the brain points in view."""
    best, best_t = np.inf, t0
    for dz in _SHIFTS_MM[2]:
        for dy in _SHIFTS_MM[1]:
            for dx in _SHIFTS_MM[0]:
                t = t0 + np.array([dx, dy, dz])
                c, _, _, _ = cost(b, t, False)
                if c < best and cost.coverage() >= MIN_COVERAGE:
                    best, best_t = c, t
    return best_t
