"""Simulated physiology: cardiac (pulse oximeter) and respiratory (belt) traces, and files.

Time ``t`` is in seconds from the start of volume 0 (negative before the run).

* Respiration: a phase ``phi_r(t) = 2 pi int f_r`` with a rate ``f_r`` that wanders by
  about 8 % around ``breaths_per_min``, and a belt trace
  ``R(t) = A(t) (1 - cos phi_r) / 2`` (0 at end-expiration, ``A`` at peak inspiration;
  ``A`` wanders by about 12 %). Glover's histogram-equalised phase of ``R`` is then
  ``phi_r`` (up to the amplitude wander): ``R`` rises while ``phi_r`` is in (0, pi).
* Heart: beats at times ``b_n`` with intervals ``60 / bpm`` modulated by respiratory sinus
  arrhythmia (3 %) and random jitter (4 %); the cardiac phase is linear between beats,
  ``2 pi (t - b_n) / (b_{n+1} - b_n)``, and the pulse waveform has its maximum exactly at
  each beat (a systolic peak plus a dicrotic bump), so peak detection recovers ``b_n``.

Files:

* BIDS: ``<stem>_physio.tsv.gz`` (no header row) + ``<stem>_physio.json`` with
  SamplingFrequency (Hz), StartTime (s, relative to the first volume) and Columns
  ``["cardiac", "respiratory", "trigger"]``; trigger is 1 at the sample where each
  volume starts. During a progressive send the samples are appended to an uncompressed
  ``<stem>_physio.tsv`` as the run goes on; the ``.tsv.gz`` is written at the end.
* Siemens PMU (VB-style text logs) ``<stem>.puls`` and ``<stem>.resp``: a first line of
  four header numbers and the samples (integers 0..4095), ``5000`` markers after the
  samples of detected beats (puls), ``5003`` at the end of the data, then the footer
  with ``LogStartMDHTime`` / ``LogStopMDHTime`` (ms since midnight, local time, the clock
  of the DICOM AcquisitionTime). The sampling interval is
  ``(LogStop - LogStart) / n_samples``.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PhysioTraces", "generate_traces", "mdh_ms", "write_bids_physio",
           "write_siemens_pmu", "ProgressiveBidsWriter", "BIDS_COLUMNS"]

BIDS_COLUMNS = ("cardiac", "respiratory", "trigger")


@dataclass(frozen=True, eq=False)
class PhysioTraces:
    """Physiological traces of a run, sampled uniformly.

    Attributes
    ----------
    hz : float
        Sampling frequency, Hz.
    start_s : float
        Time of sample 0, seconds from the start of volume 0 (negative: before the run).
    cardiac : (n,) float64
        Pulse waveform, arbitrary units (about 0..1), maxima at ``beats_s``.
    respiratory : (n,) float64
        Belt trace, arbitrary units (0 at end-expiration, about 1 at peak inspiration).
    trigger : (n,) int8
        1 at the first sample at or after each volume start, else 0.
    cardiac_phase : (n,) float64
        True cardiac phase in [0, 2 pi), linear between beats.
    respiratory_phase : (n,) float64
        True respiratory phase in [0, 2 pi).
    beats_s : (m,) float64
        Beat times, seconds from volume 0.
    """

    hz: float
    start_s: float
    cardiac: np.ndarray
    respiratory: np.ndarray
    trigger: np.ndarray
    cardiac_phase: np.ndarray
    respiratory_phase: np.ndarray
    beats_s: np.ndarray

    @property
    def times_s(self) -> np.ndarray:
        """(n,) float64 sample times, seconds from volume 0."""
        return self.start_s + np.arange(self.cardiac.size) / self.hz

    def phases_at(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (analytic) cardiac and respiratory phases at arbitrary times.

        Parameters
        ----------
        t_s : array, seconds from volume 0, inside the traced interval

        Returns
        -------
        cardiac, respiratory : arrays of t_s's shape, radians in [0, 2 pi)
        """
        t = np.asarray(t_s, dtype=np.float64)
        n = np.searchsorted(self.beats_s, t, side="right") - 1
        n = np.clip(n, 0, self.beats_s.size - 2)
        b0, b1 = self.beats_s[n], self.beats_s[n + 1]
        card = np.mod(2 * np.pi * (t - b0) / (b1 - b0), 2 * np.pi)
        unwrapped = np.unwrap(self.respiratory_phase)
        resp = np.mod(np.interp(t, self.times_s, unwrapped), 2 * np.pi)
        return card, resp

    def respiratory_at(self, t_s: np.ndarray) -> np.ndarray:
        """Belt trace interpolated at times ``t_s`` (seconds from volume 0)."""
        return np.interp(np.asarray(t_s, dtype=np.float64), self.times_s, self.respiratory)


def _wander(rng: np.random.Generator, n: int, hz: float, scale: float,
            corr_s: float = 20.0) -> np.ndarray:
    """A smooth random function (n samples) of SD about ``scale``, correlation ~corr_s."""
    n_knots = max(int(n / hz / corr_s) + 3, 4)
    knots = rng.normal(0.0, scale, size=n_knots)
    x = np.linspace(0, n_knots - 1, n)
    return np.interp(x, np.arange(n_knots), knots)


def pulse_waveform(phase: np.ndarray) -> np.ndarray:
    """Pulse-oximeter shape as a function of the cardiac phase (max 1 at phase 0)."""
    wrapped = np.angle(np.exp(1j * phase))  # (-pi, pi]
    return (np.exp(-0.5 * (wrapped / 0.45) ** 2)
            + 0.3 * np.exp(-0.5 * ((np.mod(phase, 2 * np.pi) - 2.6) / 0.35) ** 2))


def generate_traces(duration_s: float, tr_s: float, n_volumes: int, seed: int,
                    hz: float = 100.0, heart_bpm: float = 66.0, breaths_per_min: float = 15.0,
                    pre_s: float = 4.0, post_s: float = 4.0) -> PhysioTraces:
    """Draw the physiology of a run.

    Parameters
    ----------
    duration_s : float
        Run length, seconds (``n_volumes * tr_s``).
    tr_s : float
        Seconds between volume starts (for the trigger column).
    n_volumes : int
    seed : int
        The draws come from ``default_rng([seed, 7])``.
    hz : float
        Sampling frequency, Hz.
    heart_bpm, breaths_per_min : float
        Mean rates.
    pre_s, post_s : float
        Recording before volume 0 and after the last volume, seconds.

    Returns
    -------
    PhysioTraces
    """
    rng = np.random.default_rng([seed, 7])
    n = int(np.ceil((pre_s + duration_s + post_s) * hz)) + 1
    t = -pre_s + np.arange(n) / hz
    f_r = breaths_per_min / 60.0 * (1.0 + _wander(rng, n, hz, 0.08))
    phi_r = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(f_r) / hz
    amp = 1.0 + _wander(rng, n, hz, 0.12, corr_s=30.0)
    resp = amp * (1.0 - np.cos(phi_r)) / 2.0
    # Beats: start a little before the first sample so every sample has a beat before it.
    mean_rr = 60.0 / heart_bpm
    beats = [t[0] - rng.uniform(0.2, 1.0) * mean_rr]
    while beats[-1] <= t[-1] + 2 * mean_rr:
        phase_r = np.interp(beats[-1], t, phi_r, left=phi_r[0], right=phi_r[-1])
        rr = mean_rr * (1.0 + 0.03 * np.sin(phase_r) + 0.04 * rng.standard_normal())
        beats.append(beats[-1] + max(rr, 0.4 * mean_rr))
    beats_s = np.asarray(beats)
    k = np.searchsorted(beats_s, t, side="right") - 1
    phi_c = 2 * np.pi * (t - beats_s[k]) / (beats_s[k + 1] - beats_s[k])
    cardiac = pulse_waveform(phi_c)
    trigger = np.zeros(n, dtype=np.int8)
    starts = np.ceil((np.arange(n_volumes) * tr_s + pre_s) * hz - 1e-9).astype(int)
    trigger[starts[starts < n]] = 1
    return PhysioTraces(hz=float(hz), start_s=-float(pre_s), cardiac=cardiac,
                        respiratory=resp, trigger=trigger, cardiac_phase=phi_c,
                        respiratory_phase=np.mod(phi_r, 2 * np.pi), beats_s=beats_s)


def _bids_rows(traces: PhysioTraces, start: int, stop: int) -> str:
    rows = [f"{c:.6f}\t{r:.6f}\t{int(g)}" for c, r, g in
            zip(traces.cardiac[start:stop], traces.respiratory[start:stop],
                traces.trigger[start:stop])]
    return "".join(row + "\n" for row in rows)


def _bids_sidecar(traces: PhysioTraces, json_path: Path) -> None:
    json_path.write_text(json.dumps({
        "SamplingFrequency": traces.hz, "StartTime": traces.start_s,
        "Columns": list(BIDS_COLUMNS),
        "cardiac": {"Description": "pulse oximeter (simulated)", "Units": "a.u."},
        "respiratory": {"Description": "respiratory belt (simulated)", "Units": "a.u."},
        "trigger": {"Description": "1 at the start of each volume"}}, indent=2))


def write_bids_physio(traces: PhysioTraces, directory: Path, stem: str) -> Path:
    """Write ``<stem>_physio.tsv.gz`` and ``<stem>_physio.json``; return the .tsv.gz path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}_physio.tsv.gz"
    with gzip.open(path, "wt", encoding="ascii") as fh:
        fh.write(_bids_rows(traces, 0, traces.cardiac.size))
    _bids_sidecar(traces, directory / f"{stem}_physio.json")
    return path


class ProgressiveBidsWriter:
    """Appends BIDS physio rows to ``<stem>_physio.tsv`` as the run goes on.

    The sidecar is written first; :meth:`advance` appends the samples up to a time
    (seconds from volume 0), flushing each time, so a reader that tails the file sees
    whole lines only once they are complete.
    """

    def __init__(self, traces: PhysioTraces, directory: Path, stem: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.traces = traces
        self.path = directory / f"{stem}_physio.tsv"
        _bids_sidecar(traces, directory / f"{stem}_physio.json")
        self.path.write_text("")
        self._next = 0

    def advance(self, until_s: float) -> None:
        """Append every sample with time <= ``until_s``."""
        n = self.traces.cardiac.size
        last = (until_s - self.traces.start_s) * self.traces.hz
        stop = n if not np.isfinite(last) else min(int(np.floor(last)) + 1, n)
        stop = max(stop, self._next)
        if stop > self._next:
            with self.path.open("a", encoding="ascii") as fh:
                fh.write(_bids_rows(self.traces, self._next, stop))
            self._next = stop

    def finish(self) -> None:
        """Append the rest of the recording."""
        self.advance(np.inf)


def mdh_ms(epoch_s: float) -> int:
    """Milliseconds since local midnight of an epoch time (the DICOM AcquisitionTime clock)."""
    local = _dt.datetime.fromtimestamp(epoch_s).astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return int(round((local - midnight).total_seconds() * 1000.0))


def _pmu_text(values: np.ndarray, markers: np.ndarray, start_ms: int, stop_ms: int,
              name: str) -> str:
    tokens = ["1", "2", "40", "280", "5002", "LOGVERSION_" + name, "1", "6002"]
    for v, mark in zip(values, markers):
        tokens.append(str(int(v)))
        if mark:
            tokens.append("5000")
    tokens.append("5003")
    lo, hi, avg = int(values.min()), int(values.max()), int(values.mean())
    footer = [
        "ECG  Freq Per: 0 0",
        f"{name:<4} Freq Per: 0 0",
        "ECG  Min Max Avg StdDiff: 0 0 0 0",
        f"{name:<4} Min Max Avg StdDiff: {lo} {hi} {avg} 0",
        "NrTrig NrMP NrArr AcqWin: 0 0 0 0",
        f"LogStartMDHTime:  {start_ms}",
        f"LogStopMDHTime:   {stop_ms}",
        f"LogStartMPCUTime: {start_ms}",
        f"LogStopMPCUTime:  {stop_ms}",
        "6003",
    ]
    return " ".join(tokens) + "\n" + "\n".join(footer) + "\n"


def write_siemens_pmu(traces: PhysioTraces, directory: Path, stem: str,
                      run_start_epoch_s: float) -> tuple[Path, Path]:
    """Write ``<stem>.puls`` and ``<stem>.resp`` (Siemens VB-style PMU logs).

    Parameters
    ----------
    traces : PhysioTraces
    directory : Path
    stem : str
    run_start_epoch_s : float
        Epoch seconds of the start of volume 0 (the DICOM AcquisitionTime of its first
        slice is this time minus nothing: the same clock).

    Returns
    -------
    (puls_path, resp_path)
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = traces.cardiac.size
    start_ms = mdh_ms(run_start_epoch_s + traces.start_s)
    stop_ms = start_ms + int(round(n * 1000.0 / traces.hz))
    puls = np.clip(np.rint(400 + 2400 * traces.cardiac), 0, 4095)
    resp = np.clip(np.rint(800 + 2400 * traces.respiratory), 0, 4095)
    beat_samples = np.rint((traces.beats_s - traces.start_s) * traces.hz).astype(int)
    marks = np.zeros(n, dtype=bool)
    marks[beat_samples[(beat_samples >= 0) & (beat_samples < n)]] = True
    puls_path = directory / f"{stem}.puls"
    resp_path = directory / f"{stem}.resp"
    puls_path.write_text(_pmu_text(puls, marks, start_ms, stop_ms, "PULS"))
    resp_path.write_text(_pmu_text(resp, np.zeros(n, dtype=bool), start_ms, stop_ms, "RESP"))
    return puls_path, resp_path
