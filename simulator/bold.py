"""BOLD time series model: HRF, block design, and a moving, activated, noisy phantom.

Signal model, volume ``t`` (acquired at ``t * tr_s`` seconds), voxel centre ``y``
(RAS+ mm)::

    x = moved_coordinates(y, motion[t], c)            # c: centre of the grid
    S = phantom(x) * (1 + pct/100 * activation(x) * regressor[t]) * (1 + drift[t])
    data = |S + sigma * (n1 + i n2)|                   # noise_model "rician" (default)
    data = S + sigma * n1                              # noise_model "gaussian"

with ``n1``, ``n2`` independent standard normal per voxel and volume. The default is
magnitude (Rician) noise, as in the magnitude images a scanner sends: the background
then holds Rayleigh noise of mean ``sigma * sqrt(pi / 2)`` instead of negative values,
and the brain (S >> sigma) sees nearly Gaussian noise of standard deviation sigma.
``quantised`` is ``clip(rint(data), 0, 32767)`` as int16, what a DICOM writer stores.

The activation moves with the head (it is sampled at ``x``), so ``activation`` in
:class:`BoldRun` is the ground truth in the reference (volume 0) grid. Volume 0 has
zero motion when the trajectory comes from :func:`~simulator.motion.motion_trajectory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from scipy.stats import gamma

from rtsc.conventions import rotation_matrix

from .motion import motion_trajectory, moved_coordinates
from .phantom import BrainPhantom, Grid

__all__ = [
    "Event",
    "spm_hrf",
    "block_events",
    "regressor",
    "drift_curve",
    "RunPlan",
    "SimulatedVolume",
    "BoldRun",
    "plan_run",
    "iter_volumes",
    "quantise",
    "simulate_run",
]

#: (onset_s, duration_s, trial_type), seconds from the start of volume 0.
Event = tuple[float, float, str]

_NOISE_MODELS = ("rician", "gaussian")
_INT16_MAX = 32767


def spm_hrf(tr_s: float, oversampling: int = 16, time_length: float = 32.0) -> np.ndarray:
    """SPM canonical haemodynamic response function (double gamma).

    ``h(t) = g(t; 6) - g(t; 16) / 6`` with ``g(t; k)`` the gamma density of shape
    ``k`` and scale 1 s: the response peaks near 5 s and undershoots near 15 s.

    Parameters
    ----------
    tr_s : float
        Repetition time, seconds.
    oversampling : int
        Samples per TR: the HRF is sampled every ``tr_s / oversampling`` seconds
        (``oversampling=1`` gives one sample per TR).
    time_length : float
        Duration covered, seconds (samples at ``0, dt, ..., <= time_length``).

    Returns
    -------
    hrf : (n,) float64
        Normalised to sum 1; ``hrf[i]`` is the response at ``i * tr_s / oversampling``.
    """
    if not tr_s > 0 or int(oversampling) < 1 or not time_length > 0:
        raise ValueError("tr_s and time_length must be > 0 and oversampling >= 1")
    dt = tr_s / int(oversampling)
    t = dt * np.arange(int(np.floor(time_length / dt + 1e-9)) + 1)
    hrf = gamma.pdf(t, 6.0) - gamma.pdf(t, 16.0) / 6.0
    return hrf / hrf.sum()


def block_events(
    n_volumes: int, tr_s: float, block_s: float = 20.0, first_rest_s: float = 10.0
) -> list[Event]:
    """Alternating rest/task blocks covering a run.

    Parameters
    ----------
    n_volumes : int
        Number of volumes; the run lasts ``n_volumes * tr_s`` seconds.
    tr_s : float
        Repetition time, seconds.
    block_s : float
        Length of each task block and each rest block, seconds.
    first_rest_s : float
        Rest before the first task block, seconds.

    Returns
    -------
    events : list of (onset_s, duration_s, "task")
        Task blocks only (rest is implicit), onsets ``first_rest_s + 2 * k * block_s``;
        the last block is cut at the end of the run.
    """
    if not block_s > 0 or first_rest_s < 0 or not tr_s > 0:
        raise ValueError("block_s and tr_s must be > 0 and first_rest_s >= 0")
    run_s = n_volumes * tr_s
    events: list[Event] = []
    onset = float(first_rest_s)
    while onset < run_s:
        events.append((onset, float(min(block_s, run_s - onset)), "task"))
        onset += 2.0 * block_s
    return events


def regressor(
    events: list[Event], n_volumes: int, tr_s: float, trial_type: str | None = None
) -> np.ndarray:
    """Expected BOLD response: events convolved with :func:`spm_hrf`.

    Computed on a grid of ``tr_s / 16`` seconds and sampled at the acquisition
    times ``t = n * tr_s``.

    Parameters
    ----------
    events : list of (onset_s, duration_s, trial_type)
        Seconds from the start of volume 0.
    n_volumes : int
    tr_s : float
        Repetition time, seconds.
    trial_type : str or None
        Use only events of this type (all events if None).

    Returns
    -------
    reg : (n_volumes,) float64
        Peak-normalised to a maximum of 1 (all zeros if there are no events).
    """
    oversampling = 16
    dt = tr_s / oversampling
    hrf = spm_hrf(tr_s, oversampling)
    n_fine = n_volumes * oversampling
    t_fine = dt * np.arange(n_fine)
    box = np.zeros(n_fine)
    for onset, duration, kind in events:
        if trial_type is not None and kind != trial_type:
            continue
        box[(t_fine >= onset) & (t_fine < onset + duration)] = 1.0
    reg = np.convolve(box, hrf)[:n_fine:oversampling]
    peak = reg.max() if reg.size else 0.0
    return reg / peak if peak > 0 else reg


def drift_curve(
    n_volumes: int, tr_s: float, pct_per_min: float, rng: np.random.Generator
) -> np.ndarray:
    """Slow multiplicative signal drift: linear plus a random quadratic bend.

    Parameters
    ----------
    n_volumes : int
    tr_s : float
        Repetition time, seconds.
    pct_per_min : float
        Mean drift rate, percent of the signal per minute.
    rng : numpy.random.Generator
        Draws the bend ``q`` in [-0.3, 0.3].

    Returns
    -------
    drift : (n_volumes,) float64
        Fraction of the baseline (0.01 = 1 %): with ``tau = t / t_last``,
        ``pct/100 * t_last/60 * (tau + q * (tau**2 - tau))``; zero at the first volume,
        ``pct/100`` per minute on average over the run.
    """
    q = rng.uniform(-0.3, 0.3)
    if n_volumes < 2:
        return np.zeros(n_volumes)
    t_last = (n_volumes - 1) * tr_s
    tau = np.arange(n_volumes) * tr_s / t_last
    return pct_per_min / 100.0 * t_last / 60.0 * (tau + q * (tau * tau - tau))


@dataclass(frozen=True, eq=False)
class RunPlan:
    """Everything that defines a simulated run except the per-volume noise draws.

    Attributes
    ----------
    grid : Grid
    n_volumes : int
    tr_s : float
        Seconds.
    seed : int
        Noise of volume ``t`` comes from ``default_rng([seed, 1, t])``.
    noise_sigma : float
        Standard deviation of each noise channel, intensity units.
    noise_model : str
        ``"rician"`` or ``"gaussian"``.
    activation_pct : float
        Peak signal change in fully activated tissue, percent.
    motion : (n_volumes, 6) float64
        trans (mm), rot (radians) per volume.
    events : list of (onset_s, duration_s, trial_type)
    regressor : (n_volumes,) float64
        Peak 1.
    drift : (n_volumes,) float64
        Multiplicative drift, fraction.
    phantom : BrainPhantom
    psf_samples : int
        Sub-samples per axis averaged into each voxel (see :func:`voxel_average`).
    spikes : tuple of (volume, slice, amplitude)
        k-space spikes: the slice gets ``amplitude * exp(i phi)`` added to its complex
        signal before the magnitude, ``phi = 2 pi (kx i / nx + ky j / ny)`` with the
        spatial frequency (kx, ky) drawn from ``default_rng([seed, 3, volume, slice])``
        (the image of a single bright k-space point); additive for Gaussian noise.
    """

    grid: Grid
    n_volumes: int
    tr_s: float
    seed: int
    noise_sigma: float
    noise_model: str
    activation_pct: float
    motion: np.ndarray
    events: list[Event]
    regressor: np.ndarray
    drift: np.ndarray
    phantom: BrainPhantom
    psf_samples: int = 2
    spikes: tuple[tuple[int, int, float], ...] = ()


class SimulatedVolume(NamedTuple):
    """One simulated volume.

    Attributes
    ----------
    index : int
        0-based volume index (acquired at ``index * tr_s`` seconds).
    data : (nx, ny, nz) float32
        Signal plus noise, before quantisation.
    quantised : (nx, ny, nz) int16
        ``clip(rint(data), 0, 32767)``.
    """

    index: int
    data: np.ndarray
    quantised: np.ndarray


@dataclass(eq=False)
class BoldRun:
    """A simulated run with its ground truth.

    Attributes
    ----------
    data : (nx, ny, nz, nt) float32
        Signal plus noise, before quantisation.
    quantised : (nx, ny, nz, nt) int16
        ``clip(rint(data), 0, 32767)``.
    affine : (4, 4) float64, voxel -> RAS+ mm
    motion : (nt, 6) float64
        trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians),
        :mod:`rtsc.conventions` (head displacement from volume 0, rotations about the grid centre).
    activation : (nx, ny, nz) float32
        Activation weight in [0, 1] in the reference (volume 0) grid.
    activation_mask : (nx, ny, nz) bool
        ``activation > 0.5``.
    brain_mask : (nx, ny, nz) bool
        Inside the pial surface, reference grid.
    regressor : (nt,) float64
        HRF-convolved task regressor at the acquisition times, peak 1.
    events : list of (onset_s, duration_s, trial_type)
    tr_s : float
        Seconds.
    noise_sigma : float
    drift : (nt,) float64
        Multiplicative drift, fraction of the baseline.
    noise_model : str
    activation_pct : float
    seed : int
    grid : Grid
    """

    data: np.ndarray
    quantised: np.ndarray
    affine: np.ndarray
    motion: np.ndarray
    activation: np.ndarray
    activation_mask: np.ndarray
    brain_mask: np.ndarray
    regressor: np.ndarray
    events: list[Event]
    tr_s: float
    noise_sigma: float
    drift: np.ndarray
    noise_model: str = "rician"
    activation_pct: float = 3.0
    seed: int = 0
    grid: Grid | None = None


def plan_run(
    grid: Grid,
    n_volumes: int,
    tr_s: float,
    seed: int = 0,
    noise_sigma: float = 10.0,
    activation_pct: float = 3.0,
    drift_pct_per_min: float = 0.5,
    motion: np.ndarray | None = None,
    motion_kwargs: dict | None = None,
    phantom: BrainPhantom | None = None,
    events: list[Event] | None = None,
    noise_model: str = "rician",
    psf_samples: int = 2,
    spikes: tuple[tuple[int, int, float], ...] | list = (),
) -> RunPlan:
    """Draw the motion, drift and design of a run (cheap; no volume is computed).

    Parameters are those of :func:`simulate_run`.

    Returns
    -------
    plan : RunPlan
    """
    n = int(n_volumes)
    if n < 1:
        raise ValueError(f"n_volumes must be >= 1, got {n_volumes!r}")
    if not tr_s > 0:
        raise ValueError(f"tr_s must be > 0, got {tr_s!r}")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
    if noise_model not in _NOISE_MODELS:
        raise ValueError(f"noise_model must be one of {_NOISE_MODELS}, got {noise_model!r}")
    if motion is None:
        motion_rng = np.random.default_rng([seed, 0])
        motion = motion_trajectory(n, tr_s, motion_rng, **(motion_kwargs or {}))
    else:
        motion = np.array(motion, dtype=np.float64)
        if motion.shape != (n, 6):
            raise ValueError(f"motion must have shape ({n}, 6), got {motion.shape}")
    if events is None:
        events = block_events(n, tr_s)
    return RunPlan(
        grid=grid,
        n_volumes=n,
        tr_s=float(tr_s),
        seed=int(seed),
        noise_sigma=float(noise_sigma),
        noise_model=noise_model,
        activation_pct=float(activation_pct),
        motion=motion,
        events=list(events),
        regressor=regressor(events, n, tr_s),
        drift=drift_curve(n, tr_s, drift_pct_per_min, np.random.default_rng([seed, 2])),
        phantom=phantom if phantom is not None else BrainPhantom(seed),
        psf_samples=int(psf_samples),
        spikes=tuple((int(v), int(k), float(a)) for v, k, a in spikes),
    )


def spike_pattern(plan: RunPlan, volume: int, k: int) -> np.ndarray:
    """The unit complex grating of the spike at (volume, slice k): (nx, ny) complex128."""
    nx, ny, _ = plan.grid.shape
    rng = np.random.default_rng([plan.seed, 3, volume, k])
    kx = int(rng.integers(2, max(nx // 2, 3)))
    ky = int(rng.integers(2, max(ny // 2, 3)))
    phase = 2 * np.pi * (kx * np.arange(nx)[:, None] / nx + ky * np.arange(ny)[None, :] / ny)
    return np.exp(1j * phase)


def voxel_average(phantom: BrainPhantom, xyz_head: np.ndarray, affine: np.ndarray,
                  params: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and activation integrated over each voxel (a box point-spread function).

    A real MR voxel value integrates the object over the voxel (slice profile, k-space
    band limit); sampling sharp edges at voxel centres only would alias in a way no
    scanner does. ``samples`` points per axis, evenly spaced inside each voxel, are
    averaged (1: centre sampling).

    Parameters
    ----------
    phantom : BrainPhantom
    xyz_head : (n, 3) float64, voxel centres already mapped into the head's frame, mm
    affine : (4, 4) voxel -> RAS of the acquisition grid
    params : (6,) motion of this volume (the sub-voxel offsets rotate with the head)
    samples : int, sub-samples per axis

    Returns
    -------
    intensity : (n,) float64, voxel mean of the intensity I
    activation : (n,) float64, effective weight mean(I w) / mean(I), so that
        ``intensity * (1 + a * activation)`` is the voxel mean of ``I (1 + a w)``
    """
    if samples <= 1:
        return phantom.sample(xyz_head)
    offsets_vox = (np.arange(samples) + 0.5) / samples - 0.5
    # Offsets are fixed in the scanner frame; in the head frame they turn with R^T.
    to_head = rotation_matrix(*params[3:]).T @ affine[:3, :3]
    base = np.zeros(len(xyz_head))
    act = np.zeros(len(xyz_head))
    for dx in offsets_vox:
        for dy in offsets_vox:
            for dz in offsets_vox:
                b, a = phantom.sample(xyz_head + to_head @ np.array([dx, dy, dz]))
                base += b
                act += a * b
    n = samples ** 3
    base /= n
    act /= n
    np.divide(act, base, out=act, where=base > 0)
    act[base <= 0] = 0.0
    return base, act


def quantise(data: np.ndarray) -> np.ndarray:
    """``clip(rint(data), 0, 32767)`` as int16, same shape."""
    return np.clip(np.rint(data), 0, _INT16_MAX).astype(np.int16)


def iter_volumes(
    plan: RunPlan, start: int = 0, stop: int | None = None
) -> Iterator[SimulatedVolume]:
    """Compute the volumes of a plan one at a time.

    Volume ``t`` depends only on the plan and ``t`` (its noise comes from
    ``default_rng([plan.seed, 1, t])``), so any range can be produced independently.

    Parameters
    ----------
    plan : RunPlan
    start, stop : int
        Volume range ``[start, stop)``; ``stop=None`` means the end of the run.

    Yields
    ------
    volume : SimulatedVolume
        ``(index, data (nx, ny, nz) float32, quantised (nx, ny, nz) int16)``.
    """
    grid = plan.grid
    stop = plan.n_volumes if stop is None else min(stop, plan.n_volumes)
    y = grid.ras_coordinates()
    c = grid.center_ras()
    scale = plan.activation_pct / 100.0
    last_params: np.ndarray | None = None
    base = act = None
    for t in range(start, stop):
        params = plan.motion[t]
        if last_params is None or not np.array_equal(params, last_params):
            base, act = voxel_average(plan.phantom, moved_coordinates(y, params, c),
                                      grid.affine(), params, plan.psf_samples)
            last_params = params
        signal = base * (1.0 + scale * plan.regressor[t] * act)
        signal *= 1.0 + plan.drift[t]
        data = signal.astype(np.float32)
        imag = None
        if plan.noise_sigma > 0:
            rng = np.random.default_rng([plan.seed, 1, t])
            sigma = np.float32(plan.noise_sigma)
            data += sigma * rng.standard_normal(data.shape, dtype=np.float32)
            if plan.noise_model == "rician":
                imag = sigma * rng.standard_normal(data.shape, dtype=np.float32)
        spikes = [(k, a) for v, k, a in plan.spikes if v == t]
        if spikes:
            data = data.reshape(grid.shape)
            if plan.noise_model == "rician":
                imag = np.zeros_like(data) if imag is None else imag.reshape(grid.shape)
            for k, amplitude in spikes:
                grating = amplitude * spike_pattern(plan, t, k)
                data[:, :, k] += grating.real.astype(np.float32)
                if imag is not None:
                    imag[:, :, k] += grating.imag.astype(np.float32)
        if imag is not None:
            data = np.hypot(data.reshape(-1), imag.reshape(-1))
        data = data.reshape(grid.shape)
        yield SimulatedVolume(t, data, quantise(data))


def simulate_run(
    grid: Grid,
    n_volumes: int,
    tr_s: float,
    seed: int = 0,
    noise_sigma: float = 10.0,
    activation_pct: float = 3.0,
    drift_pct_per_min: float = 0.5,
    motion: np.ndarray | None = None,
    motion_kwargs: dict | None = None,
    phantom: BrainPhantom | None = None,
    events: list[Event] | None = None,
    noise_model: str = "rician",
    psf_samples: int = 2,
) -> BoldRun:
    """Simulate a whole BOLD run in memory (see the module docstring for the model).

    For long runs on large grids (128 x 128 x 72 x 300 is 1.4 GB of float32) use
    :func:`plan_run` and :func:`iter_volumes` instead.

    Parameters
    ----------
    grid : Grid
        Acquisition grid (also the reference grid; rotations about its centre).
    n_volumes : int
    tr_s : float
        Repetition time, seconds.
    seed : int
        Seeds motion (``default_rng([seed, 0])``), drift (``[seed, 2]``), noise
        (``[seed, 1, t]``) and the default phantom's texture.
    noise_sigma : float
        Noise standard deviation per channel, intensity units (0: noiseless).
    activation_pct : float
        Peak BOLD change in fully activated tissue, percent of baseline.
    drift_pct_per_min : float
        Mean multiplicative drift, percent per minute.
    motion : (n_volumes, 6) array or None
        Explicit trans (mm) / rot (radians) per volume (e.g. zeros for no motion);
        None draws :func:`~simulator.motion.motion_trajectory`.
    motion_kwargs : dict or None
        Keyword arguments for :func:`~simulator.motion.motion_trajectory`.
    phantom : BrainPhantom or None
        Default ``BrainPhantom(seed)``.
    events : list of (onset_s, duration_s, trial_type) or None
        Default :func:`block_events` (20 s task / 20 s rest after 10 s rest).
    noise_model : {"rician", "gaussian"}
        Magnitude noise ``|S + sigma (n1 + i n2)|`` or additive ``S + sigma n1``.
    psf_samples : int
        Sub-samples per axis averaged into each voxel (2: 8 per voxel; 1: centres only).

    Returns
    -------
    run : BoldRun
    """
    plan = plan_run(
        grid,
        n_volumes,
        tr_s,
        seed=seed,
        noise_sigma=noise_sigma,
        activation_pct=activation_pct,
        drift_pct_per_min=drift_pct_per_min,
        motion=motion,
        motion_kwargs=motion_kwargs,
        phantom=phantom,
        events=events,
        noise_model=noise_model,
        psf_samples=psf_samples,
    )
    shape4 = grid.shape + (plan.n_volumes,)
    data = np.empty(shape4, dtype=np.float32)
    quantised = np.empty(shape4, dtype=np.int16)
    for vol in iter_volumes(plan):
        data[..., vol.index] = vol.data
        quantised[..., vol.index] = vol.quantised
    y = grid.ras_coordinates()
    activation = plan.phantom.activation(y).reshape(grid.shape).astype(np.float32)
    return BoldRun(
        data=data,
        quantised=quantised,
        affine=grid.affine(),
        motion=plan.motion,
        activation=activation,
        activation_mask=activation > 0.5,
        brain_mask=plan.phantom.brain_mask(y).reshape(grid.shape),
        regressor=plan.regressor,
        events=plan.events,
        tr_s=plan.tr_s,
        noise_sigma=plan.noise_sigma,
        drift=plan.drift,
        noise_model=plan.noise_model,
        activation_pct=plan.activation_pct,
        seed=plan.seed,
        grid=grid,
    )
