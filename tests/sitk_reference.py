"""SimpleITK as an independent registration reference: images and transforms in our frames.

SimpleITK works in LPS. An image is placed with ``origin = F o`` and ``direction =
F L / spacing`` from our RAS affine ``[L | o]``, ``F = diag(-1, -1, 1)``. With fixed =
reference and moving = current, the transform it returns maps a reference point to the
current point, i.e. our motion ``M`` in LPS, so ``M = F T F``. Used by
tests/pipeline/motion/test_register_sitk.py and benchmarks/registration.py.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: RAS <-> LPS (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_image(volume: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``volume`` placed in LPS space.

    Parameters
    ----------
    volume : (nx, ny, nz) array, index (i, j, k) -> ITK index (i, j, k)
    affine : (4, 4) float64, voxel -> RAS+ mm (no shear)
    """
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.T))  # numpy (k, j, i) order
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((FLIP[:3, :3] @ affine[:3, 3]).tolist())
    image.SetDirection((FLIP[:3, :3] @ linear / spacing).ravel().tolist())
    return image


def sitk_to_ras(transform: sitk.Euler3DTransform) -> np.ndarray:
    """(4, 4) RAS reference -> current map of a fixed(reference) -> moving(current) transform."""
    rot = np.array(transform.GetMatrix()).reshape(3, 3)
    center = np.array(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = rot
    lps[:3, 3] = center + np.array(transform.GetTranslation()) - rot @ center
    return FLIP @ lps @ FLIP
