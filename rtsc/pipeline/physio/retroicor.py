"""Physiological recordings and RETROICOR regressors (Glover 2000), slice by slice, as the
recording grows.

Recordings
----------
* BIDS: ``*_physio.tsv.gz`` (or a plain ``*_physio.tsv`` that grows during the run) with
  the sidecar ``*_physio.json`` (``SamplingFrequency`` Hz, ``StartTime`` s relative to the
  first volume, ``Columns`` naming ``cardiac`` and ``respiratory``).
* Siemens PMU text logs ``.puls`` / ``.resp`` (both needed; either may be given): samples on
  the first line after four header numbers, ``5002 ... 6002`` comment blocks and ``5000`` /
  ``6000`` trigger markers skipped, ``5003`` ends the data; ``LogStartMDHTime`` /
  ``LogStopMDHTime`` in the footer (ms since midnight, the clock of the DICOM
  AcquisitionTime). The sampling interval is ``(LogStop - LogStart) / n_samples``; the
  start relative to the first volume is ``LogStart - AcquisitionTime(volume 0)``.

Phases (all rules local in time, so a phase computed while the recording grows equals the
one computed afterwards from the same samples)
------------------------------------------------------------------------------------
* Cardiac: a sample ``i`` is a beat when it is the first maximum of ``[i - w, i + w]``
  (``w`` = 0.25 s), rises above its predecessor, and stands above the minimum of
  ``[i - W, i + W]`` (``W`` = 1.5 s) by more than half of that window's range; a beat
  within ``w`` after an accepted one is dropped. The phase is linear between beats,
  ``2 pi (t - b_n) / (b_{n+1} - b_n)``; after the last known beat it continues with the
  last interval.
* Respiratory (Glover 2000, histogram equalisation): the belt trace smoothed by a centred
  moving average of 0.5 s (shorter at the ends), normalised to [0, 1] by its minimum and
  maximum, a 100-bin histogram ``H``; ``phi_r = pi * sign(dR/dt) * sum_{b <= bin(R)} H(b) /
  sum H`` (``dR/dt`` by central differences of the smoothed trace; sign 0 counts as +).

Regressors for volume ``t`` use the samples up to ``tau_max(t) + lag_s`` only (the slice
acquired last plus a lag long enough to confirm the next beat): that many samples, no
more, whatever has arrived by then, so they are a pure function of the recording (and the
histogram covers the run up to that point): the same live, in a replay after the run, or
from a log that only arrived at the end. Only a volume whose lag reaches past the end of
a finished recording uses all of it (``final``). Times are ``tau(t, k) = t * TR +
slice_times[k]`` seconds from the start of volume 0.

RETROICOR columns of one slice at ``tau`` (cardiac order ``C``, respiratory ``R``,
interaction ``(Ic, Ir)``)::

    cos(m phi_c), sin(m phi_c)                 m = 1..C        2C columns
    cos(m phi_r), sin(m phi_r)                 m = 1..R        2R
    cos(m phi_c + n phi_r), sin(m phi_c + n phi_r),
    cos(m phi_c - n phi_r), sin(m phi_c - n phi_r)   m = 1..Ic, n = 1..Ir   4 Ic Ir

Presets: ``tapas`` 3 / 4 / (1, 1): 18 columns (TAPAS PhysIO); ``spinal`` 4 / 4 / (2, 2): 32
plus the CSF regressor (the slice's mean in a CSF mask, FSL PNM): 33.
"""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import maximum_filter1d, minimum_filter1d

from rtsc.errors import RtscError

log = logging.getLogger(__name__)

PRESETS = {"tapas": (3, 4, (1, 1), False), "spinal": (4, 4, (2, 2), True)}
BEAT_HALF_WINDOW_S = 0.25
BEAT_CONTEXT_S = 1.5
RESP_SMOOTH_S = 0.5
RESP_BINS = 100


class PhysioError(RtscError):
    """A physiological recording cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- recordings

@dataclass
class Recording:
    """Samples of a physiological recording (grows as a file is tailed).

    Attributes
    ----------
    hz : float, sampling frequency
    start_s : float or None, time of sample 0 in seconds from the first volume's start
        (None for a Siemens log until the first volume's clock is known)
    start_mdh_ms : float or None, Siemens: sample 0 in ms since midnight
    cardiac, respiratory : (n,) float64
    complete : bool, the recording has ended (no more samples will come)
    source : str, the file(s), for messages
    """

    hz: float
    start_s: float | None
    cardiac: np.ndarray
    respiratory: np.ndarray
    complete: bool
    source: str
    start_mdh_ms: float | None = None

    @property
    def n(self) -> int:
        return int(min(self.cardiac.size, self.respiratory.size))


def _bids_sidecar(path: Path) -> Path:
    name = path.name
    for suffix in (".tsv.gz", ".tsv"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    raise PhysioError(f"{path}: a BIDS physio file ends in .tsv.gz or .tsv")


def read_bids_sidecar(path: Path) -> tuple[float, float, int, int]:
    """(SamplingFrequency, StartTime, cardiac column, respiratory column) of a BIDS file."""
    side = _bids_sidecar(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PhysioError(f"{path}: cannot read its sidecar {side.name}: {exc.strerror}") from None
    except ValueError as exc:
        raise PhysioError(f"{side}: not valid JSON ({exc})") from None
    missing = [k for k in ("SamplingFrequency", "StartTime", "Columns") if k not in meta]
    if missing:
        raise PhysioError(f"{side}: missing {', '.join(missing)}")
    hz, start, columns = meta["SamplingFrequency"], meta["StartTime"], meta["Columns"]
    if not isinstance(hz, (int, float)) or not hz > 0:
        raise PhysioError(f"{side}: SamplingFrequency {hz!r} is not a positive number")
    if not isinstance(start, (int, float)) or not math.isfinite(start):
        raise PhysioError(f"{side}: StartTime {start!r} is not a number")
    if not isinstance(columns, list) or "cardiac" not in columns or "respiratory" not in columns:
        raise PhysioError(f"{side}: Columns {columns!r} must name 'cardiac' and 'respiratory'")
    return float(hz), float(start), columns.index("cardiac"), columns.index("respiratory")


def _parse_rows(text: str, path: Path, first_line: int, n_columns_min: int) -> np.ndarray:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return np.zeros((0, n_columns_min))
    try:
        rows = [[float(v) for v in ln.split("\t")] for ln in lines]
    except ValueError:
        for i, ln in enumerate(lines):
            try:
                [float(v) for v in ln.split("\t")]
            except ValueError:
                raise PhysioError(f"{path}: line {first_line + i}: not numbers: {ln[:60]!r}") \
                    from None
        raise
    widths = {len(r) for r in rows}
    if len(widths) != 1 or min(widths) < n_columns_min:
        bad = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]) or len(r) < n_columns_min)
        raise PhysioError(f"{path}: line {first_line + bad}: {len(rows[bad])} columns, "
                          f"expected {max(len(rows[0]), n_columns_min)}")
    return np.asarray(rows, dtype=np.float64)


def read_bids_physio(path: str | Path) -> Recording:
    """Read a whole BIDS physio file (.tsv.gz or .tsv) and its JSON sidecar."""
    path = Path(path)
    hz, start, ci, ri = read_bids_sidecar(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="ascii") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise PhysioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise PhysioError(f"{path}: not a readable gzip/text file ({exc})") from None
    rows = _parse_rows(text, path, 1, max(ci, ri) + 1)
    return Recording(hz=hz, start_s=start, cardiac=rows[:, ci].copy(),
                     respiratory=rows[:, ri].copy(), complete=path.name.endswith(".gz"),
                     source=str(path))


_MDH = re.compile(r"LogStart(MDH)Time:\s*(\d+).*?LogStopMDHTime:\s*(\d+)", re.S)


def read_pmu_log(path: str | Path) -> tuple[np.ndarray, int, int]:
    """One Siemens PMU text log: (samples, LogStartMDHTime ms, LogStopMDHTime ms)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise PhysioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    end = text.find(" 5003")
    if end < 0:
        raise PhysioError(f"{path}: no end-of-data marker 5003 (incomplete or not a PMU log)")
    body = re.sub(r"5002.*?6002", " ", text[:end], flags=re.S).split()
    if len(body) < 5:
        raise PhysioError(f"{path}: no samples before the 5003 marker")
    try:
        values = [int(tok) for tok in body[4:]]
    except ValueError:
        bad = next(tok for tok in body[4:] if not tok.lstrip("-").isdigit())
        raise PhysioError(f"{path}: sample {bad!r} is not an integer") from None
    samples = np.asarray([v for v in values if v not in (5000, 6000)], dtype=np.float64)
    match = _MDH.search(text[end:])
    if match is None:
        raise PhysioError(f"{path}: no LogStartMDHTime / LogStopMDHTime in the footer")
    start, stop = int(match.group(2)), int(match.group(3))
    if stop <= start or samples.size == 0:
        raise PhysioError(f"{path}: LogStopMDHTime {stop} is not after LogStartMDHTime {start}")
    return samples, start, stop


def _pmu_pair(path: Path) -> tuple[Path, Path]:
    if path.suffix.lower() not in (".puls", ".resp"):
        raise PhysioError(f"{path}: a Siemens PMU log ends in .puls or .resp")
    puls, resp = path.with_suffix(".puls"), path.with_suffix(".resp")
    for p in (puls, resp):
        if not p.exists():
            raise PhysioError(f"{path}: its companion {p.name} is missing (both .puls and "
                              ".resp are needed)")
    return puls, resp


def read_siemens_physio(path: str | Path) -> Recording:
    """Read a pair of Siemens PMU logs (.puls + .resp, either given), resampled onto the
    pulse log's sample times (linear interpolation of the respiratory log)."""
    puls_path, resp_path = _pmu_pair(Path(path))
    puls, p0, p1 = read_pmu_log(puls_path)
    resp, r0, r1 = read_pmu_log(resp_path)
    hz = puls.size * 1000.0 / (p1 - p0)
    t = p0 + np.arange(puls.size) * 1000.0 / hz
    t_resp = r0 + np.arange(resp.size) * (r1 - r0) / resp.size
    resp_on = np.interp(t, t_resp, resp)
    return Recording(hz=hz, start_s=None, cardiac=puls, respiratory=resp_on, complete=True,
                     source=f"{puls_path} + {resp_path.name}", start_mdh_ms=float(p0))


def detect_format(path: str | Path) -> str:
    """``bids`` or ``siemens`` from the file name."""
    name = Path(path).name.lower()
    if name.endswith((".tsv", ".tsv.gz")):
        return "bids"
    if name.endswith((".puls", ".resp")):
        return "siemens"
    raise PhysioError(f"{path}: cannot tell the format (expected *_physio.tsv[.gz], .puls "
                      "or .resp; set physio.format)")


class PhysioSource:
    """A physiology file that may still be growing; :meth:`poll` reads what is new.

    A plain BIDS ``.tsv`` is tailed: complete lines only, from the last byte offset.
    A ``.tsv.gz`` or a Siemens log is read whole once it exists (complete files).

    Parameters
    ----------
    path : the file (for Siemens either of the pair)
    fmt : ``auto`` | ``bids`` | ``siemens``
    """

    def __init__(self, path: str | Path, fmt: str = "auto") -> None:
        self.path = Path(path)
        self.format = detect_format(path) if fmt == "auto" else fmt
        if self.format not in ("bids", "siemens"):
            raise PhysioError(f"physio format {fmt!r}; allowed: auto, bids, siemens")
        self.recording: Recording | None = None
        self._offset = 0
        self._line = 1
        self._columns: tuple[float, float, int, int] | None = None

    @property
    def tailing(self) -> bool:
        return self.format == "bids" and not self.path.name.endswith(".gz")

    def poll(self) -> Recording | None:
        """Read new samples if any; the recording so far (None while nothing is there)."""
        if self.recording is not None and self.recording.complete:
            return self.recording
        if not self.path.exists():
            return self.recording
        if not self.tailing:
            self.recording = (read_bids_physio(self.path) if self.format == "bids"
                              else read_siemens_physio(self.path))
            return self.recording
        if self._columns is None:
            if not _bids_sidecar(self.path).exists():
                return None
            self._columns = read_bids_sidecar(self.path)
        hz, start, ci, ri = self._columns
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        cut = chunk.rfind(b"\n")
        if cut < 0:
            return self.recording
        text = chunk[:cut + 1].decode("ascii", errors="replace")
        rows = _parse_rows(text, self.path, self._line, max(ci, ri) + 1)
        self._offset += cut + 1
        self._line += text.count("\n")
        if self.recording is None:
            self.recording = Recording(hz, start, rows[:, ci].copy(), rows[:, ri].copy(),
                                       False, str(self.path))
        elif rows.size:
            rec = self.recording
            rec.cardiac = np.concatenate([rec.cardiac, rows[:, ci]])
            rec.respiratory = np.concatenate([rec.respiratory, rows[:, ri]])
        return self.recording

    def mark_complete(self) -> None:
        """The run is over: read what is new, and that is all there will be."""
        self.poll()
        if self.recording is not None:
            self.recording.complete = True


# ------------------------------------------------------------------------------- phases

def _window(hz: float, seconds: float) -> int:
    return max(1, int(round(seconds * hz)))


def cardiac_peaks(trace: np.ndarray, hz: float, final: bool = True) -> np.ndarray:
    """Beat sample indices of a pulse (or ECG) trace by the local rule of the module
    docstring. With ``final`` False, only beats whose windows lie wholly in the trace."""
    x = np.asarray(trace, dtype=np.float64)
    n = x.size
    if n < 3:
        return np.zeros(0, dtype=np.int64)
    w, big = _window(hz, BEAT_HALF_WINDOW_S), _window(hz, BEAT_CONTEXT_S)
    local_max = maximum_filter1d(x, size=2 * w + 1, mode="constant", cval=-np.inf)
    hi = maximum_filter1d(x, size=2 * big + 1, mode="constant", cval=-np.inf)
    lo = minimum_filter1d(x, size=2 * big + 1, mode="constant", cval=np.inf)
    rising = np.empty(n, dtype=bool)
    rising[0] = False
    rising[1:] = x[1:] > x[:-1]
    candidate = (x == local_max) & rising & (x - lo > 0.5 * (hi - lo))
    if not final:
        candidate[max(n - big, 0):] = False
    idx = np.flatnonzero(candidate)
    if idx.size < 2:
        return idx.astype(np.int64)
    keep = [int(idx[0])]
    for i in idx[1:]:
        if i - keep[-1] > w:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def cardiac_phase(beats_s: np.ndarray, t_s: np.ndarray) -> np.ndarray:
    """Phase in [0, 2 pi) at times ``t_s`` (linear between beats; before the first beat the
    first interval is extended backwards, after the last the last one forwards)."""
    t = np.asarray(t_s, dtype=np.float64)
    b = np.asarray(beats_s, dtype=np.float64)
    if b.size < 2:
        return np.full(t.shape, np.nan)
    n = np.clip(np.searchsorted(b, t, side="right") - 1, 0, b.size - 2)
    phase = 2 * np.pi * (t - b[n]) / (b[n + 1] - b[n])
    return np.mod(phase, 2 * np.pi)


def respiratory_phase(trace: np.ndarray, hz: float, sample_idx: np.ndarray,
                      final: bool = True) -> np.ndarray:
    """Glover's histogram-equalised respiratory phase at the given sample indices.

    The histogram covers the settled samples (those whose smoothing window is whole;
    every sample when ``final``).
    """
    x = np.asarray(trace, dtype=np.float64)
    m = _window(hz, RESP_SMOOTH_S / 2)
    smooth = _moving_average(x, m)
    n_set = x.size if final else max(x.size - m, 0)
    ref = smooth[:n_set]
    if ref.size < 3:
        return np.full(np.shape(sample_idx), np.nan)
    lo, hi = ref.min(), ref.max()
    span = hi - lo if hi > lo else 1.0
    ref_bins = np.minimum(((ref - lo) / span * RESP_BINS).astype(np.int64), RESP_BINS - 1)
    counts = np.bincount(ref_bins, minlength=RESP_BINS)
    cdf = np.cumsum(counts) / counts.sum()
    idx = np.asarray(sample_idx, dtype=np.int64)
    grad = np.gradient(ref)
    value = np.clip((smooth[idx] - lo) / span, 0.0, 1.0)
    b = np.minimum((value * RESP_BINS).astype(np.int64), RESP_BINS - 1)
    sign = np.where(grad[np.minimum(idx, n_set - 1)] < 0, -1.0, 1.0)
    return np.mod(np.pi * sign * cdf[b], 2 * np.pi)


def _moving_average(x: np.ndarray, m: int) -> np.ndarray:
    """Centred mean over [i - m, i + m], truncated at the ends (no padding)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(x.size)
    a, b = np.maximum(i - m, 0), np.minimum(i + m + 1, x.size)
    return (c[b] - c[a]) / (b - a)


# --------------------------------------------------------------------------- regressors

@dataclass(frozen=True)
class RetroicorOrders:
    """Fourier orders of the RETROICOR expansion and the CSF regressor.

    Attributes
    ----------
    cardiac, respiratory : int >= 0
    interaction : (int, int), cardiac x respiratory orders of the interaction terms
    csf : bool, add the slice's CSF mean
    """

    cardiac: int = 3
    respiratory: int = 4
    interaction: tuple[int, int] = (1, 1)
    csf: bool = False

    @classmethod
    def preset(cls, name: str, cardiac: int | None = None, respiratory: int | None = None,
               interaction: tuple[int, int] | list[int] | None = None,
               csf: bool | None = None) -> RetroicorOrders:
        """A preset (``tapas`` or ``spinal``) with any order overridden."""
        if name not in PRESETS:
            raise PhysioError(f"RETROICOR preset {name!r}; allowed: {', '.join(PRESETS)}")
        c, r, i, f = PRESETS[name]
        return cls(c if cardiac is None else int(cardiac),
                   r if respiratory is None else int(respiratory),
                   tuple(i) if interaction is None else (int(interaction[0]),  # type: ignore[arg-type]
                                                         int(interaction[1])),
                   f if csf is None else bool(csf))

    def names(self) -> list[str]:
        """Column names, in order."""
        out = []
        for m in range(1, self.cardiac + 1):
            out += [f"card_cos{m}", f"card_sin{m}"]
        for m in range(1, self.respiratory + 1):
            out += [f"resp_cos{m}", f"resp_sin{m}"]
        for m in range(1, self.interaction[0] + 1):
            for n in range(1, self.interaction[1] + 1):
                out += [f"int_cos_c{m}p{n}", f"int_sin_c{m}p{n}",
                        f"int_cos_c{m}m{n}", f"int_sin_c{m}m{n}"]
        if self.csf:
            out.append("csf")
        return out

    @property
    def n_columns(self) -> int:
        return len(self.names())


def retroicor_columns(phi_c: np.ndarray, phi_r: np.ndarray, orders: RetroicorOrders
                      ) -> np.ndarray:
    """RETROICOR columns (without CSF) at phases of shape (...,): (..., n_fourier)."""
    cols = []
    for m in range(1, orders.cardiac + 1):
        cols += [np.cos(m * phi_c), np.sin(m * phi_c)]
    for m in range(1, orders.respiratory + 1):
        cols += [np.cos(m * phi_r), np.sin(m * phi_r)]
    for m in range(1, orders.interaction[0] + 1):
        for n in range(1, orders.interaction[1] + 1):
            plus, minus = m * phi_c + n * phi_r, m * phi_c - n * phi_r
            cols += [np.cos(plus), np.sin(plus), np.cos(minus), np.sin(minus)]
    if not cols:
        return np.zeros(np.shape(phi_c) + (0,))
    return np.stack(cols, axis=-1)


def slice_phases(rec: Recording, times_s: np.ndarray, n_used: int, final: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cardiac and respiratory phases at ``times_s`` (seconds from volume 0) from the
    first ``n_used`` samples of a recording."""
    assert rec.start_s is not None
    card = rec.cardiac[:n_used]
    resp = rec.respiratory[:n_used]
    beats = rec.start_s + cardiac_peaks(card, rec.hz, final=final) / rec.hz
    phi_c = cardiac_phase(beats, times_s)
    idx = np.clip(np.rint((np.asarray(times_s) - rec.start_s) * rec.hz).astype(np.int64), 0,
                  max(n_used - 1, 0))
    phi_r = respiratory_phase(resp, rec.hz, idx, final=final)
    return phi_c, phi_r


@dataclass
class RegressorBuilder:
    """Per-volume, per-slice RETROICOR rows from a (growing) recording.

    Parameters
    ----------
    source : PhysioSource
    orders : RetroicorOrders
    tr_s : float, seconds
    slice_times_s : (nz,) float64, offsets within the TR
    lag_s : float, seconds of recording needed after a volume's last slice
    first_volume_epoch_s : float or None, AcquisitionTime of volume 0 (epoch), to place a
        Siemens log on the run's clock
    """

    source: PhysioSource
    orders: RetroicorOrders
    tr_s: float
    slice_times_s: np.ndarray
    lag_s: float = 3.0
    first_volume_epoch_s: float | None = None
    used: dict[int, int] = field(default_factory=dict)

    def recording(self) -> Recording | None:
        rec = self.source.poll()
        if rec is not None and rec.start_s is None and rec.start_mdh_ms is not None:
            if self.first_volume_epoch_s is None:
                raise PhysioError(f"{rec.source}: a Siemens log needs the first volume's "
                                  "AcquisitionTime to line up, and the volumes have none")
            rec.start_s = (rec.start_mdh_ms - mdh_ms(self.first_volume_epoch_s)) / 1000.0
        return rec

    def times(self, index: int) -> np.ndarray:
        """(nz,) seconds from volume 0 of the slices of volume ``index``."""
        return index * self.tr_s + np.asarray(self.slice_times_s, dtype=np.float64)

    def samples_needed(self, rec: Recording, index: int) -> int:
        """How many samples the rows of volume ``index`` use (the readiness rule)."""
        assert rec.start_s is not None
        last = float(self.times(index).max()) + self.lag_s
        return int(math.floor((last - rec.start_s) * rec.hz)) + 1

    def status(self, index: int, rec: Recording | None) -> str:
        """``ready``, ``wait`` (more samples needed) or ``outside`` (the recording does not
        cover this volume and never will)."""
        if rec is None or rec.start_s is None:
            return "wait"
        t = self.times(index)
        if float(t.min()) < rec.start_s:
            return "outside"
        if rec.n >= self.samples_needed(rec, index):
            return "ready"
        if rec.complete:
            return "ready" if float(t.max()) <= rec.start_s + (rec.n - 1) / rec.hz else "outside"
        return "wait"

    def rows(self, index: int, rec: Recording, csf_means: np.ndarray | None = None
             ) -> np.ndarray:
        """(nz, n_columns) RETROICOR rows of volume ``index`` (status must be ``ready``)."""
        need = self.samples_needed(rec, index)
        final = need > rec.n  # the recording ended before the lag: use all of it
        n_used = rec.n if final else need
        self.used[index] = n_used
        phi_c, phi_r = slice_phases(rec, self.times(index), n_used, final)
        cols = retroicor_columns(phi_c, phi_r, self.orders)
        if self.orders.csf:
            if csf_means is None:
                raise PhysioError("the CSF regressor needs a CSF mask (physio.csf_mask)")
            cols = np.column_stack([cols, csf_means])
        if not np.all(np.isfinite(cols)):
            raise PhysioError(f"{rec.source}: too few beats or breaths to phase volume {index}")
        return cols


def mdh_ms(epoch_s: float) -> float:
    """Milliseconds since local midnight of an epoch time (Siemens MDH clock)."""
    local = datetime.datetime.fromtimestamp(epoch_s).astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return (local - midnight).total_seconds() * 1000.0
