"""A measured EPI volume as the simulator's base: read in Grid order, and masked.

:func:`read_epi_volume` reads one volume (NIfTI, Siemens mosaic, enhanced
multi-frame) in the closest axial orientation; :func:`epi_brain_mask` and
:func:`head_weight` separate the brain and the head from what the image holds outside
them (its own noise, ghosts), both from Otsu's threshold.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

# Flip RAS <-> LPS (DICOM patient coordinates).
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_grid_order(data: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to the closest axial frame, axes in Grid order (i to L, j to P, k to S).

    Returns the array and its voxel sizes (mm); the affine's obliquity is dropped.
    """
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine_ras))
    # Rounded to 1e-6 mm: a header's float noise (3.6000000031) is no part of the grid.
    voxel = np.round(np.linalg.norm(img.affine[:3, :3], axis=0), 6)
    return np.asarray(img.dataobj)[::-1, ::-1, :], voxel


def read_epi_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One EPI volume from a NIfTI or a whole-volume DICOM file.

    Parameters
    ----------
    path : path
        ``.nii``/``.nii.gz`` (the first volume of a 4D image), or a DICOM file holding a
        whole volume (Siemens mosaic, enhanced multi-frame), read by nibabel.

    Returns
    -------
    data : (nx, ny, nz) float64
        In Grid order (i right to left, j anterior to posterior, k inferior to superior).
    voxel_mm : (3,) float64
        Voxel size, mm (slice spacing along k).
    """
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float64)
        if data.ndim == 4:
            data = data[..., 0]
        affine = img.affine
    else:
        import pydicom

        with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental
            warnings.simplefilter("ignore", UserWarning)
            from nibabel.nicom import dicomwrappers

            wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
            data = np.asarray(wrapper.get_data(), dtype=np.float64)
            affine = _FLIP @ wrapper.affine  # nibabel's DICOM affine is LPS
    if data.ndim != 3 or min(data.shape) < 2:
        raise ValueError(f"{path}: expected one 3D volume, got shape {data.shape}")
    out, voxel = to_grid_order(data, affine)
    return out.astype(np.float64), voxel


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    m0 = np.cumsum(hist * centres)
    total, mean_total = w0[-1], m0[-1]
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_total * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(centres[int(np.argmax(between))])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def epi_brain_mask(image: np.ndarray) -> np.ndarray:
    """Brain mask of an EPI volume by intensity: above Otsu's threshold, opened twice
    (detaches eyes and scalp), the largest connected component, holes filled.

    Parameters
    ----------
    image : (nx, ny, nz) float

    Returns
    -------
    mask : (nx, ny, nz) bool
    """
    mask = image > otsu_threshold(image)
    mask = ndimage.binary_opening(mask, iterations=2)
    return ndimage.binary_fill_holes(_largest_component(mask))


def head_weight(image: np.ndarray) -> np.ndarray:
    """Soft head mask in [0, 1]: above a quarter of Otsu's threshold, largest component,
    holes filled, edge smoothed by a Gaussian of one voxel."""
    head = ndimage.binary_fill_holes(_largest_component(image > 0.25 * otsu_threshold(image)))
    # 1 on the head (its voxels are kept as measured), a Gaussian tail outside it.
    return np.maximum(head, ndimage.gaussian_filter(head.astype(np.float64), 1.0))
