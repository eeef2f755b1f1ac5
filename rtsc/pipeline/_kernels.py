"""Numba kernels of the pipeline: no I/O, no allocation in the loops.

Each kernel works on flat (1-D) views so that it serves any memory order; the
public wrappers check dtype, shape and contiguity and make those views.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=False)
def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    total = 0.0
    count = 0
    for n in range(values.size):
        if mask[n]:
            total += values[n]
            count += 1
    return total / count if count else np.nan


@numba.njit(cache=True, nogil=True)
def _accumulate(total: np.ndarray, values: np.ndarray) -> None:
    for n in range(values.size):
        total[n] += values[n]


def _flat(array: np.ndarray, dtype: type, name: str) -> np.ndarray:
    if array.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype)}, got {array.dtype}")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise ValueError(f"{name} must be contiguous")
    return array.ravel(order="K")


def masked_mean(data: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``data`` over ``mask`` (float64 accumulation); NaN for an empty mask.

    Parameters
    ----------
    data : (nx, ny, nz) float32, contiguous
    mask : (nx, ny, nz) bool, same shape and memory order
    """
    if data.shape != mask.shape or data.flags.f_contiguous != mask.flags.f_contiguous:
        raise ValueError("data and mask must share shape and memory order")
    return float(_masked_mean(_flat(data, np.float32, "data"), _flat(mask, np.bool_, "mask")))


def accumulate(total: np.ndarray, data: np.ndarray) -> None:
    """``total += data`` in place (float64 running sum of float32 volumes)."""
    if total.shape != data.shape or total.flags.f_contiguous != data.flags.f_contiguous:
        raise ValueError("total and data must share shape and memory order")
    _accumulate(_flat(total, np.float64, "total"), _flat(data, np.float32, "data"))


def warm_up() -> None:
    """Compile (or load from cache) every kernel before the first volume arrives."""
    probe = np.zeros((2, 2, 2), dtype=np.float32, order="F")
    masked_mean(probe, np.ones(probe.shape, dtype=bool, order="F"))
    accumulate(np.zeros(probe.shape, dtype=np.float64, order="F"), probe)
