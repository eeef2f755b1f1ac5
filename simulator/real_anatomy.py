"""Real anatomy as the simulated head: a measured EPI volume or the MNI152 template.

The analytic phantom (:mod:`simulator.phantom`) sits wholly inside the field of view;
real EPI cuts the brain at its top or bottom slice. A :class:`RealAnatomy` is a head
given as a voxel image (the *base*) placed in the scanner's RAS+ frame, and the acquired
grid is a slab *inside* the base's slices, so that the brain is cut by the acquired field
of view while the anatomy that motion brings into it is real. It has the interface of
:class:`~simulator.phantom.BrainPhantom` that :mod:`simulator.bold` and the truth writer
use (``sample``, ``intensity``, ``activation``, ``activation_mask``, ``brain_mask``,
``activation_center_ras``), so the BOLD, drift, noise, spike and motion model is the
phantom mode's, unchanged.

Bases (``simulator.anatomy``):

``epi_image``
    A measured single EPI volume, ``simulator.base_image`` (a NIfTI, first volume if 4D,
    or a DICOM file holding a whole volume: a Siemens mosaic or an enhanced multi-frame
    image), e.g. heudiconv's ``axasc35.dcm`` (Siemens TrioTim BOLD mosaic, 64 x 64 x 35,
    3.25 x 3.25 x 3.6 mm, the brain cut at both ends). Its voxels are taken as they are,
    in the closest axial orientation (any obliquity is dropped: the head is simply
    placed as the array lies). The acquired grid is the base's matrix and voxel size,
    less :data:`EPI_MARGIN_SLICES` slices at each end (axasc35: 64 x 64 x 31), centred
    on the scanner origin; unmoved, volume 0 equals the base's voxels exactly (the
    spline interpolates). Whatever the image holds outside the head (its own noise, N/2
    ghosts: about 40 on average in axasc35) is set to 0, so that the only noise is the
    simulator's, of known sigma: the head is the largest connected region above a
    quarter of the Otsu threshold, holes filled, kept as measured, with a Gaussian tail
    (one voxel) outside it.
    The brain mask is an intensity threshold (Otsu, opened twice, largest component,
    holes filled); the activated region is a ball of :data:`ACTIVATION_RADIUS_MM` whose
    centre lies :data:`EPI_ACTIVATION_DEPTH_MM` inside the brain mask along a fixed
    left, superior ray from the mask's centroid (left hemisphere cortex and white
    matter), weighted by the brain mask.
``mni152``
    nilearn's MNI152 2009 template at 2 mm (brain-extracted, 99 x 117 x 95), given EPI
    contrast from its own tissue probability maps: ``900 gm + 650 wm + 1300 csf`` (the
    phantom's grey matter, white matter and CSF intensities; CSF is the brain mask, with
    a 2 mm edge, less grey and white matter), 0 outside the brain (as a brain-extracted
    image: no scalp or skull). The acquired grid is ``simulator.shape`` and
    ``simulator.voxel_size_mm`` (default 64 x 64 x 36 at 3 mm: 192 x 192 x 108 mm) with
    its centre at MNI :data:`MNI_AT_ISOCENTRE`, which cuts off the vertex (about 24 mm)
    and the inferior cerebellum. The brain mask is the template's; the activated region
    a ball at MNI :data:`MNI_ACTIVATION` (left superior temporal / auditory cortex)
    weighted by the parenchyma (grey + white matter probability). Needs nilearn (a test
    dependency of rtsc; the template ships with it, nothing is downloaded).

Resampling. The moved head at a point is the base at the point's reference-frame
position (:func:`~simulator.motion.moved_coordinates`), interpolated by cubic B-splines
(``scipy.ndimage.map_coordinates``, order 3, spline coefficients computed once, mirror
boundary). A base finer than the acquisition (MNI, 2 mm for 3 mm) is first smoothed by a
Gaussian of the variance that a box over the acquisition voxel adds to the base's own,
``(acq**2 - base**2) / 12`` per axis, so that point samples are voxel averages; the
analytic phantom's ``simulator.psf_samples`` sub-sampling is not used (it would blur a
base already at the acquired resolution twice). Spline undershoot below 0 at the edges
of the head is clipped (a magnitude image). The activation weight is interpolated
linearly (it stays in [0, 1]).

Coverage (what a scanner would see outside the base):

* in-plane (x, y), beyond the base's matrix: air, 0 (the base is padded with zeros);
* through-plane (z), beyond the base's first or last slice: unknown anatomy, never
  invented. The acquired slab lies inside the base's slices (``epi_image``:
  :data:`EPI_MARGIN_SLICES` each end, 7.2 mm for axasc35; ``mni152``: the template's 190
  mm against a 108 mm slab), so motion brings real anatomy into the acquired slab, whose
  own first and last slices cut the brain as a scanner's do. A sample beyond the base's
  slices is air only outside the head's in-plane footprint (where the base is air on
  every slice, :data:`FOOTPRINT_DILATION_MM` around the head; a rotated grid's corners
  reach there); inside it, :func:`check_coverage` refuses the run's motion at plan time
  (a ``ConfigError`` naming ``simulator.max_trans_mm`` / ``max_rot_deg``) and ``sample``
  raises :class:`CoverageError`.

The truth stays the phantom mode's: ``motion.tsv`` holds exactly the parameters applied
(rotations about the acquired grid's centre), ``activation.nii.gz`` and
``brain_mask.nii.gz`` are the weight and mask on the acquired (reference) grid.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.special import expit

from .epi_image import epi_brain_mask, head_weight, read_epi_volume, to_grid_order
from .motion import moved_coordinates
from .phantom import INTENSITY, Grid

__all__ = [
    "ANATOMIES",
    "ACTIVATION_RADIUS_MM",
    "EPI_MARGIN_SLICES",
    "MNI_AT_ISOCENTRE",
    "MNI_ACTIVATION",
    "RealAnatomy",
    "CoverageError",
    "epi_anatomy",
    "mni152_anatomy",
    "load_anatomy",
    "check_coverage",
]

#: Real-anatomy values of ``simulator.anatomy``.
ANATOMIES = ("epi_image", "mni152")
#: Radius (mm) and logistic edge (mm) of the activated ball, as the phantom's.
ACTIVATION_RADIUS_MM = 12.0
ACTIVATION_EDGE_MM = 1.0
#: Base slices kept beyond each end of the acquired slab of an ``epi_image``.
EPI_MARGIN_SLICES = 2
#: Depth of the EPI activation centre inside the brain mask, mm.
EPI_ACTIVATION_DEPTH_MM = 10.0
#: Direction (RAS) of the ray from the brain mask's centroid to the EPI activation.
_EPI_ACTIVATION_RAY = np.array([-0.8, -0.2, 0.55])
#: MNI coordinate of the scanner origin (the acquired grid's centre), mm.
MNI_AT_ISOCENTRE = (0.0, -17.0, 6.0)
#: Centre of the MNI activated ball: left superior temporal gyrus (auditory cortex), mm.
MNI_ACTIVATION = (-50.0, -22.0, 6.0)
#: Dilation of the head's in-plane footprint beyond which the base is air on every
#: slice (and beyond its slices), mm.
FOOTPRINT_DILATION_MM = 10.0
# Zero padding of the base in-plane, voxels (more than the cubic spline's support).
_PAD = 4
# Tolerance on the slice index of a sample at the base's first or last slice.
_SLAB_TOL = 1e-6


class CoverageError(ValueError):
    """A sample falls beyond the base's slices (anatomy the base does not hold)."""


@dataclass(frozen=True, eq=False)
class RealAnatomy:
    """A head given as a voxel image in the scanner's RAS+ frame.

    Build it with :func:`epi_anatomy`, :func:`mni152_anatomy` or :func:`load_anatomy`.

    Attributes
    ----------
    name : str
        ``"epi_image"`` or ``"mni152"``.
    description : str
        What the base is (file, template), for truth.json.
    image : (nx, ny, nz) float64
        Base intensity, already smoothed to the acquisition voxel (before padding).
    affine : (4, 4) float64
        Base voxel -> scanner RAS+ mm; axial, axes as :class:`~simulator.phantom.Grid`'s
        (i right to left, j anterior to posterior, k inferior to superior).
    parenchyma : (nx, ny, nz) float64 in [0, 1]
        Weight of tissue that activates (brain mask or grey + white matter).
    brain : (nx, ny, nz) bool
        Brain mask on the base grid.
    activation_center_ras : (3,) float64
        Centre of the activated ball, scanner RAS+ mm (reference frame).
    footprint : (nx, ny) bool
        In-plane positions where the base holds head signal on some slice, dilated by
        :data:`FOOTPRINT_DILATION_MM`: outside it, every slice is air, above and below
        the base's slices too.
    """

    name: str
    description: str
    image: np.ndarray
    affine: np.ndarray
    parenchyma: np.ndarray
    brain: np.ndarray
    activation_center_ras: np.ndarray
    footprint: np.ndarray

    def __post_init__(self) -> None:
        pad = ((_PAD, _PAD), (_PAD, _PAD), (0, 0))
        padded = np.pad(np.asarray(self.image, dtype=np.float64), pad)
        # Spline coefficients once: every sample then costs one order-3 evaluation.
        object.__setattr__(self, "_coeffs",
                           ndimage.spline_filter(padded, order=3, mode="mirror"))
        object.__setattr__(self, "_weight",
                           np.pad(np.asarray(self.parenchyma, dtype=np.float64), pad))
        object.__setattr__(self, "_brain_f", np.pad(self.brain.astype(np.float64), pad))
        object.__setattr__(self, "_inv", np.linalg.inv(self.affine))

    # ------------------------------------------------------------------ geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        """Base matrix (nx, ny, nz)."""
        return tuple(int(n) for n in self.image.shape)  # type: ignore[return-value]

    def slice_index(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Continuous base slice index (k) of points, (...) float64."""
        xyz = np.asarray(xyz_ras, dtype=np.float64)
        return xyz @ self._inv[2, :3] + self._inv[2, 3]

    def beyond_slices(self, xyz_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which points lie beyond the base's first or last slice, and which of those
        lie in the head's footprint (where the anatomy is unknown).

        Parameters
        ----------
        xyz_ras : (n, 3) float, RAS+ mm

        Returns
        -------
        beyond, unknown : (n,) bool
        """
        idx = self._inv[:3, :3] @ np.asarray(xyz_ras, dtype=np.float64).T + self._inv[:3, 3:4]
        nz = self.shape[2]
        beyond = (idx[2] < -_SLAB_TOL) | (idx[2] > nz - 1 + _SLAB_TOL)
        unknown = np.zeros_like(beyond)
        if beyond.any():
            ij = np.rint(idx[:2, beyond]).astype(np.int64)
            nx, ny = self.footprint.shape
            ok = (ij[0] >= 0) & (ij[0] < nx) & (ij[1] >= 0) & (ij[1] < ny)
            hit = np.zeros(ij.shape[1], dtype=bool)
            hit[ok] = self.footprint[ij[0, ok], ij[1, ok]]
            unknown[np.flatnonzero(beyond)[hit]] = True
        return beyond, unknown

    def _padded_indices(self, xyz_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        xyz = np.asarray(xyz_ras, dtype=np.float64)
        if xyz.shape[-1:] != (3,):
            raise ValueError(f"xyz_ras must have shape (..., 3), got {xyz.shape}")
        shape = xyz.shape[:-1]
        flat = xyz.reshape(-1, 3)
        beyond, unknown = self.beyond_slices(flat)
        if unknown.any():
            k = self.slice_index(flat[unknown])
            raise CoverageError(
                f"{int(unknown.sum())} points fall beyond the base's slices within the "
                f"head's footprint (slice index {k.min():.2f} to {k.max():.2f}; the base "
                f"has 0 to {self.shape[2] - 1}): the anatomy there is not in the base")
        idx = self._inv[:3, :3] @ flat.T + self._inv[:3, 3:4]
        np.clip(idx[2], 0.0, self.shape[2] - 1.0, out=idx[2])  # air there: zeroed below
        idx[:2] += _PAD
        nx, ny = self.shape[0] + 2 * _PAD, self.shape[1] + 2 * _PAD
        # Beyond the zero padding the mirror boundary would reflect the head back in.
        outside = (idx[0] < 0) | (idx[0] > nx - 1) | (idx[1] < 0) | (idx[1] > ny - 1) | beyond
        return idx, outside, shape

    # ------------------------------------------------------------------ phantom API

    def sample(self, xyz_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intensity and activation weight at head (reference-frame) points.

        Parameters
        ----------
        xyz_ras : (..., 3) array_like, RAS+ mm

        Returns
        -------
        intensity : (...) float64, >= 0
            Cubic-spline interpolation of the base; 0 in-plane beyond it.
        activation : (...) float64 in [0, 1]
            Logistic ball (radius :data:`ACTIVATION_RADIUS_MM`) times the parenchyma
            weight (linear interpolation).

        Raises
        ------
        CoverageError
            If a point lies beyond the base's first or last slice.
        """
        idx, outside, shape = self._padded_indices(xyz_ras)
        value = ndimage.map_coordinates(self._coeffs, idx, order=3, prefilter=False,
                                        mode="mirror")
        np.maximum(value, 0.0, out=value)
        value[outside] = 0.0
        weight = ndimage.map_coordinates(self._weight, idx, order=1, mode="nearest")
        weight[outside] = 0.0
        xyz = np.asarray(xyz_ras, dtype=np.float64).reshape(-1, 3)
        r = np.linalg.norm(xyz - self.activation_center_ras, axis=1)
        ball = np.where(r <= ACTIVATION_RADIUS_MM + 8.0 * ACTIVATION_EDGE_MM,
                        expit((ACTIVATION_RADIUS_MM - r) / ACTIVATION_EDGE_MM), 0.0)
        return value.reshape(shape), np.clip(ball * weight, 0.0, 1.0).reshape(shape)

    def intensity(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Baseline intensity at points, (...) float64 (see :meth:`sample`)."""
        return self.sample(xyz_ras)[0]

    def activation(self, xyz_ras: np.ndarray) -> np.ndarray:
        """Activation weight in [0, 1] at points, (...) float64 (see :meth:`sample`)."""
        return self.sample(xyz_ras)[1]

    def activation_mask(self, xyz_ras: np.ndarray) -> np.ndarray:
        """``activation(xyz) > 0.5``, (...) bool."""
        return self.activation(xyz_ras) > 0.5

    def brain_mask(self, xyz_ras: np.ndarray) -> np.ndarray:
        """The base's brain mask at points (linear interpolation > 0.5), (...) bool."""
        idx, outside, shape = self._padded_indices(xyz_ras)
        inside = ndimage.map_coordinates(self._brain_f, idx, order=1, mode="nearest") > 0.5
        inside[outside] = False
        return inside.reshape(shape)

    def truth(self) -> dict:
        """What truth.json records about the base."""
        return {"anatomy": self.name, "base": self.description,
                "base_shape": list(self.shape), "base_affine_ras": self.affine.tolist(),
                "activation_center_ras": [float(v) for v in self.activation_center_ras],
                "activation_radius_mm": ACTIVATION_RADIUS_MM}


# ---------------------------------------------------------------------------- helpers


def _axial_affine(shape: tuple[int, ...], voxel_mm: np.ndarray,
                  centre_ras: np.ndarray) -> np.ndarray:
    """Grid-convention affine (diag(-dx, -dy, dz)) putting voxel (n-1)/2 at ``centre_ras``."""
    aff = np.diag([-voxel_mm[0], -voxel_mm[1], voxel_mm[2], 1.0])
    mid = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    aff[:3, 3] = np.asarray(centre_ras, dtype=np.float64) - aff[:3, :3] @ mid
    return aff


def _footprint(head: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """In-plane positions holding head on some slice, dilated by FOOTPRINT_DILATION_MM."""
    column = head.any(axis=2)
    distance = ndimage.distance_transform_edt(~column, sampling=voxel_mm[:2])
    return distance <= FOOTPRINT_DILATION_MM


def _prefilter_sigma(base_mm: np.ndarray, acquired_mm: np.ndarray) -> np.ndarray:
    """Gaussian sigma (base voxels) turning the base into acquisition-voxel averages."""
    var = np.maximum(np.asarray(acquired_mm) ** 2 - np.asarray(base_mm) ** 2, 0.0) / 12.0
    return np.sqrt(var) / np.asarray(base_mm)


# ---------------------------------------------------------------------------- bases


def epi_anatomy(path: str | Path) -> tuple[Grid, RealAnatomy]:
    """A measured EPI volume as the head (see the module docstring).

    Returns
    -------
    grid : Grid
        The acquired grid: the base's matrix and voxel size less
        :data:`EPI_MARGIN_SLICES` slices at each end.
    anatomy : RealAnatomy
    """
    data, voxel = read_epi_volume(path)
    nx, ny, nz = data.shape
    if nz < 2 * EPI_MARGIN_SLICES + 2:
        raise ValueError(f"{path}: {nz} slices; at least {2 * EPI_MARGIN_SLICES + 2} are "
                         f"needed ({EPI_MARGIN_SLICES} each end lie beyond the acquired slab)")
    weight = head_weight(data)
    image = data * weight
    brain = epi_brain_mask(data)
    affine = _axial_affine(data.shape, voxel, np.zeros(3))
    grid = Grid((nx, ny, nz - 2 * EPI_MARGIN_SLICES), tuple(voxel))  # type: ignore[arg-type]
    # Activation: along a fixed ray from the brain's centroid, the farthest point at
    # least EPI_ACTIVATION_DEPTH_MM inside the brain mask within the acquired slab.
    acquired = np.zeros_like(brain)
    acquired[:, :, EPI_MARGIN_SLICES:nz - EPI_MARGIN_SLICES] = True
    depth = ndimage.distance_transform_edt(brain & acquired, sampling=voxel)
    centroid = affine[:3, :3] @ np.argwhere(brain & acquired).mean(axis=0) + affine[:3, 3]
    ray = _EPI_ACTIVATION_RAY / np.linalg.norm(_EPI_ACTIVATION_RAY)
    points = centroid + ray[None, :] * np.arange(0.0, 150.0, 0.25)[:, None]
    ijk = (np.linalg.inv(affine)[:3, :3] @ points.T + np.linalg.inv(affine)[:3, 3:4])
    along = ndimage.map_coordinates(depth, ijk, order=1, mode="constant", cval=0.0)
    deep = np.flatnonzero(along >= EPI_ACTIVATION_DEPTH_MM)
    if deep.size == 0:
        raise ValueError(f"{path}: no point {EPI_ACTIVATION_DEPTH_MM} mm inside the brain "
                         "mask along the activation ray")
    centre = points[deep[-1]]
    parenchyma = np.clip(ndimage.gaussian_filter(brain.astype(np.float64), 0.5), 0.0, 1.0)
    return grid, RealAnatomy("epi_image", str(path), image, affine, parenchyma, brain, centre,
                             _footprint(weight > 0.01, voxel))


@functools.lru_cache(maxsize=1)
def _mni_tissues() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grey and white matter probabilities and brain mask of nilearn's MNI152 (2 mm), in
    Grid order, the voxel size (mm) and the MNI position of Grid voxel (0, 0, 0).

    Cached: nilearn resamples its 1 mm files on every load (seconds).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a test dependency
        raise ImportError("needs nilearn (pip install nilearn), whose MNI152 template "
                          "ships with it") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [datasets.load_mni152_gm_template(resolution=2),
                  datasets.load_mni152_wm_template(resolution=2),
                  datasets.load_mni152_brain_mask(resolution=2)]
    arrays = []
    for img in images:
        data, voxel = to_grid_order(np.asarray(img.dataobj, dtype=np.float64), img.affine)
        arrays.append(np.clip(data, 0.0, 1.0))
    # Grid voxel (i, j, k) is the canonical template's (nx-1-i, ny-1-j, k).
    canonical = nib.as_closest_canonical(images[0])
    nx, ny, _ = canonical.shape
    first = canonical.affine[:3, :3] @ np.array([nx - 1, ny - 1, 0]) + canonical.affine[:3, 3]
    return arrays[0], arrays[1], arrays[2] > 0.5, voxel, first


@functools.lru_cache(maxsize=4)
def mni152_anatomy(grid: Grid) -> RealAnatomy:
    """nilearn's MNI152 template (2 mm) with EPI contrast, acquired on ``grid`` whose
    centre is MNI :data:`MNI_AT_ISOCENTRE` (see the module docstring).

    Cached per grid (the result is immutable in use: nothing writes its arrays).
    """
    gm, wm, brain, voxel, mni_of_first = _mni_tissues()
    total = gm + wm
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-12), 1.0)
    gm, wm = gm * scale, wm * scale
    # CSF: the brain mask less tissue, its edge softened over 2 mm (one template voxel)
    # so that the spline does not ring on a binary step.
    envelope = np.clip(ndimage.gaussian_filter(brain.astype(np.float64), 1.0), 0.0, 1.0)
    csf = np.clip(envelope - gm - wm, 0.0, 1.0)
    image = INTENSITY["gm"] * gm + INTENSITY["wm"] * wm + INTENSITY["csf"] * csf
    sigma = _prefilter_sigma(voxel, np.asarray(grid.voxel_size_mm))
    if np.any(sigma > 0):
        image = ndimage.gaussian_filter(image, sigma, mode="constant")
    offset = np.asarray(MNI_AT_ISOCENTRE, dtype=np.float64)
    affine = np.diag([-voxel[0], -voxel[1], voxel[2], 1.0])
    affine[:3, 3] = mni_of_first - offset
    centre = np.asarray(MNI_ACTIVATION, dtype=np.float64) - offset
    return RealAnatomy("mni152", "nilearn MNI152 2009 template, 2 mm, tissue maps as EPI "
                       f"contrast; MNI {list(MNI_AT_ISOCENTRE)} at the scanner origin",
                       image, affine, np.clip(gm + wm, 0.0, 1.0), brain, centre,
                       _footprint(image > 1e-3 * image.max(), voxel))


def load_anatomy(anatomy: str, base_image: str | Path | None = None,
                 grid: Grid | None = None) -> tuple[Grid, RealAnatomy]:
    """The acquired grid and head of a real-anatomy run.

    Parameters
    ----------
    anatomy : {"epi_image", "mni152"}
    base_image : path
        The EPI volume (``epi_image`` only).
    grid : Grid
        The acquired grid (``mni152`` only; default 64 x 64 x 36 at 3 mm).
    """
    if anatomy == "epi_image":
        if base_image is None:
            raise ValueError("anatomy epi_image needs a base image path")
        return epi_anatomy(base_image)
    if anatomy == "mni152":
        grid = grid if grid is not None else Grid((64, 64, 36), (3.0, 3.0, 3.0))
        return grid, mni152_anatomy(grid)
    raise ValueError(f"anatomy {anatomy!r}; allowed: {', '.join(ANATOMIES)}")


def check_coverage(anatomy: RealAnatomy, grid: Grid, motion: np.ndarray) -> int:
    """Refuse a run that would sample unknown anatomy beyond the base's slices.

    A rigid motion displaces a grid point by an affine function of its position, so the
    grid's corners bound every voxel's slice displacement ``dk``; only acquired slices
    within ``dk`` of the base's ends can leave it, and those are checked voxel by voxel.

    Parameters
    ----------
    anatomy : RealAnatomy
    grid : Grid
        Acquired grid (rotations about its centre).
    motion : (n, 6) float
        trans (mm), rot (radians) per volume.

    Returns
    -------
    n_air : int
        Samples (voxels x volumes) beyond the base's slices but outside the head's
        footprint, hence air.

    Raises
    ------
    CoverageError
        Naming the first volume that would sample beyond the base's slices within the
        head's footprint.
    """
    motion = np.atleast_2d(np.asarray(motion, dtype=np.float64))
    aff = grid.affine()
    c = grid.center_ras()
    nx, ny, nz = grid.shape
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1)
                        for k in (0, nz - 1)], dtype=np.float64) @ aff[:3, :3].T + aff[:3, 3]
    k0 = anatomy.slice_index(corners)
    dk = max(float(np.abs(anatomy.slice_index(moved_coordinates(corners, p, c)) - k0).max())
             for p in motion)
    # Base slice index of each acquired slice (the acquired grid is axial, like the base).
    centres = aff[:3, :3] @ np.array([[0.0] * nz, [0.0] * nz, np.arange(nz)]) + aff[:3, 3:4]
    k_base = anatomy.slice_index(centres.T)
    risky = np.flatnonzero((k_base - dk < 0.0) | (k_base + dk > anatomy.shape[2] - 1.0))
    if risky.size == 0:
        return 0
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    n_air = 0
    for kk in risky:
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, kk)], axis=1).astype(float)
        xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
        for t, p in enumerate(motion):
            beyond, unknown = anatomy.beyond_slices(moved_coordinates(xyz, p, c))
            if unknown.any():
                raise CoverageError(
                    f"volume {t} would sample {int(unknown.sum())} points of acquired slice "
                    f"{kk} beyond the base's slices (0 to {anatomy.shape[2] - 1}) inside the "
                    f"head ({anatomy.name}): the anatomy there is not in the base; allow "
                    "less motion")
            n_air += int(beyond.sum())
    return n_air
