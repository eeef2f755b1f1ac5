"""The display's model: rtsc messages folded into what the dashboard draws.

Pure and GUI-free: :meth:`DisplayState.fold` takes one decoded message at a time (live
or from the snapshot) and updates the series information, per-volume arrays, the
newest maps, alerts and the series end. A ``series.start`` of another series starts
over. ``dirty`` names what changed since the view last drew (the view clears it), so
the view redraws only those panels.

Fields of the QC stage (``tsnr``, ``clean_minutes``, ``criterion``, ``slice_spikes``,
the ``tsnr`` map, the summary's ``verdict``) are used when present and stay empty
(None / NaN) when absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.messages import (
    TOPIC_ALERT,
    TOPIC_MAP,
    TOPIC_SERIES_END,
    TOPIC_SERIES_START,
    TOPIC_VOLUME,
    Message,
)
from rtsc.pipeline.roi.criterion import activation_phrase

#: Per-volume scalar fields kept as arrays (NaN where missing or null).
SCALARS = ("framewise_displacement", "dvars", "std_dvars", "global_signal", "latency_s",
           "tsnr", "feedback")

#: Flags drawn as spike markers.
SPIKE_FLAGS = ("spike", "outlier")
#: Volumes the buffers are first sized for at most, whatever series.start announces.
PREALLOCATED_VOLUMES = 1024

PANELS = ("status", "motion", "fd", "dvars", "carpet", "roi", "maps", "usable", "design",
          "cord")


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


@dataclass
class MapEntry:
    """The newest map of one name.

    Attributes
    ----------
    data : (nx, ny, nz) float32
    affine : (4, 4) float64, voxel -> RAS+ mm
    index : int or None, the volume it was computed after
    """

    data: np.ndarray
    affine: np.ndarray
    index: int | None


@dataclass
class DisplayState:
    """What is known about the current series.

    Attributes
    ----------
    series : str or None, the current series id (None: waiting for a scanner)
    start : dict, the series.start header ({} until one came)
    indices : (n,) int64, volume indices in arrival order (duplicates dropped)
    motion : (n, 6) float64, trans_x..z (mm), rot_x..z (radians)
    scalars : name -> (n,) float64, see SCALARS
    roi : ROI name -> (n,) float64, percent signal change
    flags : list of list of str, per volume
    slice_spikes : list of list of int, per volume (empty without the QC stage)
    carpet : (K, n) float32 or None, the sampled in-mask voxel values
    maps : name -> MapEntry
    alerts : list of alert headers
    last : dict, the newest volume header
    end : dict or None, the series.end header
    """

    series: str | None = None
    start: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, MapEntry] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    #: the ROI stage's MNI registration (volume 0's ``mni_registration``), when any
    mni_registration: dict[str, Any] | None = None
    flags: list[list[str]] = field(default_factory=list)
    slice_spikes: list[list[int]] = field(default_factory=list)
    dirty: set[str] = field(default_factory=lambda: set(PANELS))
    generation: int = 0
    n: int = 0
    _capacity: int = 0
    _indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _motion: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))
    _scalars: dict[str, np.ndarray] = field(
        default_factory=lambda: {k: np.zeros(0) for k in SCALARS})
    _roi: dict[str, np.ndarray] = field(default_factory=dict)
    _carpet: np.ndarray | None = None
    _slice_trans: np.ndarray | None = None
    _seen: set[int] = field(default_factory=set)

    # -- views --

    @property
    def indices(self) -> np.ndarray:
        return self._indices[:self.n]

    @property
    def motion(self) -> np.ndarray:
        return self._motion[:self.n]

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        return {k: v[:self.n] for k, v in self._scalars.items()}

    def scalar(self, name: str) -> np.ndarray:
        """(n,) float64 values of one SCALARS field."""
        return self._scalars[name][:self.n]

    @property
    def roi(self) -> dict[str, np.ndarray]:
        return {k: v[:self.n] for k, v in self._roi.items()}

    @property
    def carpet(self) -> np.ndarray | None:
        return None if self._carpet is None else self._carpet[:, :self.n]

    @property
    def mode(self) -> str:
        """``brain`` or ``spinal_cord`` (series.start ``mode``; brain when absent)."""
        return str(self.start.get("mode") or "brain")

    @property
    def slice_trans(self) -> np.ndarray | None:
        """(n, nz, 2) float64 per-slice translations (slice_trans_x, slice_trans_y, mm;
        NaN where null), or None when no message carried them (brain mode)."""
        return None if self._slice_trans is None else self._slice_trans[:self.n]

    def slice_profile(self, name: str = "slice_tsnr") -> np.ndarray | None:
        """(nz,) float64 of a per-slice field of the newest volume (NaN for null), or None."""
        values = self.last.get(name)
        if not isinstance(values, list) or not values:
            return None
        return np.asarray([_number(v) for v in values], dtype=np.float64)

    @property
    def n_expected(self) -> int | None:
        value = self.start.get("n_expected")
        return int(value) if value else None

    @property
    def tr_s(self) -> float | None:
        value = self.start.get("tr_s")
        return float(value) if value else None

    @property
    def fd_thresholds(self) -> list[str]:
        """Threshold keys of ``usable_frames`` (mm, as strings like "0.2"), ascending."""
        keys = list((self.last.get("usable_frames") or {}).keys())
        return sorted(keys, key=float)

    @property
    def design(self) -> dict[str, Any] | None:
        value = self.start.get("design")
        return value if isinstance(value, dict) and value.get("columns") else None

    def activation_name(self) -> str | None:
        """The first ``t:<contrast>`` map, by name."""
        names = sorted(n for n in self.maps if n.startswith("t:"))
        return names[0] if names else None

    def roi_name(self) -> str | None:
        """The feedback ROI when the summary names it, else the first ROI."""
        return next(iter(self._roi), None)

    # -- folding --

    def reset(self, series: str | None, start: dict[str, Any] | None = None) -> None:
        """Forget everything; begin ``series`` (None: waiting)."""
        generation = self.generation + 1
        self.__init__()  # type: ignore[misc]
        self.generation = generation
        self.series = series
        self.start = dict(start or {})
        self.dirty = set(PANELS)

    def fold(self, message: Message) -> None:
        """Take in one message (in publication order)."""
        header = message.header
        series = header.get("series")
        if message.topic == TOPIC_SERIES_START:
            if series != self.series or self.end is not None or self.n:
                self.reset(series, header)
            else:  # the same start twice (snapshot then live): keep the data
                self.start = dict(header)
                self.dirty.add("status")
            return
        if series and series != self.series and message.topic in (TOPIC_VOLUME, TOPIC_MAP):
            self.reset(series)  # joined without a series.start: draw what comes
        if message.topic == TOPIC_VOLUME:
            self._fold_volume(message)
        elif message.topic == TOPIC_MAP:
            if not message.arrays:
                return
            self.maps[str(header.get("name"))] = MapEntry(
                np.asarray(message.arrays[0], dtype=np.float32),
                np.asarray(header.get("affine") or np.eye(4), dtype=np.float64),
                header.get("index"))
            self.dirty.add("maps")
        elif message.topic == TOPIC_ALERT:
            if series and self.series and series != self.series:
                return  # about another series
            self.alerts.append(dict(header))
            self.dirty.update(("status", "fd"))
        elif message.topic == TOPIC_SERIES_END:
            if series == self.series:
                self.end = dict(header)
                self.dirty.update(("status", "usable"))

    def _grow(self, k_carpet: int | None) -> None:
        # The announced run length sizes the first buffers, up to PREALLOCATED_VOLUMES:
        # past that they double with what arrives (a series.start announcing 2**31 - 1
        # volumes must not make 17 TB of carpet).
        capacity = max(64, 2 * self._capacity, min(self.n_expected or 0, PREALLOCATED_VOLUMES))
        if self.n < self._capacity:
            return

        def grow(a: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((capacity, *a.shape[1:]), fill, dtype=a.dtype)
            out[:a.shape[0]] = a
            return out

        self._indices = grow(self._indices, -1)
        self._motion = grow(self._motion, np.nan)
        self._scalars = {k: grow(v, np.nan) for k, v in self._scalars.items()}
        self._roi = {k: grow(v, np.nan) for k, v in self._roi.items()}
        if self._slice_trans is not None:
            self._slice_trans = grow(self._slice_trans, np.nan)
        if self._carpet is not None:
            carpet = np.full((self._carpet.shape[0], capacity), np.nan, np.float32)
            carpet[:, :self._carpet.shape[1]] = self._carpet
            self._carpet = carpet
        self._capacity = capacity

    def _fold_volume(self, message: Message) -> None:
        h = message.header
        index = int(h.get("index", -1))
        if index in self._seen:
            return
        self._seen.add(index)
        carpet_info = h.get("carpet")
        carpet_values = None
        if isinstance(carpet_info, dict) and message.arrays:
            carpet_values = message.arrays[int(carpet_info.get("array", 0))]
        self._grow(None)
        i = self.n
        self._indices[i] = index
        self._motion[i] = [_number(h.get(k)) for k in MOTION_NAMES]
        for k in SCALARS:
            self._scalars[k][i] = _number(h.get(k))
        for name, value in (h.get("roi") or {}).items():
            if name not in self._roi:
                self._roi[name] = np.full(self._capacity, np.nan)
            self._roi[name][i] = _number(value)
        self._fold_slices(h, i)
        if carpet_values is not None:
            if self._carpet is None or self._carpet.shape[0] != carpet_values.size:
                self._carpet = np.full((carpet_values.size, self._capacity), np.nan, np.float32)
            self._carpet[:, i] = carpet_values
        self.flags.append([str(f) for f in (h.get("flags") or [])])
        self.slice_spikes.append([int(s) for s in (h.get("slice_spikes") or [])])
        if isinstance(h.get("mni_registration"), dict):
            self.mni_registration = h["mni_registration"]
        self.last = dict(h)
        self.n += 1
        self.dirty.update(("status", "motion", "fd", "dvars", "carpet", "roi", "usable", "cord"))

    def _fold_slices(self, h: dict[str, Any], i: int) -> None:
        """Keep the per-slice translations of spinal cord mode (row ``i``)."""
        tx, ty = h.get("slice_trans_x"), h.get("slice_trans_y")
        nz = len(tx) if isinstance(tx, list) else len(h.get("slice_tsnr") or []) \
            if self.mode == "spinal_cord" else 0
        if not nz:
            return
        if self._slice_trans is None or self._slice_trans.shape[1] != nz:
            self._slice_trans = np.full((self._capacity, nz, 2), np.nan)
        if isinstance(tx, list) and isinstance(ty, list) and len(tx) == len(ty) == nz:
            self._slice_trans[i, :, 0] = [_number(v) for v in tx]
            self._slice_trans[i, :, 1] = [_number(v) for v in ty]

    # -- derived values the view draws --

    def spike_indices(self) -> np.ndarray:
        """Volume indices flagged as spikes or outliers, or with slice spikes."""
        hits = [int(self._indices[i]) for i, (f, s) in enumerate(zip(self.flags, self.slice_spikes))
                if s or any(x in SPIKE_FLAGS for x in f)]
        return np.asarray(hits, dtype=np.int64)

    def alert_indices(self) -> list[tuple[int, str]]:
        """(volume index, level) of the alerts that name a volume."""
        return [(int(a["index"]), str(a.get("level"))) for a in self.alerts
                if a.get("index") is not None]

    def carpet_image(self, clip: float = 3.0) -> np.ndarray | None:
        """The carpet as drawn: each voxel's values minus its mean over the volumes so far,
        divided by its standard deviation (z-scores, clipped to +-``clip``).

        Returns
        -------
        (K, n) float32 or None (no carpet samples in the messages). Voxels without
        variance are 0.
        """
        carpet = self.carpet
        if carpet is None or carpet.shape[1] == 0:
            return None
        data = carpet.astype(np.float64)
        mean = np.nanmean(data, axis=1, keepdims=True) if data.shape[1] else 0.0
        std = np.nanstd(data, axis=1, keepdims=True)
        z = np.divide(data - mean, std, out=np.zeros_like(data), where=std > 0)
        return np.clip(z, -clip, clip).astype(np.float32)

    def newest_alert(self) -> dict[str, Any] | None:
        return self.alerts[-1] if self.alerts else None

    def status_line(self) -> str:
        """Series, volume n of N, TR, latency, newest alert (or waiting for the scanner)."""
        if self.series is None:
            return "waiting for scanner ..."
        parts = [f"series {self.series}"]
        n_exp = self.n_expected
        if self.n:
            parts.append(f"volume {int(self.indices[-1]) + 1} of {n_exp if n_exp else '?'}")
        else:
            parts.append(f"waiting for the first volume (of {n_exp if n_exp else '?'})")
        parts.append(f"TR {self.tr_s:g} s" if self.tr_s else "TR ?")
        latency = self.last.get("latency_s")
        if latency is not None:
            parts.append(f"latency {1000 * float(latency):.0f} ms")
        alert = self.newest_alert()
        parts.append(f"alert: {alert.get('level')} {alert.get('code')} "
                     f"(vol {alert.get('index')}): {str(alert.get('message'))[:70]}"
                     if alert else "no alerts")
        if self.end is not None:
            verdict = (self.end.get("summary") or {}).get("verdict")
            parts.append(f"ENDED ({self.end.get('n_volumes')} volumes"
                         + (f", verdict {verdict}" if verdict else "") + ")")
        return "  |  ".join(parts)

    def usable_lines(self) -> list[str]:
        """Per FD threshold: usable frames, clean minutes (QC stage) or n/a."""
        usable = self.last.get("usable_frames") or {}
        clean = self.last.get("clean_minutes") or {}
        lines = []
        for key in self.fd_thresholds:
            minutes = clean.get(key)
            lines.append(f"FD <= {key} mm: {usable[key]} of {self.n} frames, "
                         + (f"{float(minutes):.1f} min" if minutes is not None else "min n/a"))
        return lines

    def site_norm_line(self) -> str:
        """The newest ``site_percentiles`` (the series' QC figures as percentiles among
        the earlier series of its protocol, docs/messages.md) as one short line, or ""."""
        ranks = (self.end or {}).get("site_percentiles") or self.last.get("site_percentiles")
        if not isinstance(ranks, dict) or all(v is None for v in ranks.values()):
            return ""
        names = (("tsnr", "tSNR"), ("snr", "SNR"), ("fd_mean", "FD"),
                 ("usable_fraction", "usable"), ("dvars_std", "DVARS"))
        return "site percentile: " + "  ".join(
            f"{label} P{float(ranks[key]):.0f}" for key, label in names
            if ranks.get(key) is not None)

    def activation_text(self) -> str:
        """The activation criterion of the newest volume as one short phrase, or ""."""
        return activation_phrase(self.last.get("activation_criterion"))

    def criterion(self) -> dict[str, Any] | None:
        """The QC stage's clean-data criterion (fraction, minutes, eta_s ...) or None."""
        value = self.last.get("criterion")
        return value if isinstance(value, dict) and value.get("fraction") is not None else None
