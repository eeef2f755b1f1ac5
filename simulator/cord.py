"""Spinal cord runs: slice-wise motion, physiology, dorsal-horn activation, volume by volume.

The phantom at rest is :mod:`simulator.cord_phantom`'s; the whole run (files, DICOM,
truth) is :mod:`simulator.cord_run`'s.

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

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.stats import gamma

from rtsc.config import SimulatorConfig
from simulator.bold import Event, SimulatedVolume, block_events, drift_curve, quantise
from simulator.cord_phantom import CordMaps, cord_maps
from simulator.phantom import Grid
from simulator.physio import PhysioTraces, generate_traces

__all__ = ["CordPlan", "slice_order_times", "cord_response", "plan_cord_run",
           "iter_cord_volumes", "noise_free_signal", "expected_slice_tsnr"]


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


def plan_cord_run(config: SimulatorConfig, events: list[Event] | None = None,
                  noise_model: str = "rician", drift_pct_per_min: float = 0.3) -> CordPlan:
    """Draw a cord run: phantom maps, physiology, slice-wise motion, design (no volume).

    Parameters
    ----------
    config : SimulatorConfig
        ``n_volumes`` and ``seed`` from the ``simulator`` section, the rest from its
        ``cord`` section (:class:`rtsc.config.CordSimConfig`: matrix and voxel size, TR,
        slice order, noise, activation and HRF, block length, the physiology-locked and
        swallowing motion, heart and breathing rates, the physiological amplitudes, the
        physiology's sampling rate, partial-volume sub-samples, the phase-encoding
        bandwidth written to the DICOM). The seed draws the physiology ``[seed, 7]``,
        motion ``[seed, 8]``, drift ``[seed, 2]``, phantom ``[seed, 5]`` and noise
        ``[seed, 1, t]``.
    events : BIDS-like events or None (blocks of ``cord.block_s`` after 10 s of rest)
    noise_model : ``rician`` | ``gaussian``
    drift_pct_per_min : float
        Slow signal drift, percent per minute.

    Returns
    -------
    CordPlan
    """
    c = config.cord
    grid = Grid(tuple(c.shape), tuple(c.voxel_size_mm))  # type: ignore[arg-type]
    n = int(config.n_volumes)
    if n < 1 or not c.tr_s > 0 or c.noise_sigma < 0:
        raise ValueError("simulator.n_volumes >= 1, simulator.cord.tr_s > 0 and "
                         "simulator.cord.noise_sigma >= 0 are required")
    if noise_model not in ("rician", "gaussian"):
        raise ValueError(f"noise_model {noise_model!r}; allowed: rician, gaussian")
    nz = grid.shape[2]
    maps = cord_maps(grid, config.seed, c.psf_samples)
    times = slice_order_times(nz, c.tr_s, c.slice_order)
    acq = np.arange(n)[:, None] * c.tr_s + times[None, :]
    physio = generate_traces(n * c.tr_s, c.tr_s, n, config.seed, hz=c.physio_hz,
                             heart_bpm=c.heart_bpm, breaths_per_min=c.breaths_per_min)
    card, resp_phase = physio.phases_at(acq)
    belt = physio.respiratory_at(acq)
    zk = np.arange(nz) / max(nz - 1, 1)
    gain = 1.0 - 0.5 * zk  # inferior slices move more with breathing
    rng = np.random.default_rng([config.seed, 8])
    dy = (c.resp_shift_mm * gain[None, :] * (belt - 0.5)
          + c.cardiac_shift_mm / 2 * np.sin(card - 0.4))
    dx = c.lr_fraction * (c.resp_shift_mm * gain[None, :] * (belt - 0.5) * 0.7
                          + c.cardiac_shift_mm / 2 * np.sin(card + 0.9))
    shifts = np.stack([dx, dy], axis=-1)
    swallows: list[int] = []
    if c.n_swallows > 0 and n > 12:
        candidates = np.arange(8, n - 3)
        picks = np.sort(rng.choice(candidates, size=min(c.n_swallows, candidates.size),
                                   replace=False))
        profile = 0.6 + 0.4 * np.exp(-((zk - 0.5) / 0.3) ** 2)
        for v in picks:
            if swallows and v <= swallows[-1] + 2:
                continue
            length = int(rng.integers(1, 3))
            size = c.swallow_shift_mm * rng.uniform(0.85, 1.15)
            for w in range(v, min(v + length, n)):
                shifts[w, :, 1] += size * profile
                shifts[w, :, 0] += c.lr_fraction * size * profile * rng.choice([-1.0, 1.0])
                swallows.append(int(w))
    if events is None:
        events = block_events(n, c.tr_s, block_s=c.block_s)
    response = cord_response(list(events), acq, c.hrf)
    return CordPlan(
        grid=grid, n_volumes=n, tr_s=float(c.tr_s), seed=int(config.seed),
        noise_sigma=float(c.noise_sigma), noise_model=noise_model,
        activation_pct=float(c.activation_pct), hrf=c.hrf, slice_order=c.slice_order,
        slice_times_s=times, acquisition_times_s=acq, slice_shifts=shifts,
        swallows=tuple(swallows), events=list(events), response=response,
        drift=drift_curve(n, c.tr_s, drift_pct_per_min,
                          np.random.default_rng([config.seed, 2])),
        cardiac_phase=card, respiratory_phase=resp_phase, maps=maps, physio=physio,
        amplitudes={"cardiac_csf": c.cardiac_csf, "cardiac_cord": c.cardiac_cord,
                    "respiratory": c.respiratory, "interaction": c.interaction},
        bandwidth_per_pixel_phase_hz=float(c.bandwidth_per_pixel_phase_hz))


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
    response = plan.response[t][None, None, :]
    mod = (1.0 + plan.activation_pct / 100.0 * plan.maps.dorsal_horn * response
           + m_card * _card_wave(pc) + m_resp * _resp_wave(pr) + m_int * np.cos(pc + pr))
    scale = plan.maps.slice_factor[None, None, :] * (1.0 + plan.drift[t])
    return plan.maps.base * scale * mod


def _fourier_shift(stack: np.ndarray, shift_vox: np.ndarray) -> np.ndarray:
    """Translate each slice of (nx, ny, nz) by (di, dj) voxels (nz, 2): out(i) = in(i - d)."""
    nx, ny, _ = stack.shape
    spec = np.fft.rfft2(stack, axes=(0, 1))
    fi = np.fft.fftfreq(nx)[:, None, None]
    fj = np.fft.rfftfreq(ny)[None, :, None]
    ramp = np.exp(-2j * np.pi * (fi * shift_vox[None, None, :, 0]
                                 + fj * shift_vox[None, None, :, 1]))
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
