"""Head-motion conventions shared by rtsc and the simulator: names, rotation, FD.

Everything that says what a motion parameter means lives here, once. The pipeline's
registration reports parameters in this convention, the QC computes framewise
displacement from them, and the simulator moves its head and writes its ground truth
with the same functions, so the two can only agree or disagree about the images, never
about the convention. (The tests check these functions against formulas written out
independently, so sharing the code does not make the simulator's truth circular.)

Parameters
----------
Six numbers per volume, in this order (:data:`MOTION_NAMES`, the names fMRIPrep gives
the columns of its confounds file)::

    trans_x, trans_y, trans_z   translation, mm
    rot_x,   rot_y,   rot_z     rotation about the x, y, z axes, radians

Axes are RAS+ (the frame of NIfTI's qform and of nibabel): +x points to the subject's
right, +y anterior, +z superior, in mm.

What the parameters describe
----------------------------
The displacement of the head from the reference volume to the current one, in the
reference's RAS+ frame: a head point at ``x`` (mm) in the reference is at::

    x_current = R @ (x - c) + c + t

in the current volume, with ``t = (trans_x, trans_y, trans_z)``, ``c`` the RAS+ centre
of the reference grid (rotations turn about the middle of the field of view, not the
scanner's isocentre), and::

    R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)

so the rotation about x is applied first, then y, then z, all about fixed (scanner)
axes. Each elementary rotation is active and right-handed:

* ``Rx(a)`` turns +y towards +z by ``a`` (a positive ``rot_x`` tips the nose up:
  anterior points move superior);
* ``Ry(b)`` turns +z towards +x by ``b``;
* ``Rz(g)`` turns +x towards +y by ``g``.

:func:`rigid_matrix` builds this map as a 4 x 4 matrix and :func:`rigid_params` reads
the parameters back from one (angles in (-pi, pi], ``rot_y`` in [-pi/2, pi/2]).

Framewise displacement
----------------------
FD (Power et al. 2012) of volume ``t`` is the sum of the absolute backward differences
of the six parameters, the rotations first turned into arc length on a sphere of
:data:`FD_RADIUS_MM` (50 mm, about the distance from the centre of the head to the
cortex)::

    FD[t] = |dtrans_x| + |dtrans_y| + |dtrans_z|
            + radius * (|drot_x| + |drot_y| + |drot_z|),   d = p[t] - p[t - 1]

in mm; the first volume has FD 0.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "MOTION_NAMES",
    "FD_RADIUS_MM",
    "rotation_matrix",
    "rigid_matrix",
    "rigid_params",
    "framewise_displacement",
    "framewise_displacement_series",
]

#: Names of the six motion parameters, in order: translations (mm), rotations (radians).
MOTION_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")

#: Radius of the sphere on which FD turns rotations into arc length, mm.
FD_RADIUS_MM = 50.0


def rotation_matrix(rot_x: float, rot_y: float, rot_z: float) -> np.ndarray:
    """The rotation ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` of the module docstring.

    Parameters
    ----------
    rot_x, rot_y, rot_z : float
        Angles, radians. ``Rx`` turns +y towards +z, ``Ry`` +z towards +x, ``Rz`` +x
        towards +y (active, right-handed, about the fixed RAS+ axes).

    Returns
    -------
    R : (3, 3) float64
        Acts on column vectors: ``R @ v``.
    """
    # math on three scalars: numpy's set-up would dominate (called once per volume)
    cx, sx = math.cos(rot_x), math.sin(rot_x)
    cy, sy = math.cos(rot_y), math.sin(rot_y)
    cz, sz = math.cos(rot_z), math.sin(rot_z)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def _check_params(params: np.ndarray) -> np.ndarray:
    p = np.asarray(params, dtype=np.float64)
    if p.shape != (6,):
        raise ValueError(f"motion parameters must have shape (6,), got {p.shape}")
    return p


def rigid_matrix(params: np.ndarray, center_ras: np.ndarray) -> np.ndarray:
    """The reference -> current map of head points, as a homogeneous matrix.

    Parameters
    ----------
    params : (6,) float
        ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians).
    center_ras : (3,) float
        Rotation centre ``c``, RAS+ mm (the centre of the reference grid).

    Returns
    -------
    M : (4, 4) float64
        ``M @ [x, 1] = [R @ (x - c) + c + t, 1]``, RAS+ mm.
    """
    p = _check_params(params)
    c = np.asarray(center_ras, dtype=np.float64).reshape(3)
    rot = rotation_matrix(*p[3:])
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c + p[:3] - rot @ c
    return m


def rigid_params(matrix: np.ndarray, center_ras: np.ndarray) -> np.ndarray:
    """The parameters of a rigid map: the inverse of :func:`rigid_matrix`.

    Parameters
    ----------
    matrix : (4, 4) float
        ``x -> R @ (x - c) + c + t``, RAS+ mm; ``R`` a rotation.
    center_ras : (3,) float
        Rotation centre ``c``, RAS+ mm.

    Returns
    -------
    params : (6,) float64
        ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians;
        ``rot_y`` in [-pi/2, pi/2], the others in (-pi, pi]).
    """
    m, c = np.asarray(matrix, dtype=np.float64).tolist(), np.asarray(center_ras).tolist()
    # t = M[:3, 3] - c + R c, in plain floats (a dozen numbers: numpy's set-up dominates)
    trans = [m[r][3] - c[r] + m[r][0] * c[0] + m[r][1] * c[1] + m[r][2] * c[2]
             for r in range(3)]
    # R[2, 0] = -sin(rot_y), R[2, 1] / R[2, 2] = tan(rot_x), R[1, 0] / R[0, 0] = tan(rot_z)
    rot_y = math.atan2(-m[2][0], math.hypot(m[2][1], m[2][2]))
    rot_x = math.atan2(m[2][1], m[2][2])
    rot_z = math.atan2(m[1][0], m[0][0])
    return np.array([*trans, rot_x, rot_y, rot_z])


def framewise_displacement(params_prev: np.ndarray, params_cur: np.ndarray,
                           radius_mm: float = FD_RADIUS_MM) -> float:
    """Framewise displacement between two consecutive parameter sets.

    Parameters
    ----------
    params_prev, params_cur : (6,) float
        ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians).
    radius_mm : float
        Sphere radius turning rotations into arc length, mm.

    Returns
    -------
    fd : float, mm
        ``sum |d trans| + radius_mm * sum |d rot|``.
    """
    prev, cur = np.ravel(params_prev).tolist(), np.ravel(params_cur).tolist()
    if len(prev) != 6 or len(cur) != 6 or np.ndim(params_prev) != 1 or np.ndim(params_cur) != 1:
        raise ValueError(f"motion parameters must have shape (6,), got {np.shape(params_prev)} "
                         f"and {np.shape(params_cur)}")
    # plain floats: six numbers per volume cost less than numpy's array set-up
    delta = [abs(c - p) for c, p in zip(cur, prev)]
    return float(delta[0] + delta[1] + delta[2] + radius_mm * (delta[3] + delta[4] + delta[5]))


def framewise_displacement_series(params: np.ndarray,
                                  radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Framewise displacement of every volume of a run.

    Parameters
    ----------
    params : (n, 6) float
        Per volume ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (radians).
    radius_mm : float
        Sphere radius turning rotations into arc length, mm.

    Returns
    -------
    fd : (n,) float64, mm
        ``fd[0] = 0``; ``fd[t]`` as :func:`framewise_displacement` of volumes t-1, t.
    """
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"motion parameters must have shape (n, 6), got {params.shape}")
    fd = np.zeros(params.shape[0])
    if params.shape[0] > 1:
        delta = np.abs(np.diff(params, axis=0))
        fd[1:] = delta[:, :3].sum(axis=1) + radius_mm * delta[:, 3:].sum(axis=1)
    return fd
