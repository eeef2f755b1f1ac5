"""Set-up helpers of the automatic masks, for a series' first volume: the 98th
percentile of a volume and a binary dilation, both equal to NumPy's / SciPy's.

``np.percentile`` copies and partitions the whole volume (7-10 ms at 128x128x72, and
the first volume took it seven times: the registration mask and the QC, spike, signal
and carpet masks); :func:`percentile` finds the two order statistics with a histogram
of 4096 bins and sorts only the few values of their bins (numba, 1-2 ms), then
interpolates as NumPy's default ``linear`` method does for a Python scalar ``q``
(float arithmetic of the data's dtype). :func:`binary_dilation` dilates only the mask's
bounding box grown by ``iterations`` voxels (outside it the dilation is 0 anyway), with
a numba kernel for 3-D masks (10 -> ~3 ms a dilation at 128x128x72).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy import ndimage

_BINS = 4096


@numba.njit(cache=True, nogil=True, fastmath=False)
def _order_pair(flat: np.ndarray, k: int, k1: int) -> tuple[float, float, bool]:
    """The ``k``-th and ``k1``-th smallest (0-based, k <= k1) of ``flat`` and whether
    every value is finite (if not, the two values are meaningless)."""
    n = flat.size
    lo = np.inf
    hi = -np.inf
    for i in range(n):
        v = flat[i]
        if not (v > -np.inf and v < np.inf):  # NaN or infinite
            return 0.0, 0.0, False
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    if lo == hi:
        return lo, lo, True
    lo64 = np.float64(lo)
    scale = _BINS / (np.float64(hi) - lo64)
    counts = np.zeros(_BINS, dtype=np.int64)
    for i in range(n):
        b = int((np.float64(flat[i]) - lo64) * scale)  # monotone in the value
        if b >= _BINS:
            b = _BINS - 1
        counts[b] += 1
    below = 0  # values in bins before bk
    bk = 0
    while below + counts[bk] <= k:
        below += counts[bk]
        bk += 1
    upto = below + counts[bk]  # values in bins up to bk1
    bk1 = bk
    while upto <= k1:
        bk1 += 1
        upto += counts[bk1]
    buffer = np.empty(upto - below, dtype=flat.dtype)
    m = 0
    for i in range(n):
        b = int((np.float64(flat[i]) - lo64) * scale)
        if b >= _BINS:
            b = _BINS - 1
        if bk <= b <= bk1:
            buffer[m] = flat[i]
            m += 1
    buffer.sort()
    return buffer[k - below], buffer[k1 - below], True


@numba.njit(cache=True, nogil=True)
def _dilate_cross(src: np.ndarray, dst: np.ndarray) -> None:
    """One binary dilation of the 3-D ``src`` by the 6-neighbour cross into ``dst``
    (same shape, any layouts; voxels off the grid count as False, SciPy's default
    ``border_value=0``)."""
    nx, ny, nz = src.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                dst[i, j, k] = (src[i, j, k]
                                or (i > 0 and src[i - 1, j, k])
                                or (i < nx - 1 and src[i + 1, j, k])
                                or (j > 0 and src[i, j - 1, k])
                                or (j < ny - 1 and src[i, j + 1, k])
                                or (k > 0 and src[i, j, k - 1])
                                or (k < nz - 1 and src[i, j, k + 1]))


#: NumPy before 2.4 computes the fraction ``q / 100``, the virtual index and its weight in
#: the data's float type (float32 for float32 data); from 2.4 in float64. The result
#: differs in the last bit, and :func:`percentile` follows the NumPy it runs with.
_INDEX_IN_DATA_DTYPE = np.lib.NumpyVersion(np.__version__) < "2.4.0"


def percentile(data: np.ndarray, q: float) -> float:
    """``float(np.percentile(data, q))`` (method ``linear``, ``q`` a Python number),
    bit for bit, for float32 / float64 data of any memory order; NaN if ``data`` holds a
    NaN (as NumPy). Other dtypes and non-finite data go to NumPy."""
    data = np.asarray(data)
    n = data.size
    if data.dtype not in (np.float32, np.float64) or n == 0:
        return float(np.percentile(data, q))
    flat = data.ravel(order="K")  # a view for any contiguous array
    dtype = data.dtype.type
    if _INDEX_IN_DATA_DTYPE:
        virtual = (n - 1) * np.true_divide(q, dtype(100))
    else:
        virtual = (n - 1) * np.true_divide(np.float64(q), 100)
    previous = math.floor(virtual)
    if virtual >= n - 1:
        k = k1 = n - 1
    else:
        k, k1 = int(previous), int(previous) + 1
    a, b, finite = _order_pair(flat, k, k1)
    if not finite:
        return float(np.percentile(data, q))
    gamma = virtual - previous  # a NumPy float of virtual's type
    a, b = dtype(a), dtype(b)
    diff = b - a
    if gamma >= 0.5:
        return float(b - diff * dtype(1 - gamma))
    return float(a + diff * dtype(gamma))


def binary_dilation(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=iterations)`` (the default cross
    structuring element, ``iterations`` >= 1), computed within the bounding box of
    ``mask`` grown by ``iterations`` voxels (clipped to the grid). Returns a new bool
    array in C order, as SciPy does."""
    mask = np.asarray(mask, dtype=bool)
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    out = np.zeros(mask.shape, dtype=bool)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return out
        box.append(slice(max(int(hit[0]) - iterations, 0),
                         min(int(hit[-1]) + 1 + iterations, mask.shape[axis])))
    box = tuple(box)
    if mask.ndim != 3:
        out[box] = ndimage.binary_dilation(mask[box], iterations=iterations)
        return out
    # 3-D: the iterations of the cross in a kernel (the box holds every voxel within
    # ``iterations`` cross steps of the mask, and a shortest path between two voxels of
    # a box stays in it: the same voxels as SciPy's, without its whole-box copies)
    src, dst = mask[box], out[box]
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        src, dst = src.T, dst.T  # the kernel walks the mask in its memory order
    for _ in range(iterations - 1):
        step = np.empty(src.shape, dtype=bool)
        _dilate_cross(src, step)
        src = step
    _dilate_cross(src, dst)
    return out


def warm_up() -> None:
    """Compile (or load from cache) the kernel for float32 and float64 volumes."""
    for dtype in (np.float32, np.float64):
        percentile(np.arange(8, dtype=dtype).reshape(2, 2, 2), 98)
    for order in "CF":  # masks of C- and Fortran-ordered volumes, 1 and 2+ iterations,
        # whole grid and bounding box (array views of any layout)
        probe = np.zeros((7, 7, 7), dtype=bool, order=order)
        probe[3, 3, 3] = True
        for iterations in (1, 2):
            binary_dilation(probe, iterations)
            binary_dilation(np.ones((3, 3, 3), dtype=bool, order=order), iterations)
