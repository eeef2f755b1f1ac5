"""Cervical spinal cord phantom and runs: slice-wise motion, physiology, dorsal-horn activation.

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

Signal of slice ``k`` of volume ``t``, acquired at ``tau = t * tr_s + slice_times[k]``
(seconds from volume 0), in the phantom's rest position::

    S = base * f_k * (1 + drift[t]) * (1 + pct/100 * w_dh * h(tau)
                                        + m_card * c(phi_c) + m_resp * r(phi_r)
                                        + m_int * cos(phi_c + phi_r))

with ``w_dh`` the left dorsal-horn weight, ``h`` the block paradigm convolved with the HRF
(canonical SPM peak ~5 s, or ``delayed``: peak ~9 s), ``phi_c``/``phi_r`` the cardiac and
respiratory phases at ``tau`` (:mod:`simulator.physio`), ``c(p) = 0.8 cos(p - 0.6) +
0.4 cos(2 p - 1.9)`` and ``r(p) = cos(p) + 0.3 sin(2 p)``, and the maps ``m_card`` (CSF
pulsation, strong, plus a weaker cord term), ``m_resp`` (cord, CSF and, at half strength,
tissue) and ``m_int`` (CSF). The slice is then translated in-plane by
``slice_shifts[t, k]`` (mm, RAS x and y) with an exact Fourier shift (a linear phase in
k-space, as a translated object gives), and thermal noise is added: magnitude
``|S + sigma (n1 + i n2)|`` (Rician) or ``S + sigma n1``.

Motion (``slice_shifts``, (nt, nz, 2) mm): per slice and volume, locked to the physiology
at the slice's acquisition time: A-P ``resp_shift_mm * g_k * (R(tau) - 0.5)`` (the belt
trace, larger in inferior slices, ``g_k`` from 1 at the bottom to 0.5 at the top) plus
``cardiac_shift_mm * sin(phi_c - 0.4)``; R-L ``lr_fraction`` times the same; plus a few
swallows: in one or two consecutive volumes every slice jumps by about ``swallow_shift_mm``
A-P (a fraction of it R-L), largest mid-neck, then returns exactly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from scipy.special import expit
from scipy.stats import gamma

from simulator.bold import Event, SimulatedVolume, block_events, drift_curve, quantise
from simulator.phantom import Grid
from simulator.scanner import SimulationResult, TruthWriter, deliver, write_events
from simulator.physio import (PhysioTraces, ProgressiveBidsWriter, generate_traces,
                              write_bids_physio, write_siemens_pmu)

__all__ = ["CORD_DIAMETERS_MM", "CANAL_DIAMETERS_MM", "CORD_INTENSITY", "CordMaps",
           "CordPlan", "cord_maps", "slice_order_times", "cord_response", "plan_cord_run",
           "make_cord_plan", "iter_cord_volumes", "expected_slice_tsnr", "run_cord_simulation"]

if TYPE_CHECKING:
    from rtsc.config import SimulatorConfig
    from simulator.scanner import SimulationResult

log = logging.getLogger(__name__)

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


def slice_order_times(nz: int, tr_s: float, order: str = "interleaved") -> np.ndarray:
    """Slice acquisition offsets within the TR (Siemens conventions), seconds, (nz,).

    ``ascending``: 0, 1, ..., nz-1. ``interleaved``: odd slice numbers first when nz is
    even (indices 1, 3, ..., then 0, 2, ...), even first when nz is odd, as Siemens does.
    ``descending``: nz-1 down to 0.
    """
    if order == "ascending":
        sequence = list(range(nz))
    elif order == "descending":
        sequence = list(range(nz - 1, -1, -1))
    elif order == "interleaved":
        first = 1 if nz % 2 == 0 else 0
        sequence = list(range(first, nz, 2)) + list(range(1 - first, nz, 2))
    else:
        raise ValueError(f"slice order {order!r}; allowed: ascending, descending, interleaved")
    times = np.empty(nz)
    times[sequence] = np.arange(nz) * (tr_s / nz)
    return times


def _hrf(kind: str, dt: float) -> np.ndarray:
    """Double-gamma HRF sampled every dt s: spm (peak ~5 s) or delayed (peak ~9 s), sum 1."""
    shapes = {"spm": (6.0, 16.0), "delayed": (10.0, 20.0)}
    if kind not in shapes:
        raise ValueError(f"hrf {kind!r}; allowed: spm, delayed")
    peak, under = shapes[kind]
    t = dt * np.arange(int(40.0 / dt) + 1)
    h = gamma.pdf(t, peak) - gamma.pdf(t, under) / 6.0
    return h / h.sum()


def cord_response(events: list[Event], times_s: np.ndarray, hrf: str = "spm",
                  dt: float = 0.05) -> np.ndarray:
    """Expected BOLD response (peak-normalised to 1 over the run) at arbitrary times.

    Parameters
    ----------
    events : list of (onset_s, duration_s, trial_type)
    times_s : array, seconds from volume 0 (>= 0)
    hrf : ``spm`` or ``delayed``
    dt : fine grid step, seconds

    Returns
    -------
    response : array of times_s's shape
    """
    times = np.asarray(times_s, dtype=np.float64)
    t_end = float(times.max()) + dt if times.size else dt
    fine = dt * np.arange(int(np.ceil(t_end / dt)) + 2)
    box = np.zeros(fine.size)
    for onset, duration, _ in events:
        box[(fine >= onset) & (fine < onset + duration)] = 1.0
    resp = np.convolve(box, _hrf(hrf, dt))[:fine.size]
    peak = resp.max()
    if peak > 0:
        resp = resp / peak
    return np.interp(times, fine, resp)


@dataclass(frozen=True, eq=False)
class CordPlan:
    """Everything that defines a cord run except the noise draws.

    Attributes
    ----------
    grid : Grid
    n_volumes : int
    tr_s : float
    seed : int
        Noise of volume t from ``default_rng([seed, 1, t])``.
    noise_sigma : float
    noise_model : ``rician`` | ``gaussian``
    activation_pct : float
        Peak BOLD change in the dorsal horn, percent.
    hrf : ``spm`` | ``delayed``
    slice_order : str
    slice_times_s : (nz,) float64, offsets within the TR
    acquisition_times_s : (nt, nz) float64, seconds from volume 0 of each slice
    slice_shifts : (nt, nz, 2) float64, mm, RAS x (R-L) and y (A-P)
    swallows : tuple of int, volumes with a swallowing jump
    events : list of (onset_s, duration_s, trial_type)
    response : (nt, nz) float64, task response at each slice time (peak 1)
    drift : (nt,) float64, multiplicative
    cardiac_phase, respiratory_phase : (nt, nz) float64, radians at each slice time
    maps : CordMaps
    physio : PhysioTraces
    amplitudes : dict of the physiological amplitudes (fractions of the signal)
    bandwidth_per_pixel_phase_hz : float
    """

    grid: Grid
    n_volumes: int
    tr_s: float
    seed: int
    noise_sigma: float
    noise_model: str
    activation_pct: float
    hrf: str
    slice_order: str
    slice_times_s: np.ndarray
    acquisition_times_s: np.ndarray
    slice_shifts: np.ndarray
    swallows: tuple[int, ...]
    events: list[Event]
    response: np.ndarray
    drift: np.ndarray
    cardiac_phase: np.ndarray
    respiratory_phase: np.ndarray
    maps: CordMaps
    physio: PhysioTraces
    amplitudes: dict
    bandwidth_per_pixel_phase_hz: float = 17.0

    def masks(self) -> dict[str, np.ndarray]:
        """Hard masks (fraction > 0.5), (nx, ny, nz) bool: cord, gm, csf, dorsal_horn."""
        m = self.maps
        return {"cord": m.cord > 0.5, "gm": m.gm > 0.5, "csf": m.csf > 0.5,
                "dorsal_horn": m.dorsal_horn > 0.5}


def _card_wave(p: np.ndarray) -> np.ndarray:
    return 0.8 * np.cos(p - 0.6) + 0.4 * np.cos(2 * p - 1.9)


def _resp_wave(p: np.ndarray) -> np.ndarray:
    return np.cos(p) + 0.3 * np.sin(2 * p)


def plan_cord_run(grid: Grid, n_volumes: int, tr_s: float, seed: int = 0,
                  noise_sigma: float = 20.0, noise_model: str = "rician",
                  activation_pct: float = 4.0, hrf: str = "spm",
                  slice_order: str = "interleaved", events: list[Event] | None = None,
                  block_s: float = 20.0, drift_pct_per_min: float = 0.3,
                  resp_shift_mm: float = 0.8, cardiac_shift_mm: float = 0.15,
                  lr_fraction: float = 0.25, n_swallows: int = 2,
                  swallow_shift_mm: float = 2.5, heart_bpm: float = 66.0,
                  breaths_per_min: float = 15.0, cardiac_csf: float = 0.08,
                  cardiac_cord: float = 0.03, respiratory: float = 0.025,
                  interaction: float = 0.02, physio_hz: float = 100.0,
                  psf_samples: int = 4, bandwidth_per_pixel_phase_hz: float = 17.0,
                  ) -> CordPlan:
    """Draw a cord run: phantom maps, physiology, slice-wise motion, design (no volume).

    Parameters
    ----------
    grid : Grid
        Axial grid, e.g. ``Grid((128, 128, 24), (1, 1, 5))``.
    n_volumes : int
    tr_s : float, seconds
    seed : int
        Physiology ``[seed, 7]``, motion ``[seed, 8]``, drift ``[seed, 2]``, phantom
        ``[seed, 5]``, noise ``[seed, 1, t]``.
    noise_sigma : float
        Thermal noise SD per channel, intensity units.
    noise_model : ``rician`` | ``gaussian``
    activation_pct : float
        Peak BOLD change in the left dorsal horn, percent.
    hrf : ``spm`` | ``delayed``
    slice_order : ``interleaved`` | ``ascending`` | ``descending``
    events : BIDS-like events or None (blocks of ``block_s`` after 10 s of rest)
    resp_shift_mm, cardiac_shift_mm : float
        Peak-to-peak A-P motion locked to breathing / heartbeat, mm.
    lr_fraction : float
        R-L motion as a fraction of the A-P motion.
    n_swallows : int
        Swallowing jumps (each 1 or 2 volumes).
    swallow_shift_mm : float
        A-P size of a swallowing jump, mm.
    heart_bpm, breaths_per_min : float
    cardiac_csf, cardiac_cord, respiratory, interaction : float
        Physiological signal amplitudes, fractions of the local signal.
    physio_hz : float
        Sampling rate of the physiological traces, Hz.
    psf_samples : int
    bandwidth_per_pixel_phase_hz : float
        Written to the DICOM (Siemens BandwidthPerPixelPhaseEncode).

    Returns
    -------
    CordPlan
    """
    n = int(n_volumes)
    if n < 1 or not tr_s > 0 or noise_sigma < 0:
        raise ValueError("n_volumes >= 1, tr_s > 0 and noise_sigma >= 0 are required")
    if noise_model not in ("rician", "gaussian"):
        raise ValueError(f"noise_model {noise_model!r}; allowed: rician, gaussian")
    nz = grid.shape[2]
    maps = cord_maps(grid, seed, psf_samples)
    times = slice_order_times(nz, tr_s, slice_order)
    acq = np.arange(n)[:, None] * tr_s + times[None, :]
    physio = generate_traces(n * tr_s, tr_s, n, seed, hz=physio_hz, heart_bpm=heart_bpm,
                             breaths_per_min=breaths_per_min)
    card, resp_phase = physio.phases_at(acq)
    belt = physio.respiratory_at(acq)
    zk = np.arange(nz) / max(nz - 1, 1)
    gain = 1.0 - 0.5 * zk  # inferior slices move more with breathing
    rng = np.random.default_rng([seed, 8])
    dy = resp_shift_mm * gain[None, :] * (belt - 0.5) + cardiac_shift_mm / 2 * np.sin(card - 0.4)
    dx = lr_fraction * (resp_shift_mm * gain[None, :] * (belt - 0.5) * 0.7
                        + cardiac_shift_mm / 2 * np.sin(card + 0.9))
    shifts = np.stack([dx, dy], axis=-1)
    swallows: list[int] = []
    if n_swallows > 0 and n > 12:
        candidates = np.arange(8, n - 3)
        picks = np.sort(rng.choice(candidates, size=min(n_swallows, candidates.size),
                                   replace=False))
        profile = 0.6 + 0.4 * np.exp(-((zk - 0.5) / 0.3) ** 2)
        for v in picks:
            if swallows and v <= swallows[-1] + 2:
                continue
            length = int(rng.integers(1, 3))
            size = swallow_shift_mm * rng.uniform(0.85, 1.15)
            for w in range(v, min(v + length, n)):
                shifts[w, :, 1] += size * profile
                shifts[w, :, 0] += lr_fraction * size * profile * rng.choice([-1.0, 1.0])
                swallows.append(int(w))
    if events is None:
        events = block_events(n, tr_s, block_s=block_s)
    response = cord_response(list(events), acq, hrf)
    return CordPlan(
        grid=grid, n_volumes=n, tr_s=float(tr_s), seed=int(seed),
        noise_sigma=float(noise_sigma), noise_model=noise_model,
        activation_pct=float(activation_pct), hrf=hrf, slice_order=slice_order,
        slice_times_s=times, acquisition_times_s=acq, slice_shifts=shifts,
        swallows=tuple(swallows), events=list(events), response=response,
        drift=drift_curve(n, tr_s, drift_pct_per_min, np.random.default_rng([seed, 2])),
        cardiac_phase=card, respiratory_phase=resp_phase, maps=maps, physio=physio,
        amplitudes={"cardiac_csf": cardiac_csf, "cardiac_cord": cardiac_cord,
                    "respiratory": respiratory, "interaction": interaction},
        bandwidth_per_pixel_phase_hz=float(bandwidth_per_pixel_phase_hz))


def _modulation_maps(plan: CordPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m, a = plan.maps, plan.amplitudes
    ny = plan.grid.shape[1]
    # a gentle A-P gradient of the respiratory effect (B0 changes more anteriorly)
    grad = (1.0 + 0.3 * np.linspace(1.0, -1.0, ny))[None, :, None]
    m_card = a["cardiac_csf"] * m.csf + a["cardiac_cord"] * m.cord
    m_resp = a["respiratory"] * (m.cord + m.csf + 0.5 * m.tissue) * grad
    m_int = a["interaction"] * m.csf
    return m_card, m_resp, m_int


def noise_free_signal(plan: CordPlan, t: int, maps: tuple | None = None) -> np.ndarray:
    """Signal of volume t in the rest position (no motion, no noise), (nx, ny, nz) float64."""
    m_card, m_resp, m_int = maps if maps is not None else _modulation_maps(plan)
    pc = plan.cardiac_phase[t][None, None, :]
    pr = plan.respiratory_phase[t][None, None, :]
    mod = (1.0 + plan.activation_pct / 100.0 * plan.maps.dorsal_horn * plan.response[t][None, None, :]
           + m_card * _card_wave(pc) + m_resp * _resp_wave(pr) + m_int * np.cos(pc + pr))
    scale = plan.maps.slice_factor[None, None, :] * (1.0 + plan.drift[t])
    return plan.maps.base * scale * mod


def _fourier_shift(stack: np.ndarray, shift_vox: np.ndarray) -> np.ndarray:
    """Translate each slice of (nx, ny, nz) by (di, dj) voxels (nz, 2): out(i) = in(i - d)."""
    nx, ny, _ = stack.shape
    spec = np.fft.rfft2(stack, axes=(0, 1))
    fi = np.fft.fftfreq(nx)[:, None, None]
    fj = np.fft.rfftfreq(ny)[None, :, None]
    ramp = np.exp(-2j * np.pi * (fi * shift_vox[None, None, :, 0] + fj * shift_vox[None, None, :, 1]))
    return np.fft.irfft2(spec * ramp, s=(nx, ny), axes=(0, 1))


def shifts_to_voxels(grid: Grid, shifts_mm: np.ndarray) -> np.ndarray:
    """RAS (x, y) mm shifts (..., 2) -> voxel (i, j) shifts, using the grid's affine."""
    inv = np.linalg.inv(grid.affine()[:2, :2])
    return shifts_mm @ inv.T


def iter_cord_volumes(plan: CordPlan, start: int = 0,
                      stop: int | None = None) -> Iterator[SimulatedVolume]:
    """Compute the volumes of a cord plan one at a time (volume t depends on t only)."""
    stop = plan.n_volumes if stop is None else min(stop, plan.n_volumes)
    maps = _modulation_maps(plan)
    shape = plan.grid.shape
    for t in range(start, stop):
        signal = noise_free_signal(plan, t, maps)
        vox = shifts_to_voxels(plan.grid, plan.slice_shifts[t])
        if np.any(vox != 0):
            signal = _fourier_shift(signal, vox)
        data = signal.astype(np.float32)
        if plan.noise_sigma > 0:
            rng = np.random.default_rng([plan.seed, 1, t])
            sigma = np.float32(plan.noise_sigma)
            data += sigma * rng.standard_normal(shape, dtype=np.float32)
            if plan.noise_model == "rician":
                imag = sigma * rng.standard_normal(shape, dtype=np.float32)
                data = np.hypot(data, imag)
        data = np.ascontiguousarray(data, dtype=np.float32)
        yield SimulatedVolume(t, data, quantise(data))


def expected_slice_tsnr(plan: CordPlan) -> dict[str, np.ndarray]:
    """Per-slice cord tSNR expected from the model, (nz,) arrays.

    ``thermal``: the median over the slice's cord-mask voxels of
    ``mean_t(S) / noise_sigma`` (thermal noise only, the figure the noise sigma and mean
    give). ``expected``: the median of ``mean_t(S) / sqrt(var_t(S) + noise_sigma**2)``,
    with ``S`` the noise-free signal in the rest position, so it also counts the
    physiological fluctuations, the activation and the drift (what a perfect
    motion correction would leave). ``mean_signal``: the mean of ``mean_t(S)`` over the
    cord voxels; ``n_voxels``: cord-mask voxels per slice.
    """
    cord = plan.maps.cord > 0.5
    nz = plan.grid.shape[2]
    maps = _modulation_maps(plan)
    idx = np.nonzero(cord)
    series = np.empty((plan.n_volumes, idx[0].size))
    for t in range(plan.n_volumes):
        series[t] = noise_free_signal(plan, t, maps)[idx]
    mean = series.mean(axis=0)
    var = series.var(axis=0)
    sigma = max(plan.noise_sigma, 1e-12)
    thermal, expected, mean_sig, counts = (np.full(nz, np.nan) for _ in range(4))
    for k in range(nz):
        sel = idx[2] == k
        counts[k] = sel.sum()
        if sel.any():
            thermal[k] = np.median(mean[sel] / sigma)
            expected[k] = np.median(mean[sel] / np.sqrt(var[sel] + sigma ** 2))
            mean_sig[k] = mean[sel].mean()
    return {"thermal": thermal, "expected": expected, "mean_signal": mean_sig,
            "n_voxels": counts}


# ------------------------------------------------------------------------ simulation

def make_cord_plan(config: SimulatorConfig) -> CordPlan:
    """The cord run described by ``simulator`` (anatomy spinal_cord) and ``simulator.cord``."""
    c = config.cord
    grid = Grid(tuple(c.shape), tuple(c.voxel_size_mm))  # type: ignore[arg-type]
    return plan_cord_run(
        grid, config.n_volumes, c.tr_s, seed=config.seed, noise_sigma=c.noise_sigma,
        activation_pct=c.activation_pct, hrf=c.hrf, slice_order=c.slice_order,
        block_s=c.block_s, resp_shift_mm=c.resp_shift_mm, cardiac_shift_mm=c.cardiac_shift_mm,
        lr_fraction=c.lr_fraction, n_swallows=c.n_swallows,
        swallow_shift_mm=c.swallow_shift_mm, heart_bpm=c.heart_bpm,
        breaths_per_min=c.breaths_per_min, cardiac_csf=c.cardiac_csf,
        cardiac_cord=c.cardiac_cord, respiratory=c.respiratory, interaction=c.interaction,
        physio_hz=c.physio_hz, psf_samples=c.psf_samples,
        bandwidth_per_pixel_phase_hz=c.bandwidth_per_pixel_phase_hz)


PHYSIO_STEM = "sub-sim_task-cord"


class CordTruthWriter(TruthWriter):
    """Writes the ground truth of a cord run (see :func:`run_cord_simulation`): the
    volumes as :class:`~simulator.scanner.TruthWriter` does, and the cord's static truth."""

    def _write_static(self, plan: CordPlan, info: object,  # type: ignore[override]
                      fmt: str) -> None:
        write_cord_truth(self.directory, plan, fmt, getattr(info, "series_uid", ""),
                         float(getattr(info, "start_time", 0.0)))


def write_cord_truth(d: Path, plan: CordPlan, fmt: str = "mosaic", series_uid: str = "",
                     start_time: float = 0.0) -> None:
    """Write the static ground truth of a cord run into directory ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    affine = plan.grid.affine()
    np.save(d / "slice_shifts.npy", plan.slice_shifts)
    for name, mask in plan.masks().items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), d / f"{name}_mask.nii.gz")
    nib.save(nib.Nifti1Image(plan.maps.dorsal_horn.astype(np.float32), affine),
             d / "activation.nii.gz")
    nib.save(nib.Nifti1Image(plan.maps.cord.astype(np.float32), affine),
             d / "cord_fraction.nii.gz")
    rows = ["slice\ttime_s"] + [f"{k}\t{t:.9g}" for k, t in enumerate(plan.slice_times_s)]
    (d / "slice_times.tsv").write_text("\n".join(rows) + "\n")
    tsnr = expected_slice_tsnr(plan)
    rows = ["slice\ttsnr_expected\ttsnr_thermal\tmean_signal\tn_voxels"]
    rows += [f"{k}\t{tsnr['expected'][k]:.9g}\t{tsnr['thermal'][k]:.9g}\t"
             f"{tsnr['mean_signal'][k]:.9g}\t{int(tsnr['n_voxels'][k])}"
             for k in range(plan.grid.shape[2])]
    (d / "slice_tsnr.tsv").write_text("\n".join(rows) + "\n")
    p = plan.physio
    np.savez_compressed(d / "physio_truth.npz", times_s=p.times_s, cardiac=p.cardiac,
                        respiratory=p.respiratory, trigger=p.trigger,
                        cardiac_phase=p.cardiac_phase, respiratory_phase=p.respiratory_phase,
                        beats_s=p.beats_s, slice_cardiac_phase=plan.cardiac_phase,
                        slice_respiratory_phase=plan.respiratory_phase)
    write_events(plan.events, d / "events.tsv")
    rows = ["task\tdrift"] + [f"{r:.9g}\t{dr:.9g}" for r, dr in
                              zip(plan.response.mean(axis=1), plan.drift)]
    (d / "design.tsv").write_text("\n".join(rows) + "\n")
    meta = {
        "anatomy": "spinal_cord", "shape": list(plan.grid.shape),
        "voxel_size_mm": list(plan.grid.voxel_size_mm), "affine_ras": affine.tolist(),
        "tr_s": plan.tr_s, "n_volumes": plan.n_volumes, "seed": plan.seed,
        "noise_sigma": plan.noise_sigma, "noise_model": plan.noise_model,
        "activation_pct": plan.activation_pct, "hrf": plan.hrf, "format": fmt,
        "slice_order": plan.slice_order, "slice_times_s": plan.slice_times_s.tolist(),
        "swallow_volumes": list(plan.swallows), "amplitudes": plan.amplitudes,
        "slice_factor": plan.maps.slice_factor.tolist(),
        "canal_centre_ras_mm": plan.maps.centre_ras.tolist(),
        "phase_encoding": "COL (A-P)",
        "bandwidth_per_pixel_phase_hz": plan.bandwidth_per_pixel_phase_hz,
        "physio_hz": plan.physio.hz, "physio_start_s": plan.physio.start_s,
        "series_instance_uid": series_uid, "start_time": start_time,
        "slice_shifts_convention": "slice_shifts.npy (nt, nz, 2) mm, RAS x (R-L) and y "
                                   "(A-P): tissue at p in the masks' rest position is at "
                                   "p + shift in that slice of that volume",
    }
    (d / "truth.json").write_text(json.dumps(meta, indent=2))


def _cord_datasets(plan: CordPlan, info: object, fmt: str, truth: CordTruthWriter | None,
                   progressive: ProgressiveBidsWriter | None) -> Iterator[list[Dataset]]:
    from simulator.dicom_writer import volume_to_mosaic, volume_to_slices
    from simulator.multiframe_writer import volumes_to_multiframe

    affine = plan.grid.affine()
    for volume in iter_cord_volumes(plan):
        if truth is not None:
            truth.add(volume.index, volume.data, volume.quantised)
        if progressive is not None:  # physiology up to the end of this volume
            progressive.advance((volume.index + 1) * plan.tr_s)
        if fmt == "mosaic":
            yield [volume_to_mosaic(volume.quantised, affine, info, volume.index)]
        elif fmt == "multiframe":
            yield [volumes_to_multiframe(volume.quantised, affine, info, volume.index)]
        else:
            yield volume_to_slices(volume.quantised, affine, info, volume.index)


def run_cord_simulation(config: SimulatorConfig, out_dir: str | Path | None = None,
                        send_to: tuple[str, int] | None = None, called_ae: str = "RTSC",
                        truth_dir: str | Path | None = None, series_number: int = 1,
                        physio_dir: str | Path | None = None) -> SimulationResult:
    """Simulate one spinal cord series (``simulator.anatomy: spinal_cord``).

    As :func:`simulator.scanner.run_simulation`; in addition the physiology is written
    to ``physio_dir`` (default ``out_dir/physio``, or ``<truth_dir>/physio`` when
    sending): ``sub-sim_task-cord_physio.tsv.gz`` + ``.json`` (BIDS) and
    ``sub-sim_task-cord.puls`` / ``.resp`` (Siemens PMU). With
    ``simulator.cord.physio_progressive`` the BIDS samples are also appended to
    ``sub-sim_task-cord_physio.tsv`` while the volumes are produced (up to the end of
    each volume just before it is sent or written).
    """
    from simulator.dicom_series import new_series_info

    if (out_dir is None) == (send_to is None):
        raise ValueError("give exactly one of out_dir and send_to")
    t0 = time.time()
    plan = make_cord_plan(config)
    info = new_series_info(series_number, plan.tr_s, n_volumes=plan.n_volumes, start_time=t0,
                           slice_times_s=tuple(float(x) for x in plan.slice_times_s),
                           series_description="ep2d_bold_cord_sim", te_s=0.040,
                           bandwidth_per_pixel_phase_hz=plan.bandwidth_per_pixel_phase_hz)
    if out_dir is not None:
        dicom_dir: Path | None = Path(out_dir) / "dicom"
        truth_path = Path(truth_dir) if truth_dir else Path(out_dir) / "truth"
        physio_path = Path(physio_dir) if physio_dir else Path(out_dir) / "physio"
    else:
        dicom_dir = None
        truth_path = Path(truth_dir) if truth_dir else \
            Path("simulator-runs") / time.strftime("%Y%m%d-%H%M%S")
        physio_path = Path(physio_dir) if physio_dir else truth_path / "physio"
    truth = CordTruthWriter(truth_path, plan, info, config.format)
    (truth_path / "injected.json").write_text(json.dumps({
        "swallows": list(plan.swallows),
        "delays_s": {str(k): v for k, v in config.delays_s.items()},
        "dropped": sorted(config.drop_volumes)}, indent=2))
    progressive = (ProgressiveBidsWriter(plan.physio, physio_path, PHYSIO_STEM)
                   if config.cord.physio_progressive else None)
    stream = _cord_datasets(plan, info, config.format, truth, progressive)
    try:
        n_files, failures, files = deliver(stream, config, plan.tr_s, send_to, called_ae,
                                           dicom_dir)
    finally:
        truth.close()
        if progressive is not None:
            progressive.finish()
        write_bids_physio(plan.physio, physio_path, PHYSIO_STEM)
        write_siemens_pmu(plan.physio, physio_path, PHYSIO_STEM, t0)
    return SimulationResult(plan.n_volumes, n_files, truth_path, dicom_dir, send_to is not None,
                            info.series_uid, time.time() - t0, failures, files)
