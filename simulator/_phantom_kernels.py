"""Numba kernel of the analytic phantom: intensity and activation weight per point.

The same arithmetic as :class:`simulator.phantom.BrainPhantom`'s NumPy evaluation
(``BrainPhantom.sample_reference``, the test's reference), fused into one pass over the
points: the NumPy form made some 40 temporaries of every chunk and took ~0.3 s per
64x64x36 volume with 8 sub-samples per voxel, the bulk of a simulated run.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@numba.njit(cache=True, inline="always")
def _waves(ux: float, uy: float, uz: float, table: np.ndarray) -> float:
    total = 0.0
    for r in range(table.shape[0]):
        total += table[r, 4] * math.sin(table[r, 0] * ux + table[r, 1] * uy
                                        + table[r, 2] * uz + table[r, 3])
    return total


@numba.njit(cache=True)
def sample_points(xyz, center, rot, semi, layers, pial_folds, wm_folds, ventricles,
                  fissure, texture_waves, blobs, intensity, activation_ball,
                  out_intensity, out_activation):
    """Intensity and activation weight at each point (see BrainPhantom.sample).

    Parameters
    ----------
    xyz : (n, 3) float64, RAS+ mm
    center : (3,) float64, head centre, RAS+ mm
    rot : (3, 3) float64, head axes in RAS (columns)
    semi : (3,) float64, head semi-axes, mm
    layers : (6,) float64, scalp, skull, CSF and GM thickness, the edge scale and the
        number of edge scales outside the scalp beyond which a point is background, mm
    pial_folds, wm_folds, texture_waves : (m, 5) float64, plane waves (k (rad/mm, 3),
        phase (rad), amplitude)
    ventricles : (v, 6) float64, centre and semi-axes, head frame mm
    fissure : (2,) float64, half-width and starting head-frame z, mm
    blobs : (b, 5) float64, centre (head frame mm), sigma (mm), amplitude
    intensity : (5,) float64, scalp, skull, CSF, GM and WM intensities
    activation_ball : (6,) float64, centre (RAS+ mm), radius and edge scale (mm), and
        the distance (mm) beyond which the weight is exactly 0
    out_intensity, out_activation : (n,) float64, written
    """
    scalp_mm, skull_mm, csf_mm, gm_mm, edge_mm, outside = layers
    inv_w = 1.0 / edge_mm
    a, b, c = semi[0], semi[1], semi[2]
    i_scalp, i_skull, i_csf, i_gm, i_wm = intensity
    for p in range(xyz.shape[0]):
        x, y, z = xyz[p, 0], xyz[p, 1], xyz[p, 2]
        dx, dy, dz = x - center[0], y - center[1], z - center[2]
        ux = rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz
        uy = rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz
        uz = rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz
        ex = ux / (1.0 - 0.07 * min(max(uy / b, -1.5), 1.5)
                   - 0.08 * min(max(uz / c, -1.5), 1.5))
        ey = uy / (1.0 - 0.05 * min(max(uz / c, -1.5), 1.5))
        ez = uz
        gx, gy, gz = ex / (a * a), ey / (b * b), ez / (c * c)
        q = math.sqrt(ex * gx + ey * gy + ez * gz)
        depth = (1.0 - q) * q / (math.sqrt(gx * gx + gy * gy + gz * gz) + 1e-12)
        if not depth > -outside * edge_mm:
            out_intensity[p] = 0.0
            out_activation[p] = 0.0
            continue
        head = _expit(depth * inv_w)
        skull = _expit((depth - scalp_mm) * inv_w)
        csf = _expit((depth - scalp_mm - skull_mm) * inv_w)
        pial_depth = scalp_mm + skull_mm + csf_mm + _waves(ux, uy, uz, pial_folds)
        pial = _expit((depth - pial_depth) * inv_w)
        wm_depth = pial_depth + gm_mm + _waves(ux, uy, uz, wm_folds)
        wm = _expit((depth - wm_depth) * inv_w)
        ventricle = 0.0
        for v in range(ventricles.shape[0]):
            vx = (ux - ventricles[v, 0]) / ventricles[v, 3]
            vy = (uy - ventricles[v, 1]) / ventricles[v, 4]
            vz = (uz - ventricles[v, 2]) / ventricles[v, 5]
            qv = math.sqrt(vx * vx + vy * vy + vz * vz)
            scale = min(ventricles[v, 3], min(ventricles[v, 4], ventricles[v, 5]))
            ventricle = max(ventricle, _expit((1.0 - qv) * scale * inv_w))
        fis = (_expit((fissure[0] - abs(ux)) * inv_w) * _expit((uz - fissure[1]) / 3.0)
               * pial)
        texture = 1.0 + _waves(ux, uy, uz, texture_waves)
        for k in range(blobs.shape[0]):
            r2 = (ux - blobs[k, 0]) ** 2 + (uy - blobs[k, 1]) ** 2 + (uz - blobs[k, 2]) ** 2
            texture += blobs[k, 4] * math.exp(r2 * (-0.5 / (blobs[k, 3] * blobs[k, 3])))
        val = (head * i_scalp + skull * (i_skull - i_scalp) + csf * (i_csf - i_skull)
               + pial * (i_gm - i_csf) + wm * (i_wm - i_gm)
               + ventricle * wm * (i_csf - i_wm))
        val += fis * (i_csf - val)
        out_intensity[p] = val * texture
        rx = x - activation_ball[0]
        ry = y - activation_ball[1]
        rz = z - activation_ball[2]
        r = math.sqrt(rx * rx + ry * ry + rz * rz)
        if r <= activation_ball[5]:
            ball = _expit((activation_ball[3] - r) / activation_ball[4])
            parenchyma = min(max(pial - ventricle * wm, 0.0), 1.0) * (1.0 - fis)
            out_activation[p] = ball * parenchyma
        else:
            out_activation[p] = 0.0
