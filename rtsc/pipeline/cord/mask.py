"""Where the spinal cord is, for slice-wise motion correction and cord QC: its centre per
slice, the cylindrical registration mask, the automatic cord mask, and masks or
references given as NIfTI images in the acquired grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from rtsc.errors import RtscError
from rtsc.volume import Volume


def find_cord_centres(reference: np.ndarray, voxel_size_mm: tuple[float, float, float],
                      smooth_mm: float = 3.0) -> np.ndarray:
    """In-plane cord centre of each slice (voxels), found automatically.

    On T2*-weighted EPI the canal (cord and CSF) is the brightest structure of an axial
    slice at the scale of a few millimetres: each slice is smoothed with a Gaussian of
    ``smooth_mm`` and its maximum taken; the centres are then fitted by a line along z
    (robustly: twice, dropping slices more than 5 mm off the first fit), so a slice whose
    maximum lies elsewhere does not move the cylinder.

    Parameters
    ----------
    reference : (nx, ny, nz) float array
    voxel_size_mm : voxel size along i, j, k

    Returns
    -------
    (nz, 2) float64, centre (i, j) of each slice, voxels
    """
    sigma = (smooth_mm / voxel_size_mm[0], smooth_mm / voxel_size_mm[1], 0.0)
    smoothed = ndimage.gaussian_filter(np.asarray(reference, dtype=np.float32), sigma)
    nx, ny, nz = smoothed.shape
    flat = smoothed.reshape(nx * ny, nz, order="F")
    best = np.argmax(flat, axis=0)
    peaks = np.stack([best % nx, best // nx], axis=1).astype(np.float64)
    z = np.arange(nz, dtype=np.float64)
    keep = np.ones(nz, dtype=bool)
    centres = peaks
    for _ in range(2):
        if keep.sum() < 2:
            break
        fit = np.polynomial.polynomial.polyfit(z[keep], peaks[keep], 1)
        centres = np.polynomial.polynomial.polyval(z, fit).T
        off_mm = np.hypot((peaks[:, 0] - centres[:, 0]) * voxel_size_mm[0],
                          (peaks[:, 1] - centres[:, 1]) * voxel_size_mm[1])
        keep = off_mm <= 5.0
    return np.asarray(centres, dtype=np.float64)


def mask_centres(mask: np.ndarray) -> np.ndarray:
    """Centre of mass (i, j) of each slice of a cord mask; slices without voxels take
    the nearest slice's. Returns (nz, 2) float64 voxels."""
    nz = mask.shape[2]
    centres = np.full((nz, 2), np.nan)
    ii, jj = np.meshgrid(np.arange(mask.shape[0]), np.arange(mask.shape[1]), indexing="ij")
    counts = mask.sum(axis=(0, 1))
    has = counts > 0
    if not has.any():
        raise RtscError("the cord mask is empty")
    centres[has, 0] = np.tensordot(ii, mask, axes=([0, 1], [0, 1]))[has] / counts[has]
    centres[has, 1] = np.tensordot(jj, mask, axes=([0, 1], [0, 1]))[has] / counts[has]
    good = np.flatnonzero(has)
    nearest = good[np.abs(np.arange(nz)[:, None] - good[None, :]).argmin(axis=1)]
    return centres[nearest]


def cylinder_mask(shape: tuple[int, int, int], centres: np.ndarray, radius_mm: float,
                  voxel_size_mm: tuple[float, float, float]) -> np.ndarray:
    """Voxels within ``radius_mm`` (in-plane) of each slice's centre: (nx, ny, nz) bool."""
    nx, ny, nz = shape
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    di = (ii[:, :, None] - centres[None, None, :, 0]) * voxel_size_mm[0]
    dj = (jj[:, :, None] - centres[None, None, :, 1]) * voxel_size_mm[1]
    return np.asfortranarray(di * di + dj * dj <= radius_mm * radius_mm)


def auto_cord_mask(reference: np.ndarray, voxel_size_mm: tuple[float, float, float],
                   scale: float = 0.55, radius_mm: float = 12.0) -> np.ndarray:
    """An approximate cord mask when none is given.

    Around each slice's cord centre (:func:`find_cord_centres`), the canal (cord and
    CSF, both bright on T2*-weighted EPI) is the connected region above the midpoint of
    the 10th and 95th intensity percentiles within ``radius_mm``; the cord is taken as
    the ellipse of the canal's second moments scaled by ``scale`` (the cord is ~0.58 x
    the canal's width and ~0.62 x its depth). Give ``spinal_cord.mask`` (e.g. from SCT's
    sct_deepseg_sc) for an exact one.

    Returns (nx, ny, nz) bool, Fortran order.
    """
    nx, ny, nz = reference.shape
    centres = find_cord_centres(reference, voxel_size_mm)
    ii, jj = np.meshgrid(np.arange(nx) * voxel_size_mm[0], np.arange(ny) * voxel_size_mm[1],
                         indexing="ij")
    mask = np.zeros(reference.shape, dtype=bool, order="F")
    for k in range(nz):  # per slice (set-up only)
        cx, cy = centres[k, 0] * voxel_size_mm[0], centres[k, 1] * voxel_size_mm[1]
        region = (ii - cx) ** 2 + (jj - cy) ** 2 <= radius_mm ** 2
        values = reference[:, :, k][region]
        if values.size < 10:
            continue
        threshold = 0.5 * (np.percentile(values, 10) + np.percentile(values, 95))
        labels, _ = ndimage.label(region & (reference[:, :, k] > threshold))
        ci = int(np.clip(round(centres[k, 0]), 0, nx - 1))
        cj = int(np.clip(round(centres[k, 1]), 0, ny - 1))
        label = labels[ci, cj]
        if label == 0:
            continue
        canal = labels == label
        x, y = ii[canal], jj[canal]
        mean = np.array([x.mean(), y.mean()])
        cov = np.cov(np.stack([x, y]))
        if canal.sum() < 5 or np.linalg.cond(cov) > 1e6:
            continue
        d = np.stack([ii - mean[0], jj - mean[1]], axis=-1)
        m2 = np.einsum("...a,ab,...b->...", d, np.linalg.inv(cov), d)
        mask[:, :, k] = m2 <= 4.0 * scale ** 2  # uniform ellipse: boundary at 4
    return mask


def load_grid_image(path: str | Path, volume: Volume, what: str) -> np.ndarray:
    """A 3D NIfTI image that must lie in the acquired grid of ``volume``.

    Raises
    ------
    RtscError naming ``what`` (the config key) when unreadable or in another grid.
    """
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds
        raise RtscError(f"{what}: cannot read {path}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != volume.shape or not np.allclose(image.affine, volume.affine, atol=1e-3):
        raise RtscError(f"{what} {path}: grid {data.shape} does not match the acquired grid "
                        f"{volume.shape} (or its affine differs)")
    return np.asfortranarray(data)
