"""ROI definitions (config ``glm.roi``) and their masks on the volume grid.

See :mod:`rtsc.pipeline.roi.stage` for the forms a ROI takes and how the stage uses them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from rtsc.errors import ConfigError, RtscError

#: Name of the ROI when ``glm.roi`` is a single spec.
DEFAULT_ROI_NAME = "roi"
#: Largest disagreement (mm) allowed between a mask file's affine and the volumes'.
GRID_ATOL_MM = 1e-3

_SPEC_KEYS = frozenset({"mask", "center_ras_mm", "radius_mm", "contrast", "top_k", "within",
                        "freeze_after", "atlas", "label", "mask_mni", "center_mni_mm"})
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ALLOWED = ("allowed: null; a mask NIfTI path in the acquired grid; {mask: path}; "
            "{center_ras_mm: [x, y, z], radius_mm: r}; in MNI space {atlas: path, label: n}, "
            "{mask_mni: path} or {center_mni_mm: [x, y, z], radius_mm: r}; {contrast: "
            "name, top_k: k, within: <any of those> (optional), freeze_after: n "
            "(optional)}; or a "
            "mapping of ROI names ([A-Za-z0-9_-]) to any of these")


class RoiError(RtscError, ValueError):
    """An ROI cannot be defined: bad spec, mask in another grid, empty ROI, bad wiring."""


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---- ROI specs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskRoi:
    """A mask NIfTI in the acquired grid (nonzero finite voxels are in the ROI).

    Attributes
    ----------
    path : str, relative paths are taken from the working directory
    """

    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path).strip():
            raise RoiError(f"mask path {self.path!r}: allowed: a non-empty path")
        object.__setattr__(self, "path", str(self.path))


@dataclass(frozen=True)
class SphereRoi:
    """Voxels whose centres lie within ``radius_mm`` of ``center_ras_mm``.

    Attributes
    ----------
    center_ras_mm : (x, y, z) floats, RAS+ mm
    radius_mm : float > 0, mm
    """

    center_ras_mm: tuple[float, float, float]
    radius_mm: float

    def __post_init__(self) -> None:
        center = self.center_ras_mm
        if isinstance(center, (str, bytes)) or not isinstance(center, (Sequence, np.ndarray)) \
                or len(center) != 3 or not all(_number(c) for c in center):
            raise RoiError(f"center_ras_mm {center!r}: allowed: [x, y, z], three finite "
                           "numbers (RAS+ mm)")
        if not _number(self.radius_mm) or not float(self.radius_mm) > 0:
            raise RoiError(f"radius_mm {self.radius_mm!r}: allowed: a finite number of mm > 0")
        object.__setattr__(self, "center_ras_mm", tuple(float(c) for c in center))
        object.__setattr__(self, "radius_mm", float(self.radius_mm))


@dataclass(frozen=True)
class MniRoi:
    """An ROI in MNI space, placed on the acquired grid through the series' registration
    to the MNI152 template (:mod:`rtsc.pipeline.roi.mni`).

    Attributes
    ----------
    kind : ``"atlas"`` (the voxels of label ``label`` of a label image), ``"mask"``
        (nonzero voxels of a mask image) or ``"sphere"`` (within ``radius_mm`` of
        ``center_mni_mm``)
    path : str or None, the atlas or mask NIfTI (any grid, in MNI mm)
    label : int or None, the atlas label
    center_mni_mm : (x, y, z) floats or None, MNI mm
    radius_mm : float or None, mm (in MNI space)
    """

    kind: str
    path: str | None = None
    label: int | None = None
    center_mni_mm: tuple[float, float, float] | None = None
    radius_mm: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("atlas", "mask", "sphere"):
            raise RoiError(f"MNI ROI kind {self.kind!r}: allowed: atlas, mask, sphere")
        if self.kind == "sphere":
            try:
                sphere = SphereRoi(self.center_mni_mm, self.radius_mm)  # type: ignore[arg-type]
            except RoiError as exc:
                raise RoiError(str(exc).replace("center_ras_mm", "center_mni_mm")
                               .replace("RAS+ mm", "MNI mm")) from None
            object.__setattr__(self, "center_mni_mm", sphere.center_ras_mm)
            object.__setattr__(self, "radius_mm", sphere.radius_mm)
            return
        object.__setattr__(self, "path", MaskRoi(self.path).path)  # type: ignore[arg-type]
        if self.kind == "atlas" and (not is_integer(self.label) or int(self.label) < 1):
            raise RoiError(f"label {self.label!r}: allowed: an integer >= 1 (an atlas label)")


@dataclass(frozen=True)
class ContrastRoi:
    """The ``top_k`` voxels of largest t of a GLM contrast (see the module docstring).

    Attributes
    ----------
    contrast : str, a contrast name of the GLM stage
    top_k : int >= 1
    within : MaskRoi, SphereRoi, MniRoi or None, candidates (default: the GLM's mask)
    freeze_after : int >= 1 or None, volumes after which the selection is kept; None:
        re-selected all run
    """

    contrast: str
    top_k: int
    within: MaskRoi | SphereRoi | MniRoi | None = None
    freeze_after: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.contrast, str) or not self.contrast.strip():
            raise RoiError(f"contrast {self.contrast!r}: allowed: a contrast name")
        if not is_integer(self.top_k) or self.top_k < 1:
            raise RoiError(f"top_k {self.top_k!r}: allowed: an integer >= 1")
        if self.within is not None and not isinstance(self.within, (MaskRoi, SphereRoi, MniRoi)):
            raise RoiError(f"within {self.within!r}: allowed: a mask path, a sphere or an "
                           "MNI ROI")
        if self.freeze_after is not None and (not is_integer(self.freeze_after)
                                              or self.freeze_after < 1):
            raise RoiError(f"freeze_after {self.freeze_after!r}: allowed: null or an "
                           "integer >= 1 (volumes)")
        object.__setattr__(self, "top_k", int(self.top_k))


RoiSpec = Union[MaskRoi, SphereRoi, MniRoi, ContrastRoi]
#: The ROI kinds of fixed voxels (all but the top-k ROI).
FixedRoi = Union[MaskRoi, SphereRoi, MniRoi]
_MNI_FORMS = {frozenset({"atlas", "label"}): "atlas", frozenset({"mask_mni"}): "mask",
              frozenset({"center_mni_mm", "radius_mm"}): "sphere"}


def _parse_one(value: Any, key: str, top_k_allowed: bool = True) -> RoiSpec:
    """One spec (path or mapping) into a RoiSpec; ConfigError naming ``key``."""
    try:
        if isinstance(value, (str, Path)):
            return MaskRoi(str(value))
        if isinstance(value, Mapping):
            keys = set(value)
            unknown = sorted(str(k) for k in keys - _SPEC_KEYS)
            if unknown:
                raise RoiError(f"unknown field(s) {', '.join(unknown)}")
            if "mask" in keys:
                if keys != {"mask"}:
                    raise RoiError(f"mask cannot be combined with {sorted(keys - {'mask'})}")
                return MaskRoi(value["mask"])
            if keys & {"contrast", "top_k"}:
                if not top_k_allowed:
                    raise RoiError("a top-k ROI cannot be nested in within")
                missing = {"contrast", "top_k"} - keys
                extra = keys - {"contrast", "top_k", "within", "freeze_after"}
                if missing or extra:
                    raise RoiError(f"a top-k ROI needs contrast and top_k (missing "
                                   f"{sorted(missing)}) and allows within and freeze_after "
                                   f"(extra {sorted(extra)})")
                within = value.get("within")
                region = None if within is None else \
                    _parse_one(within, f"{key}.within", top_k_allowed=False)
                assert not isinstance(region, ContrastRoi)
                return ContrastRoi(value["contrast"], value["top_k"], region,
                                   value.get("freeze_after"))
            if keys == {"center_ras_mm", "radius_mm"}:
                return SphereRoi(value["center_ras_mm"], value["radius_mm"])
            kind = _MNI_FORMS.get(frozenset(keys))
            if kind is not None:
                return MniRoi(kind, value.get("atlas", value.get("mask_mni")),
                              value.get("label"), value.get("center_mni_mm"),
                              value.get("radius_mm"))
            raise RoiError(f"fields {sorted(keys)} do not make an ROI")
    except ConfigError:
        raise
    except RoiError as exc:
        raise ConfigError(f"{key}: {exc}; {_ALLOWED}") from None
    raise ConfigError(f"{key}: {value!r} is not an ROI; {_ALLOWED}")


def parse_roi_spec(value: Any, key: str = "glm.roi") -> dict[str, RoiSpec]:
    """The config value ``glm.roi`` as named ROI specs.

    Forms: ``null`` (no ROI); a mask path, ``{mask: path}``, a sphere
    ``{center_ras_mm: [x, y, z], radius_mm: r}``; in MNI space an atlas label ``{atlas:
    path, label: n}``, a mask ``{mask_mni: path}`` or a sphere ``{center_mni_mm: [x, y,
    z], radius_mm: r}``; or a top-k ROI ``{contrast: name, top_k: k, within: <any of
    those>, freeze_after: n}`` (one ROI,
    named ``"roi"``); or a mapping of names to any of these (several ROIs, in the given
    order; the first is the default feedback ROI). A mapping is a single spec when all its
    keys are spec fields and a mapping of names when none is, so an ROI cannot be named
    after a spec field (``mask``, ``contrast`` ...).

    Parameters
    ----------
    value : None, str, pathlib.Path or mapping
    key : config key path used in the error messages

    Returns
    -------
    rois : dict name -> MaskRoi | SphereRoi | ContrastRoi (empty for null or ``{}``)

    Raises
    ------
    ConfigError
        Naming ``key`` (or ``key.<name>``), the value given and the allowed forms.
    """
    if value is None:
        return {}
    if isinstance(value, (str, Path)):
        return {DEFAULT_ROI_NAME: _parse_one(value, key)}
    if isinstance(value, Mapping):
        keys = set(value)
        if not keys:
            return {}
        fields = {k for k in keys if k in _SPEC_KEYS}
        if fields == keys:
            return {DEFAULT_ROI_NAME: _parse_one(value, key)}
        if fields:
            raise ConfigError(f"{key}: mixes ROI fields ({', '.join(sorted(fields))}) with "
                              f"other keys ({', '.join(sorted(map(str, keys - fields)))}); "
                              f"{_ALLOWED}")
        rois: dict[str, RoiSpec] = {}
        for name, spec in value.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"{key}: ROI name {name!r} is not allowed; names are 1-64 "
                                  f"characters of [A-Za-z0-9_-]; {_ALLOWED}")
            rois[name] = _parse_one(spec, f"{key}.{name}")
        return rois
    raise ConfigError(f"{key}: {value!r} is not an ROI; {_ALLOWED}")


# ---- masks on the volume grid --------------------------------------------------------------

def load_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask NIfTI: nonzero finite voxels are in.

    Returns
    -------
    mask : (nx, ny, nz) bool (a 4-D file must have one volume)
    affine : (4, 4) float64, voxel -> RAS+ mm

    Raises
    ------
    RoiError
        The file cannot be read or is not 3-D.
    """
    data, affine = read_image(path, "ROI mask")
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(data) & (data != 0)
    return mask, affine


def read_image(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D NIfTI (or 4-D with one volume) as stored, and its affine (voxel -> mm).

    Raises
    ------
    RoiError
        Naming ``what`` and the path: unreadable, or not 3-D.
    """
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds
        raise RoiError(f"{what} {path}: cannot be read as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RoiError(f"{what} {path}: shape {data.shape} is not 3-D")
    return data, np.asarray(image.affine, dtype=np.float64)


def mask_on_grid(mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, int, int],
                 affine: np.ndarray, source: str) -> np.ndarray:
    """Check that a mask lies on the volumes' grid; return it (Fortran order).

    Parameters
    ----------
    mask : (nx, ny, nz) bool
    mask_affine : (4, 4) float64, voxel -> RAS+ mm, of the mask
    shape, affine : the volumes' grid
    source : what the mask is (a file name), for the messages

    Raises
    ------
    RoiError
        Shape or affine (beyond ``GRID_ATOL_MM``) differ, or the mask is empty.
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if tuple(mask.shape) != shape or not np.allclose(mask_affine, affine, rtol=0.0,
                                                    atol=GRID_ATOL_MM):
        def show(a: np.ndarray) -> str:
            return np.array2string(np.asarray(a), precision=3, suppress_small=True,
                                   separator=", ")

        raise RoiError(
            f"ROI mask {source}: its grid, shape {tuple(mask.shape)} with affine "
            f"{show(mask_affine)}, differs from the volumes' grid, shape {shape} with "
            f"affine {show(affine)} (tolerance {GRID_ATOL_MM} mm); resample the mask to the "
            "acquired grid")
    if not mask.any():
        raise RoiError(f"ROI mask {source}: no nonzero voxel (empty ROI)")
    return np.asfortranarray(mask, dtype=bool)


def _centres(affine: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """RAS+ mm of voxel centres (i, j, k broadcast), shape (..., 3)."""
    ijk = np.stack(np.broadcast_arrays(i, j, k), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def sphere_mask(center_ras_mm: Sequence[float], radius_mm: float,
                shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Voxels whose centres lie within ``radius_mm`` of a point.

    Only the sphere's bounding box in voxel space is evaluated: along voxel axis a the
    sphere reaches ``radius * |row a of inv(A)|`` voxels from its centre (A the affine's
    linear part), so oblique and anisotropic grids need nothing special.

    Parameters
    ----------
    center_ras_mm : (3,) RAS+ mm
    radius_mm : float > 0, mm; a voxel at distance <= radius (1e-9 relative) is in
    shape : (nx, ny, nz)
    affine : (4, 4) float64, voxel -> RAS+ mm

    Returns
    -------
    mask : (nx, ny, nz) bool, Fortran order

    Raises
    ------
    RoiError
        No voxel centre in the sphere (the message gives the nearest one's distance).
    """
    center = np.asarray(center_ras_mm, dtype=np.float64)
    radius = float(radius_mm)
    affine = np.asarray(affine, dtype=np.float64)
    inverse = np.linalg.inv(affine[:3, :3])
    c_vox = inverse @ (center - affine[:3, 3])
    reach = radius * np.linalg.norm(inverse, axis=1)
    dims = np.asarray(shape, dtype=np.int64)
    lo = np.maximum(np.floor(c_vox - reach), 0).astype(np.int64)
    hi = np.minimum(np.ceil(c_vox + reach), dims - 1).astype(np.int64)
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool, order="F")
    if np.all(hi >= lo):
        axes = [np.arange(lo[a], hi[a] + 1) for a in range(3)]
        xyz = _centres(affine, axes[0][:, None, None], axes[1][None, :, None],
                       axes[2][None, None, :])
        d2 = np.sum((xyz - center) ** 2, axis=-1)
        mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = \
            d2 <= radius * radius * (1.0 + 1e-9)
    if not mask.any():
        # Error path only: the whole grid, to say how far the sphere missed.
        i, j, k = np.indices(tuple(int(s) for s in shape), sparse=True)
        nearest = float(np.sqrt(np.min(np.sum((_centres(affine, i, j, k) - center) ** 2,
                                              axis=-1))))
        raise RoiError(f"ROI sphere at {center.tolist()} mm (RAS+) with radius {radius:g} mm "
                       f"holds no voxel centre of the {tuple(shape)} grid (empty ROI); the "
                       f"nearest voxel centre is {nearest:.2f} mm away")
    return mask


def flat_index(mask: np.ndarray) -> np.ndarray:
    """Sorted flat Fortran-order indices of a mask's voxels, (k,) int64."""
    return np.flatnonzero(np.asarray(mask).ravel(order="F")).astype(np.int64)


def roi_mean(flat_data: np.ndarray, index: np.ndarray) -> float:
    """Mean of ``flat_data[index]`` with float64 accumulation (NaN for an empty index)."""
    if index.size == 0:
        return math.nan
    return float(np.sum(flat_data[index], dtype=np.float64)) / index.size


