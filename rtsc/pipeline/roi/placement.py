"""ROIs of fixed voxels on the acquired grid: mask files read at construction, spheres
in scanner space, and ROIs in MNI space through the series' registration to the
MNI152 template (:mod:`rtsc.pipeline.roi.mni`).

An MNI ROI is placed by mapping each voxel centre of the acquired grid into MNI space
(``mni_from_scanner @ affine``): a sphere keeps the voxels within its radius there; an
atlas label or an MNI mask is resampled as a 0/1 image, linearly, and keeps the voxels
above 0.5 (half a template voxel's worth of the region, so that the ROI neither grows
nor shrinks with the resampling).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import ndimage

from rtsc.pipeline.roi.mni import (
    MniError,
    MniRegistration,
    load_template,
    register_to_mni,
    registration_problems,
)
from rtsc.pipeline.roi.spec import (
    FixedRoi,
    MaskRoi,
    MniRoi,
    RoiError,
    RoiSpec,
    load_mask,
    mask_on_grid,
    read_image,
    sphere_mask,
)
from rtsc.pipeline.stages import Alert

log = logging.getLogger(__name__)


def load_labels(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a label image (an atlas): integer labels, 0 outside every region.

    Returns
    -------
    labels : (nx, ny, nz) int64
    affine : (4, 4) float64, voxel -> MNI mm

    Raises
    ------
    RoiError
        The file cannot be read, is not 3-D, or holds values that are not integers.
    """
    data, affine = read_image(path, "atlas")
    finite = np.nan_to_num(np.asarray(data, dtype=np.float64), nan=0.0)
    if not np.array_equal(finite, np.rint(finite)):
        raise RoiError(f"atlas {path}: holds non-integer values; a label atlas holds one "
                       "integer label per voxel")
    return finite.astype(np.int64), affine


def mni_roi_mask(spec: MniRoi, image: tuple[np.ndarray, np.ndarray] | None,
                 mni_from_scanner: np.ndarray, shape: tuple[int, int, int],
                 affine: np.ndarray) -> np.ndarray:
    """An MNI ROI on the acquired grid.

    Parameters
    ----------
    spec : MniRoi
    image : (data, affine) of the atlas (labels) or the mask (bool), voxel -> MNI mm;
        None for a sphere
    mni_from_scanner : (4, 4) float64, scanner RAS+ mm -> MNI mm
    shape : (nx, ny, nz), the acquired grid
    affine : (4, 4) float64, its voxel -> scanner RAS+ mm

    Returns
    -------
    mask : (nx, ny, nz) bool, Fortran order

    Raises
    ------
    RoiError
        The ROI holds no voxel of the acquired grid (or the label is not in the atlas).
    """
    to_mni = np.asarray(mni_from_scanner, dtype=np.float64) @ np.asarray(affine, np.float64)
    if spec.kind == "sphere":
        assert spec.center_mni_mm is not None and spec.radius_mm is not None
        try:
            return sphere_mask(spec.center_mni_mm, spec.radius_mm, shape, to_mni)
        except RoiError as exc:
            raise RoiError(f"MNI sphere at {list(spec.center_mni_mm)} mm: {exc}") from None
    assert image is not None
    data, image_affine = image
    if spec.kind == "atlas":
        region = data == int(spec.label)  # type: ignore[arg-type]
        if not region.any():
            raise RoiError(f"atlas {spec.path}: no voxel has label {spec.label}")
    else:
        region = np.asarray(data, dtype=bool)
    # acquired voxel -> image voxel
    to_image = np.linalg.inv(image_affine) @ to_mni
    inside = ndimage.affine_transform(region.astype(np.float32), to_image[:3, :3],
                                      to_image[:3, 3], output_shape=tuple(shape), order=1,
                                      mode="constant", cval=0.0) > 0.5
    if not inside.any():
        raise RoiError(f"MNI ROI {spec.path} (label {spec.label}): no voxel of the "
                       "acquired grid lies in it (outside the field of view?)")
    return np.asfortranarray(inside)


class RoiPlacer:
    """Reads the ROIs' files now and places the ROIs on the grid of the first volume.

    Parameters
    ----------
    specs : the ROIs (and their ``within`` regions are taken from them)

    Attributes
    ----------
    registration : MniRegistration or None, once :meth:`start` has run, when an ROI is in
        MNI space

    Raises
    ------
    RoiError
        A file cannot be read, or an MNI ROI is asked for and the template is missing.
    """

    def __init__(self, specs: Iterable[RoiSpec]) -> None:
        self._images: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.needs_mni = False
        for spec in specs:
            for part in (spec, getattr(spec, "within", None)):
                if isinstance(part, MaskRoi):
                    self._read(("mask", part.path), load_mask)
                elif isinstance(part, MniRoi):
                    self.needs_mni = True
                    if part.kind == "atlas":
                        self._read(("atlas", part.path), load_labels)  # type: ignore[arg-type]
                    elif part.kind == "mask":
                        self._read(("mask", part.path), load_mask)  # type: ignore[arg-type]
        if self.needs_mni:
            try:
                load_template()  # now, not on the first volume
            except (MniError, OSError) as exc:
                raise RoiError(str(exc)) from exc
        self.registration: MniRegistration | None = None
        self.shape: tuple[int, int, int] | None = None
        self.affine: np.ndarray | None = None

    def _read(self, key: tuple[str, str], reader: Any) -> None:
        if key not in self._images:
            self._images[key] = reader(key[1])

    def start(self, data: np.ndarray, affine: np.ndarray) -> list[Alert]:
        """Take the grid of the first volume; register it to MNI when an ROI needs it.

        Parameters
        ----------
        data : (nx, ny, nz) float32, the first volume
        affine : (4, 4) float64, voxel -> scanner RAS+ mm

        Returns
        -------
        alerts : the ``mni_registration_poor`` alert when the registration looks wrong
        """
        self.shape = tuple(int(n) for n in data.shape)  # type: ignore[assignment]
        self.affine = np.asarray(affine, dtype=np.float64)
        if not self.needs_mni:
            return []
        try:
            self.registration = register_to_mni(data, self.affine)
        except MniError as exc:
            raise RoiError(f"MNI registration: {exc}") from exc
        reg = self.registration
        log.info("MNI registration in %.2f s: eta2 %.3f, coverage %.2f, scales %s",
                 reg.seconds, reg.eta2, reg.coverage, np.round(reg.scales, 3))
        problems = registration_problems(reg)
        if not problems:
            return []
        return [("warning", "mni_registration_poor",
                 "the MNI ROIs may be misplaced: " + "; ".join(problems))]

    def mask(self, spec: FixedRoi) -> np.ndarray:
        """The ROI's voxels on the grid given to :meth:`start`, (nx, ny, nz) bool."""
        assert self.shape is not None and self.affine is not None
        if isinstance(spec, MaskRoi):
            mask, affine = self._images[("mask", spec.path)]
            return mask_on_grid(mask, affine, self.shape, self.affine, spec.path)
        if isinstance(spec, MniRoi):
            assert self.registration is not None
            image = None if spec.kind == "sphere" else \
                self._images[("mask" if spec.kind == "mask" else "atlas", spec.path)]  # type: ignore[index]
            return mni_roi_mask(spec, image, self.registration.mni_from_scanner, self.shape,
                                self.affine)
        return sphere_mask(spec.center_ras_mm, spec.radius_mm, self.shape, self.affine)
