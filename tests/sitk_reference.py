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

from rtsc.conventions import rigid_params
from rtsc.pipeline.motion.register import registration_mask

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


def sitk_register_run(volumes: list[np.ndarray], affine: np.ndarray,
                      center_ras: np.ndarray) -> np.ndarray:
    """SimpleITK Euler3D estimates of volumes[1:] (warm-started), (n-1, 6) mm / radians.

    MeanSquares on both images smoothed by 1.2 voxels, rtsc's head mask, about 40,000
    regularly sampled points, linear interpolation, RegularStepGradientDescent
    (learning rate 0.25, minimum step 5e-5, relaxation 0.7), physical-shift scales.
    """
    sigma_mm = (1.2 * np.linalg.norm(affine[:3, :3], axis=0)).tolist()
    fixed = sitk.SmoothingRecursiveGaussian(sitk_image(volumes[0], affine), sigma_mm)
    mask = registration_mask(volumes[0])
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(2)
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(sitk_image(mask.astype(np.uint8), affine))
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(min(1.0, 20000 / int(mask.sum())), seed=1)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=0.25, minStep=5e-5, numberOfIterations=300, relaxationFactor=0.7,
        gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    transform = sitk.Euler3DTransform()
    transform.SetCenter((FLIP[:3, :3] @ center_ras).tolist())
    params = []
    for volume in volumes[1:]:
        moving = sitk.SmoothingRecursiveGaussian(sitk_image(volume, affine), sigma_mm)
        method.SetInitialTransform(sitk.Euler3DTransform(transform), inPlace=False)
        out = method.Execute(fixed, moving).Downcast()
        if isinstance(out, sitk.CompositeTransform):
            out = out.GetNthTransform(0).Downcast()
        transform = sitk.Euler3DTransform(out)
        params.append(rigid_params(sitk_to_ras(transform), center_ras))
    return np.array(params)
