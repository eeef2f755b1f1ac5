"""Spinal cord quality control: cord-mask tSNR and signal per slice, cord DVARS, a
per-slice dropout monitor and the apparent motion along the phase-encoding axis.

Step functions over explicit states (tests call them directly); :class:`CordQcStage`
holds them for the pipeline, after slice-wise motion correction.

- **tSNR per slice** (:func:`cord_tsnr_init`, :func:`cord_tsnr_step`): Welford's
  running mean and sum of squared deviations of every cord-mask voxel (vectorised over
  the few hundred cord voxels); a slice's figure is the median over its cord voxels of
  the voxel tSNR, mean / SD (n - 1 degrees of freedom). ``slice_signal`` is the mean over a
  slice's cord voxels of the volume.
- **Dropout** (:func:`dropout_step`): each slice's cord signal against the median of
  its own last ``window`` unflagged values (cord slices differ by up to 35% in
  intensity, so never across slices); below ``1 - fraction`` of it flags the slice.
- **Phase encoding**: breathing changes B0 at the neck, which moves the image along the
  phase-encoding axis by (offset Hz) / (bandwidth per pixel Hz) pixels. The
  slice-wise translations' component along that axis is reported per slice, and its
  respiration-correlated part over the last ``resp_window`` volumes: every slice is a
  sample at its own acquisition time, so the pooled samples (each slice's mean removed)
  resolve breathing even when the TR alone aliases it; the share of their Lomb-Scargle
  power in the respiratory band, and, when a respiratory trace is given
  (:meth:`CordQcStage.set_respiration`, e.g. from the physiology reader), the
  correlation with it at the same times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import signal

from rtsc.config import CordQcConfig
from rtsc.pipeline.qc._kernels import segment_medians
from rtsc.pipeline.qc.dvars_online import DvarsTracker
from rtsc.pipeline.cord.mask import auto_cord_mask, load_grid_image
from rtsc.pipeline.stages import NO_FIELDS, StageResult
from rtsc.volume import Volume

#: A respiratory trace: sample times (seconds from the start of volume 0) -> values
#: (None while the trace does not reach them).
RespirationSource = Callable[[np.ndarray], "np.ndarray | None"]





# ---- tSNR and signal per slice ---------------------------------------------------------------

@dataclass
class CordTsnrState:
    """Running statistics of the cord-mask voxels.

    Attributes
    ----------
    indices : (m,) int64, Fortran-order flat indices of the cord voxels, by slice
    slices : (m,) int64, the slice of each cord voxel
    counts : (nz,) int64, cord voxels per slice
    bounds : (nz + 1,) int64, slice k's voxels are ``indices[bounds[k]:bounds[k + 1]]``
    mean, m2 : (m,) float64, Welford mean and sum of squared deviations
    n : int, volumes so far
    """

    indices: np.ndarray
    slices: np.ndarray
    counts: np.ndarray
    bounds: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    n: int = 0


def cord_tsnr_init(mask: np.ndarray) -> CordTsnrState:
    """State for a cord mask ((nx, ny, nz) bool)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    indices = np.flatnonzero(flat).astype(np.int64)  # ascending = by slice (k slowest)
    nxy = mask.shape[0] * mask.shape[1]
    slices = indices // nxy
    counts = np.bincount(slices, minlength=mask.shape[2]).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return CordTsnrState(indices=indices, slices=slices, counts=counts, bounds=bounds,
                         mean=np.zeros(indices.size), m2=np.zeros(indices.size))


def _per_slice_mean(values: np.ndarray, state: CordTsnrState) -> np.ndarray:
    """Mean of ``values`` (m,) over each slice's voxels; NaN for a slice without any
    (or with a non-finite value)."""
    sums = np.bincount(state.slices, weights=values, minlength=state.counts.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(state.counts > 0, sums / np.maximum(state.counts, 1), np.nan)


def cord_tsnr_step(state: CordTsnrState, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add one volume; return (slice_tsnr, slice_signal), each (nz,) float64.

    Parameters
    ----------
    data : (nx, ny, nz) float32, Fortran order (the motion-corrected volume)

    Returns
    -------
    slice_tsnr : median over the slice's cord voxels of voxel mean / SD so far (NaN
        before two volumes or for a slice without cord voxels; voxels without variance
        are left out)
    slice_signal : mean over the slice's cord voxels of this volume, intensity units
    """
    x = data.ravel(order="F")[state.indices].astype(np.float64)
    state.n += 1
    delta = x - state.mean
    state.mean += delta / state.n
    state.m2 += delta * (x - state.mean)
    signal_ = _per_slice_mean(x, state)
    if state.n < 2:
        return np.full(state.counts.size, np.nan), signal_
    sd = np.sqrt(state.m2 / (state.n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        voxel = np.where(sd > 0, state.mean / sd, np.nan)
    out = np.full(state.counts.size, np.nan)
    segment_medians(voxel, state.bounds, np.empty(voxel.size), out)
    return out, signal_


# ---- dropout ---------------------------------------------------------------------------------

@dataclass
class DropoutState:
    """Each slice's recent unflagged cord signals: list of (nz,) arrays (NaN: flagged)."""

    history: list[np.ndarray] = field(default_factory=list)


def dropout_step(state: DropoutState, slice_signal: np.ndarray, params: CordQcConfig,
                 ) -> list[int]:
    """Slices whose cord signal fell below ``1 - dropout_fraction`` of their own baseline
    (median of their last ``dropout_window`` unflagged values); flagged values do not
    enter the baseline."""
    flagged: list[int] = []
    value = np.asarray(slice_signal, dtype=np.float64)
    kept = value.copy()
    if state.history:
        history = np.asarray(state.history[-params.dropout_window:])
        counts = np.isfinite(history).sum(axis=0)
        safe = np.where(counts[None, :] > 0, history, 0.0)
        baseline = np.nanmedian(safe, axis=0)
        judged = counts >= params.dropout_min_history
        low = judged & np.isfinite(value) & (value < (1 - params.dropout_fraction) * baseline)
        flagged = [int(k) for k in np.flatnonzero(low)]
        kept[low] = np.nan
    state.history.append(kept)
    del state.history[:-params.dropout_window]
    return flagged


# ---- phase encoding ----------------------------------------------------------------------------

def pe_direction(affine: np.ndarray, axis: str) -> np.ndarray:
    """Unit RAS vector (x, y) of the phase-encoding voxel axis (``i`` or ``j``)."""
    column = np.asarray(affine, dtype=np.float64)[:2, 0 if axis == "i" else 1]
    norm = float(np.linalg.norm(column))
    return column / norm if norm > 0 else column


def breathing_volumes(shifts: np.ndarray, factor: float = 4.0) -> np.ndarray:
    """Indices of the volumes kept for the respiratory analysis: those whose shifts are
    not far off every slice's median (a swallow moves all slices by millimetres for a
    volume or two, which would swamp the breathing).

    Parameters
    ----------
    shifts : (n, nz) float64, the PE shift of each slice of the last n volumes, mm
    factor : a volume whose mean |shift - slice median| exceeds this x the median of
        those deviations is left out

    Returns
    -------
    (m,) int64, ascending
    """
    if shifts.shape[0] < 4:
        return np.arange(shifts.shape[0])
    deviation = np.nanmean(np.abs(shifts - np.nanmedian(shifts, axis=0)), axis=1)
    typical = float(np.nanmedian(deviation))
    if not typical > 0:
        return np.arange(shifts.shape[0])
    return np.flatnonzero(deviation <= factor * typical)


def respiratory_band_fraction(times: np.ndarray, values: np.ndarray, groups: np.ndarray,
                              band_hz: tuple[float, float], max_hz: float = 1.0) -> float:
    """Share of the Lomb-Scargle power of ``values`` that lies in ``band_hz``.

    Parameters
    ----------
    times : (m,) float64, seconds, one per sample (each slice of each volume)
    values : (m,) float64, e.g. the shift along the phase-encoding axis, mm
    groups : (m,) int, the slice of each sample; each slice's mean is removed first
    band_hz : (low, high)
    max_hz : float, the highest frequency looked at

    Returns
    -------
    float in [0, 1] (NaN with fewer than 16 samples or no variance). The frequency grid
    runs from 1 / (the span) in steps of 1 / span up to ``max_hz`` (or the Nyquist
    rate of the median sampling interval when lower): motion of interest is slow, and
    the grid's size is the cost (about 1 ms for 32 volumes of 24 slices).
    """
    ok = np.isfinite(times) & np.isfinite(values)
    times, values, groups = times[ok], values[ok], groups[ok]
    if times.size < 16:
        return float("nan")
    centred = values.copy()
    for g in np.unique(groups):  # a few dozen slices, not voxels
        centred[groups == g] -= centred[groups == g].mean()
    if not np.any(np.abs(centred) > 0):
        return float("nan")
    order = np.argsort(times)
    t, y = times[order] - times[order][0], centred[order]
    span = float(t[-1])
    steps = np.diff(t)
    step = float(np.median(steps[steps > 0])) if np.any(steps > 0) else 0.0
    if span <= 0 or step <= 0:
        return float("nan")
    freqs = np.arange(1.0 / span, min(0.5 / step, max_hz), 1.0 / span)
    if freqs.size < 4:
        return float("nan")
    power = signal.lombscargle(t, y, 2 * np.pi * freqs)
    total = float(power.sum())
    inside = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    return float(power[inside].sum() / total) if total > 0 else float("nan")


# ---- the stage ---------------------------------------------------------------------------------

class CordQcStage:
    """Cord QC after slice-wise motion correction (see the module docstring).

    Parameters
    ----------
    params : CordQcConfig
        The ``spinal_cord.qc`` settings
    cord_mask : (nx, ny, nz) bool, or the path of a mask NIfTI in the acquired grid
        (``spinal_cord.mask``), or None (found automatically on the first volume)
    respiration : RespirationSource or None (see :meth:`set_respiration`)

    Metrics: ``slice_tsnr``, ``slice_signal`` (per slice), ``cord_tsnr`` (median over
    slices), ``dvars``, ``std_dvars``, ``outlier`` (cord mask), ``slice_dropout``
    (slice indices), ``pe_axis``, ``pe_shift_mm`` (per slice), ``pe_shift_rms_mm``,
    ``pe_offset_hz_rms`` (with a bandwidth), ``pe_resp_band_fraction`` and
    ``pe_resp_correlation`` (with a respiratory trace).
    """

    name = "cord_qc"
    produces = frozenset({"slice_tsnr", "slice_signal", "cord_tsnr", "dvars", "std_dvars",
                          "outlier", "slice_dropout", "pe_axis", "pe_shift_mm",
                          "pe_shift_rms_mm", "pe_offset_hz_rms", "pe_resp_band_fraction",
                          "pe_resp_correlation"})
    consumes = frozenset({"slice_trans_x", "slice_trans_y"})
    consumes_optional = NO_FIELDS

    def __init__(self, params: CordQcConfig, cord_mask: np.ndarray | str | Path | None = None,
                 respiration: RespirationSource | None = None) -> None:
        self.params = params
        self.mask_path = cord_mask if isinstance(cord_mask, (str, Path)) else None
        self.mask = None if self.mask_path is not None else cord_mask
        self.respiration = respiration
        self.tsnr: CordTsnrState | None = None
        self.dvars: DvarsTracker | None = None
        self.dropout = DropoutState()
        self.dropouts: dict[int, list[int]] = {}
        self.std_values: list[float] = []
        self.last_tsnr: np.ndarray | None = None
        self.signals: list[np.ndarray] = []
        self._pe: list[tuple[np.ndarray, np.ndarray]] = []  # (times, shifts) per volume
        self._direction: np.ndarray | None = None
        self._t_zero = 0.0

    def set_respiration(self, source: RespirationSource | None) -> None:
        """Feed a respiratory trace: ``source(times)`` returns its values at those times
        (seconds from the start of volume 0, the physiology files' clock), or None while
        the physiology does not reach them (see :func:`respiration_from_physio`)."""
        self.respiration = source

    def _start(self, volume: Volume) -> None:
        if self.mask_path is not None:
            self.mask = load_grid_image(self.mask_path, volume, "spinal_cord.mask") > 0.5
        if self.mask is None:
            self.mask = auto_cord_mask(volume.data, volume.voxel_size_mm)
        self.tsnr = cord_tsnr_init(self.mask)
        self.dvars = DvarsTracker(self.mask, n_expected=volume.info.n_expected)
        axis = volume.info.phase_encoding_axis
        if axis is not None:
            self._direction = pe_direction(volume.affine, axis)
        # the start of volume 0 on the clock of the slice times (see _slice_times)
        tr = volume.info.tr_s or 1.0
        start = volume.t_acquired if volume.t_acquired is not None else volume.index * tr
        self._t_zero = start - volume.index * tr

    def _slice_times(self, volume: Volume) -> np.ndarray:
        nz = volume.shape[2]
        tr = volume.info.tr_s or 1.0
        start = volume.t_acquired if volume.t_acquired is not None else volume.index * tr
        offsets = volume.slice_times_s if volume.slice_times_s is not None \
            else np.arange(nz) * tr / nz
        return start + np.asarray(offsets, dtype=np.float64)

    def _phase_encoding(self, volume: Volume, upstream: Mapping[str, Any]) -> dict[str, Any]:
        axis = volume.info.phase_encoding_axis
        out: dict[str, Any] = {"pe_axis": axis}
        tx, ty = upstream.get("slice_trans_x"), upstream.get("slice_trans_y")
        if self._direction is None or tx is None or ty is None:
            return out
        shift = np.asarray(tx, dtype=np.float64) * self._direction[0] \
            + np.asarray(ty, dtype=np.float64) * self._direction[1]
        out["pe_shift_mm"] = [float(v) for v in shift]
        out["pe_shift_rms_mm"] = float(np.sqrt(np.mean(shift ** 2)))
        bandwidth = volume.info.bandwidth_pe_hz
        if bandwidth:
            pixel_mm = volume.voxel_size_mm[0 if axis == "i" else 1]
            out["pe_offset_hz_rms"] = out["pe_shift_rms_mm"] / pixel_mm * bandwidth
        self._pe.append((self._slice_times(volume), shift))
        del self._pe[:-self.params.resp_window]
        kept = [self._pe[i] for i in breathing_volumes(np.asarray([s for _, s in self._pe]))]
        times = np.concatenate([t for t, _ in kept])
        values = np.concatenate([s for _, s in kept])
        groups = np.tile(np.arange(shift.size), len(kept))
        if len(self._pe) >= 8:
            out["pe_resp_band_fraction"] = respiratory_band_fraction(
                times, values, groups, self.params.resp_band_hz)
        if self.respiration is not None:
            trace = self.respiration(times - self._t_zero)
            if trace is not None and len(trace) == times.size:
                out["pe_resp_correlation"] = _correlation(values, groups,
                                                          np.asarray(trace, dtype=np.float64))
        return out

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        upstream = upstream or {}
        if self.tsnr is None:
            self._start(volume)
        assert self.tsnr is not None and self.dvars is not None
        slice_tsnr, slice_signal = cord_tsnr_step(self.tsnr, volume.data)
        self.last_tsnr = slice_tsnr
        self.signals.append(slice_signal)
        dvars, std_dvars = self.dvars.update(volume.data)
        self.std_values.append(std_dvars)
        outlier = bool(math.isfinite(std_dvars) and std_dvars > self.params.dvars_outlier)
        dropped = dropout_step(self.dropout, slice_signal, self.params)
        finite = slice_tsnr[np.isfinite(slice_tsnr)]
        out = StageResult(metrics={
            "slice_tsnr": [float(v) for v in slice_tsnr],
            "slice_signal": [float(v) for v in slice_signal],
            "cord_tsnr": float(np.median(finite)) if finite.size else None,
            "dvars": dvars, "std_dvars": std_dvars, "outlier": outlier,
            "slice_dropout": dropped,
            **self._phase_encoding(volume, upstream)})
        if outlier:
            out.flags.append("outlier")
        if dropped:
            self.dropouts[volume.index] = dropped
            out.flags.append("slice_dropout")
            out.alerts.append(("warning", "slice_dropout",
                               f"volume {volume.index}: cord signal of slice(s) "
                               f"{', '.join(map(str, dropped))} fell by more than "
                               f"{100 * self.params.dropout_fraction:.0f}% of their own "
                               "recent level"))
        return out

    def maps(self) -> dict[str, np.ndarray]:
        if self.mask is None:
            return {}
        return {"cord_mask": self.mask.astype(np.float32)}

    def final_confounds(self) -> dict[str, np.ndarray]:
        """Exact offline dvars and std_dvars of the cord mask (first row NaN)."""
        if self.dvars is None:
            return {}
        dvars, std_dvars = self.dvars.final()
        return {"dvars": dvars, "std_dvars": std_dvars}

    def summary(self) -> dict[str, Any]:
        values = np.asarray(self.std_values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        tsnr = self.last_tsnr
        return {"cord": {
            "mask_voxels": int(self.mask.sum()) if self.mask is not None else 0,
            "slice_tsnr": None if tsnr is None else [float(v) if math.isfinite(v) else None
                                                     for v in tsnr],
            "dvars_outliers": int(np.sum(finite > self.params.dvars_outlier)),
            "slice_dropouts": {str(k): v for k, v in sorted(self.dropouts.items())},
        }}


def respiration_from_physio(source: Any) -> RespirationSource:
    """A :data:`RespirationSource` reading a (possibly growing) physiology file.

    ``source`` is a :class:`rtsc.pipeline.physio.retroicor.PhysioSource`; its recording's
    ``start_s`` places sample 0 relative to the start of volume 0 (BIDS StartTime). While
    the recording does not cover the times asked for, or its start is not known yet (a
    Siemens log before its clock is matched), the source answers None.
    """

    def trace(times: np.ndarray) -> np.ndarray | None:
        recording = source.poll()
        if recording is None or recording.start_s is None or recording.n < 2:
            return None
        n = recording.n
        sample_times = recording.start_s + np.arange(n) / recording.hz
        if times.min() < sample_times[0] or times.max() > sample_times[-1]:
            return None
        return np.interp(times, sample_times, recording.respiratory[:n])

    return trace


def _correlation(values: np.ndarray, groups: np.ndarray, trace: np.ndarray) -> float:
    """Pearson correlation of ``values`` (each group's mean removed) with ``trace``."""
    centred = values.copy()
    for g in np.unique(groups):
        centred[groups == g] -= centred[groups == g].mean()
    ok = np.isfinite(centred) & np.isfinite(trace)
    if ok.sum() < 3:
        return float("nan")
    a, b = centred[ok], trace[ok] - trace[ok].mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
