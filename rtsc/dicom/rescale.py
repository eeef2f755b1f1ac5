"""The DICOM rescale (RescaleSlope, RescaleIntercept) of stored pixels, checked once for
every kind of image.

Volumes are float32, ``stored * slope + intercept``. A slope or intercept that is not a
number, a slope of 0 (every voxel the intercept), and values float32 cannot carry (a
slope of 1e308 makes every voxel infinite, 1e-308 every voxel 0) are refused with a
:class:`~rtsc.errors.DicomError` naming both values: mosaics, single slices and each
frame of an enhanced multi-frame image alike. An absent or empty element takes the
DICOM default (slope 1, intercept 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtsc.errors import DicomError

_FLOAT32 = np.finfo(np.float32)


def _number(value: Any, default: float, name: str, where: str) -> float:
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{name}{where} is not a number ({value!r}); archived, not "
                         "processed") from exc


def checked_rescale(slope_value: Any, intercept_value: Any, dtype: np.dtype,
                    where: str = "") -> tuple[float, float]:
    """(slope, intercept) from the elements' values, refused unless every stored value
    of ``dtype`` rescales to a finite float32 and the slope does not round to 0.

    Parameters
    ----------
    slope_value, intercept_value : the elements' values (None or empty: absent)
    dtype : numpy dtype of the stored pixels (integer)
    where : text naming the frame, for the message (e.g. `` of frame 3``)

    Raises
    ------
    DicomError
        Not a number, a slope of 0, or values float32 cannot carry.
    """
    slope = _number(slope_value, 1.0, "RescaleSlope", where)
    intercept = _number(intercept_value, 0.0, "RescaleIntercept", where)
    stored = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else _FLOAT32
    peak = abs(slope) * max(abs(float(stored.min)), abs(float(stored.max))) + abs(intercept)
    reason = None
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        reason = "not finite"
    elif slope == 0.0:
        reason = "a slope of 0 makes every voxel the intercept"
    elif abs(slope) < _FLOAT32.tiny:
        reason = "the slope rounds to 0 in float32"
    elif not peak < float(_FLOAT32.max):
        reason = f"{np.dtype(dtype)} values rescale beyond float32 ({peak:.3g})"
    if reason is not None:
        raise DicomError(f"unusable rescale{where}: RescaleSlope {slope!r}, RescaleIntercept "
                         f"{intercept!r}: {reason}; archived, not processed")
    return slope, intercept
