"""Cervical spinal cord phantom at rest: anatomy, intensities and partial volume.

Geometry, per axial slice ``k`` in slice-local in-plane coordinates ``(u, v)`` (mm, RAS
axes: ``u`` along x, R-L; ``v`` along y, A-P, positive anterior) around the canal centre
``(cx_k, cy_k)`` (a gentle lordotic curve along z):

* cord: ellipse of diameters :data:`CORD_DIAMETERS_MM` (R-L x A-P), scaled per slice by up
  to 6 % (cervical enlargement) and turned by a few degrees;
* grey matter: a butterfly (two dorsal horns pointing posterolaterally, two wider ventral
  horns, a grey commissure), about 20 % of the cord area;
* CSF: the canal (diameters :data:`CANAL_DIAMETERS_MM`) outside the cord;
* bone: a ring around the canal and a vertebral body anterior to it; a dark airway
  further anterior; soft tissue of the neck (an ellipse) with a smooth texture; air
  outside (0).

Intensities (T2*-weighted EPI, before each slice's factor): white matter 975, grey matter
1080 (cord mean about 1000), CSF 1110 (cord about 0.9 x CSF), soft tissue 400 (cord about
2.5 x tissue). Each slice is multiplied by a factor in [0.65, 1] (z-shim differences, up
to 35 %). Partial volume: every voxel averages ``psf_samples`` x ``psf_samples`` in-plane
points (logistic edges of 0.15 mm).

:mod:`simulator.cord` moves, modulates and samples these maps volume by volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from simulator.phantom import Grid

__all__ = ["CORD_DIAMETERS_MM", "CANAL_DIAMETERS_MM", "CORD_INTENSITY", "CordMaps", "cord_maps"]

#: Cord diameters, mm (R-L, A-P), as the issue gives them.
CORD_DIAMETERS_MM = (7.5, 13.0)
#: Spinal canal diameters, mm (R-L, A-P).
CANAL_DIAMETERS_MM = (13.0, 21.0)
#: Baseline intensities before the slice factor.
CORD_INTENSITY = {"wm": 975.0, "gm": 1080.0, "csf": 1110.0, "tissue": 400.0, "bone": 170.0,
                  "airway": 0.0}
_EDGE_MM = 0.15
#: Canal centre of the middle slice, RAS mm (posterior of the grid centre).
_CANAL_CENTER = (0.5, -6.0)
# Grey matter: (u, v, semi_u, semi_v, angle_deg) ellipses in cord coordinates (mm).
# Dorsal horns posterior (v < 0), ventral anterior; index 0 is the LEFT dorsal horn.
_GM_PARTS = (
    (-1.25, -2.55, 0.55, 2.05, 22.0),   # left dorsal horn (activated)
    (1.25, -2.55, 0.55, 2.05, -22.0),   # right dorsal horn
    (-1.35, 2.1, 0.8, 1.6, -18.0),      # left ventral horn
    (1.35, 2.1, 0.8, 1.6, 18.0),        # right ventral horn
    (0.0, 0.0, 1.55, 0.55, 0.0),        # grey commissure
)
# Half-size (x, y) of the box around the canal centre holding the canal, cord and bone, mm.
_BOX_MM = (26.0, 42.0)
# Scale of the horn ellipses giving grey matter ~20 % of the cord area.
_GM_SIZE = 0.9


def _ellipse_inside(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Smooth occupancy of an ellipse (semi-axes a along u, b along v), logistic edge."""
    gu, gv = u / (a * a), v / (b * b)
    q = np.sqrt(u * gu + v * gv)
    depth = (1.0 - q) * q / (np.sqrt(gu * gu + gv * gv) + 1e-12)
    return expit(depth / _EDGE_MM)


def _rotate(u: np.ndarray, v: np.ndarray, deg: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return c * u + s * v, -s * u + c * v


@dataclass(frozen=True, eq=False)
class CordMaps:
    """Static maps of the phantom at rest, each (nx, ny, nz) float32 on the grid.

    Attributes
    ----------
    base : intensity before the slice factor (no physiology, no activation)
    cord, gm, csf, tissue : partial-volume fractions in [0, 1]
    dorsal_horn : fraction of the activated (left) dorsal horn
    slice_factor : (nz,) float64, in [0.65, 1]
    centre_ras : (nz, 2) float64, canal centre per slice, RAS mm
    """

    base: np.ndarray
    cord: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    tissue: np.ndarray
    dorsal_horn: np.ndarray
    slice_factor: np.ndarray
    centre_ras: np.ndarray


def cord_maps(grid: Grid, seed: int = 0, psf_samples: int = 4) -> CordMaps:
    """Evaluate the phantom on an axial grid (see the module docstring).

    Parameters
    ----------
    grid : Grid
        Axial grid (i along x, j along y, k along z).
    seed : int
        Seeds the tissue texture and the slice factors (``default_rng([seed, 5])``).
    psf_samples : int
        In-plane sub-samples per axis averaged into each voxel.

    Returns
    -------
    CordMaps
    """
    nx, ny, nz = grid.shape
    rng = np.random.default_rng([seed, 5])
    aff = grid.affine()
    s = max(int(psf_samples), 1)
    off = (np.arange(s) + 0.5) / s - 0.5
    # Sub-sample positions (nx, s) and (ny, s) in RAS mm.
    xs = aff[0, 0] * (np.arange(nx)[:, None] + off[None, :]) + aff[0, 3]
    ys = aff[1, 1] * (np.arange(ny)[:, None] + off[None, :]) + aff[1, 3]
    X = xs[:, None, :, None]
    Y = ys[None, :, None, :]
    zk = np.linspace(-1.0, 1.0, nz) if nz > 1 else np.zeros(1)
    cx = _CANAL_CENTER[0] + 0.8 * np.sin(1.3 * zk + 0.4)
    cy = _CANAL_CENTER[1] + 2.0 * zk ** 2 - 0.5 * zk
    scale = 1.0 + 0.06 * np.exp(-((zk - 0.2) / 0.5) ** 2)
    angle = 3.0 * np.sin(2.0 * zk)
    waves = rng.normal(size=(4, 2))
    waves /= np.linalg.norm(waves, axis=1, keepdims=True)
    wavelength = rng.uniform(25.0, 60.0, size=4)
    kvec = waves * (2 * np.pi / wavelength)[:, None]
    wphase = rng.uniform(0, 2 * np.pi, size=4)
    wamp = rng.uniform(0.04, 0.08, size=4)
    raw = np.cumsum(rng.normal(size=nz))
    raw = raw - raw.min()
    factor = 1.0 - 0.35 * raw / raw.max() if raw.max() > 0 else np.ones(nz)
    names = ("base", "cord", "gm", "csf", "tissue", "dorsal_horn")
    out = {n: np.zeros(grid.shape, dtype=np.float32) for n in names}
    ci = CORD_INTENSITY
    full = (nx, ny, s, s)
    for k in range(nz):
        # The canal, cord and bone lie within a box around the canal centre: evaluate them
        # there only (outside, their occupancies are below 1e-30).
        ii = np.flatnonzero(np.abs(xs.mean(axis=1) - cx[k]) < _BOX_MM[0])
        jj = np.flatnonzero(np.abs(ys.mean(axis=1) - cy[k]) < _BOX_MM[1])
        box = np.ix_(ii, jj)
        u, v = _rotate(X[ii] - cx[k], Y[:, jj] - cy[k], angle[k])
        a_c, b_c = (d / 2 * scale[k] for d in CORD_DIAMETERS_MM)
        cord_b = _ellipse_inside(u, v, a_c, b_c)
        canal_b = np.maximum(_ellipse_inside(u, v, *(d / 2 for d in CANAL_DIAMETERS_MM)),
                             cord_b)
        parts = []
        for pu, pv, sa, sb, deg in _GM_PARTS:
            ru, rv = _rotate(u - pu * scale[k], v - pv * scale[k], deg)
            parts.append(_ellipse_inside(ru, rv, _GM_SIZE * sa * scale[k],
                                         _GM_SIZE * sb * scale[k]))
        bone_ring = _ellipse_inside(u, v, CANAL_DIAMETERS_MM[0] / 2 + 4.0,
                                    CANAL_DIAMETERS_MM[1] / 2 + 3.5)
        body = _ellipse_inside(u, v - (CANAL_DIAMETERS_MM[1] / 2 + 9.5), 12.0, 8.0)
        cord, canal, gm, dh, bone = (np.zeros(full) for _ in range(5))
        cord[box] = cord_b
        canal[box] = canal_b
        gm[box] = np.max(np.stack(parts), axis=0) * cord_b
        dh[box] = parts[0] * cord_b
        bone[box] = np.clip(np.maximum(bone_ring, body) - canal_b, 0.0, 1.0)
        neck = _ellipse_inside(X - 0.0, Y - 6.0, 56.0, 50.0)
        airway = _ellipse_inside(X - cx[k] * 0.5, Y - (cy[k] + 38.0), 8.0, 5.5) * neck
        texture = 1.0 + sum(wamp[w] * np.sin(kvec[w, 0] * X + kvec[w, 1] * Y + wphase[w])
                            for w in range(4))
        soft = np.clip(neck - canal - bone - airway, 0.0, 1.0)
        csf = canal - cord
        wm = cord - gm
        base = (wm * ci["wm"] + gm * ci["gm"] + csf * ci["csf"] + soft * ci["tissue"] * texture
                + bone * ci["bone"] * texture + airway * ci["airway"])
        for name, arr in (("base", base), ("cord", cord), ("gm", gm), ("csf", csf),
                          ("tissue", soft), ("dorsal_horn", dh)):
            out[name][:, :, k] = arr.mean(axis=(2, 3))
    return CordMaps(base=out["base"], cord=out["cord"], gm=out["gm"], csf=out["csf"],
                    tissue=out["tissue"], dorsal_horn=out["dorsal_horn"],
                    slice_factor=factor, centre_ras=np.column_stack([cx, cy]))
