"""Synthetic head motion and where it puts the head.

The parameters and the map they describe are :mod:`rtsc.conventions`' (names, units,
rotation order and sign, FD): a head point at ``x`` in the reference is at
``R @ (x - c) + c + t`` in the current volume, ``R`` from
:func:`rtsc.conventions.rotation_matrix` and ``c`` the RAS+ centre of the reference grid.
This module draws trajectories (:func:`motion_trajectory`) and moves points with them
(:func:`displace`, and its inverse :func:`moved_coordinates`, which the images are
sampled through).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from rtsc.conventions import FD_RADIUS_MM, rotation_matrix

__all__ = [
    "displace",
    "moved_coordinates",
    "motion_trajectory",
]

# Smoothing of the slow drift, seconds (Gaussian sigma of a random walk).
_DRIFT_SMOOTH_S = 30.0
# Rotation part of a jump, as arc length (mm) on the FD sphere per mm of jump_mm.
_JUMP_ROT_ARC_FRACTION = 0.5


def _check_params(params: np.ndarray) -> np.ndarray:
    p = np.asarray(params, dtype=np.float64)
    if p.shape != (6,):
        raise ValueError(f"motion params must have shape (6,), got {p.shape}")
    return p


def displace(
    xyz_reference_ras: np.ndarray, params: np.ndarray, center_ras: np.ndarray
) -> np.ndarray:
    """Where head points of the reference volume are in the current volume.

    Parameters
    ----------
    xyz_reference_ras : (..., 3) float, RAS+ mm
        Positions of head points in the reference volume.
    params : (6,) float
        trans (mm) and rot (radians) of the current volume.
    center_ras : (3,) float, RAS+ mm

    Returns
    -------
    xyz_current : (..., 3) float64, RAS+ mm
        ``R @ (x - c) + c + t``.
    """
    p = _check_params(params)
    c = np.asarray(center_ras, dtype=np.float64).reshape(3)
    rot = rotation_matrix(*p[3:])
    x = np.asarray(xyz_reference_ras, dtype=np.float64)
    return (x - c) @ rot.T + (c + p[:3])


def moved_coordinates(
    xyz_current_ras: np.ndarray, params: np.ndarray, center_ras: np.ndarray
) -> np.ndarray:
    """Reference-frame head position seen at given points of the current volume.

    The inverse of :func:`displace`: the intensity of the current volume at ``y`` is
    the reference head's intensity at ``R.T @ (y - c - t) + c``.

    Parameters
    ----------
    xyz_current_ras : (..., 3) float, RAS+ mm
        Positions in the current volume (e.g. the grid's voxel centres).
    params : (6,) float
        trans (mm) and rot (radians) of the current volume.
    center_ras : (3,) float, RAS+ mm
        Rotation centre (centre of the reference grid).

    Returns
    -------
    xyz_reference : (..., 3) float64, RAS+ mm
    """
    p = _check_params(params)
    c = np.asarray(center_ras, dtype=np.float64).reshape(3)
    rot = rotation_matrix(*p[3:])
    y = np.asarray(xyz_current_ras, dtype=np.float64)
    # Row vectors: (R.T @ v).T == v.T @ R
    return (y - (c + p[:3])) @ rot + c


def motion_trajectory(
    n_volumes: int,
    tr_s: float,
    rng: np.random.Generator,
    max_trans_mm: float = 1.0,
    max_rot_deg: float = 1.0,
    n_jumps: int = 3,
    jump_mm: float = 1.0,
    drift: bool = True,
) -> np.ndarray:
    """A synthetic head-motion trajectory: slow drift plus abrupt jumps.

    Parameters
    ----------
    n_volumes : int
        Number of volumes.
    tr_s : float
        Repetition time, seconds (sets the drift's smoothness: Gaussian sigma 30 s).
    rng : numpy.random.Generator
        Source of randomness (the trajectory is a deterministic function of it).
    max_trans_mm : float
        Bound on ``|trans_*|``, mm.
    max_rot_deg : float
        Bound on ``|rot_*|``, degrees (the output is in radians).
    n_jumps : int
        Number of step changes, at distinct random volumes >= 1 (fewer if the run is
        shorter than ``n_jumps + 1`` volumes).
    jump_mm : float
        Size of a jump: the translation step has norm ``jump_mm`` mm and the rotation
        step norm ``0.5 * jump_mm / FD_RADIUS_MM`` radians (half that arc length on the
        FD sphere, 50 mm). Signs are chosen to stay within the bounds where possible.
    drift : bool
        Add a smooth random drift reaching 20-50 % of the bound in each parameter.

    Returns
    -------
    params : (n_volumes, 6) float64
        trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians); row 0 is zero
        (the reference) and ``|params| <= bound`` column-wise (clipped).
    """
    n = int(n_volumes)
    if n < 0:
        raise ValueError(f"n_volumes must be >= 0, got {n_volumes!r}")
    if not tr_s > 0:
        raise ValueError(f"tr_s must be > 0, got {tr_s!r}")
    bounds = np.array([max_trans_mm] * 3 + [np.deg2rad(max_rot_deg)] * 3, dtype=np.float64)
    if np.any(bounds < 0):
        raise ValueError("max_trans_mm and max_rot_deg must be >= 0")
    params = np.zeros((n, 6))
    if n <= 1:
        return params
    if drift:
        walk = np.cumsum(rng.standard_normal((n, 6)), axis=0)
        smooth = gaussian_filter1d(walk, max(1.0, _DRIFT_SMOOTH_S / tr_s), axis=0, mode="nearest")
        smooth -= smooth[0]
        peak = np.abs(smooth).max(axis=0)
        peak[peak == 0] = 1.0
        params += smooth / peak * rng.uniform(0.2, 0.5, size=6) * bounds
    room = bounds - np.abs(params).max(axis=0)
    k = min(int(n_jumps), n - 1)
    if k > 0 and jump_mm > 0:
        at = np.sort(rng.choice(np.arange(1, n), size=k, replace=False))
        offset = np.zeros(6)
        rot_norm = _JUMP_ROT_ARC_FRACTION * jump_mm / FD_RADIUS_MM
        for vol in at:
            step = np.concatenate([_unit(rng) * jump_mm, _unit(rng) * rot_norm])
            flip = (np.abs(offset + step) > room) & (np.abs(offset - step) < np.abs(offset + step))
            step[flip] *= -1.0
            offset += step
            params[vol:] += step
    np.clip(params, -bounds, bounds, out=params)
    params[0] = 0.0
    return params


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)
