"""Philips PAR/REC real-time dumps: one volume per PAR/REC pair, through the folder watcher.

Philips' real-time export (XTC, the "Research image export tool") writes each volume,
as it is reconstructed, into a series folder as a pair: ``Dump-0000.par`` (a text header)
and ``Dump-0000.rec`` (the pixels), then ``Dump-0001.*``, and so on (the layout pyneal's
Philips reader watches). The watcher (:mod:`rtsc.intake.watcher`) takes a pair only once
both files have stopped changing, the PAR is whole (its closing line is there) and the
REC holds exactly the bytes the PAR declares (:func:`par_summary`, a plain text scan);
it archives both byte for byte and hands the worker one :class:`ParRecDump`. On the
worker, :class:`ParRecIntake` reads it with nibabel (:func:`read_dump`), places it in
its run and releases the volumes of each series in order.

How a dump is read (the rules were checked on the XTC dumps in
``tests/data/realdata/pyneal/Philips_env``):

* **Image type.** A dump may hold several image types of the same slices. XTC writes the
  magnitude as ``image_type_mr`` 16 and the phase as 17 (rescale intercept -3142: the
  stored range mapped onto +-pi x 1000). Type 0 (magnitude) is taken when present, else
  the lowest type present (which is also what pyneal's reader takes), unless
  ``watcher.parrec_image_type`` names one; the other types are archived only, and an
  ``info`` alert says so once per series.
* **Voxel values.** nibabel's default ``dv`` scaling, per slice: displayed value = stored
  value x rescale slope + rescale intercept (the console's values), as float32. Not
  ``fp`` (= DV / (rescale slope x scale slope)).
* **Volume index.** The dump number of the file name (``Dump-0003`` -> 3); a file that
  numbers its dynamics through the run ("Max. number of dynamics" above 1) gives
  dynamic - 1 instead; else "Acquisition nr" - 1 (which XTC counts up per dump).
* **Run length.** "Max. number of dynamics" when it is above 1; XTC writes 1 in every
  dump, so the run length is unknown (``n_expected`` None).
* **TR.** "Repetition time [ms]"; XTC writes 1 there, and 0.025 as the image lines' echo
  time for a 25 ms TE: it writes seconds in these fields. A value below 20 "ms" cannot be
  the TR of a multi-slice EPI volume, so it is read as seconds when the echo times are
  in seconds too (below 1: no EPI echo is under 1 ms); otherwise the TR is unknown.
* **Geometry.** nibabel computes the affine from the general section's "Angulation
  midslice" and "Off Centre midslice" only. XTC leaves both at zero, while every image
  line carries the stack's angulation and its own slice off-centre. When the general
  section is all zero and the image lines are not, the image lines' angulation and the
  midpoint of the first and last slices' off-centres (the midslice) are put in the
  general section before nibabel computes the affine.
* **Series identity.** A hash of the folder (relative to the watched folder) and the PAR's
  examination name, protocol name, examination date/time, series type and
  reconstruction number: no name leaves the process in clear.
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from rtsc.config import WatcherConfig
from rtsc.dicom.assemble import AssemblyAlert, Event
from rtsc.errors import DicomError
from rtsc.volume import SeriesInfo, Volume, series_id

log = logging.getLogger(__name__)

PAR_SUFFIX = ".par"
REC_SUFFIX = ".rec"
#: General-section fields whose values make a series' identity (hashed, never published).
IDENTITY_FIELDS = ("Examination name", "Protocol name", "Examination date/time",
                   "Series Type", "Reconstruction nr")
_END_MARKER = "END OF DATA DESCRIPTION FILE"
_DUMP_NAME = re.compile(r"dump[-_]?(\d+)", re.IGNORECASE)
# A "Repetition time [ms]" below this cannot be a multi-slice EPI volume's TR in ms.
_MIN_TR_MS = 20.0
# Labels that may vary between the volumes of one PAR (nibabel's volume labels) and that
# one rtsc series cannot hold: a dump with several of these is not a BOLD time series.
_UNSUPPORTED_LABELS = ("echo number", "cardiac phase number", "label type",
                       "scanning sequence", "gradient orientation number",
                       "diffusion b value number")


def is_parrec(path: Path) -> bool:
    """True for a ``.par`` or ``.rec`` file (any case)."""
    return path.suffix.lower() in (PAR_SUFFIX, REC_SUFFIX)


def dump_number(stem: str) -> int | None:
    """The dump number of an XTC file name (``Dump-0003`` -> 3), or None."""
    match = _DUMP_NAME.fullmatch(stem)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ParSummary:
    """What the watcher needs from a PAR: whether it is whole and what its REC must hold.

    Attributes
    ----------
    complete : bool
        The closing ``# === END OF DATA DESCRIPTION FILE`` line and at least one image
        line are there (a PAR still being written is not).
    rec_bytes : int or None
        Bytes the REC must hold: the sum over image lines of recon x * recon y * pixel
        bits / 8. None when the PAR does not say (not a V4 PAR, or a malformed line).
    fields : dict
        General-section label -> value (text as written, stripped).
    """

    complete: bool
    rec_bytes: int | None
    fields: dict[str, str]


def par_summary(par: bytes) -> ParSummary:
    """Scan a PAR's text for completeness, the REC size it declares and its general fields.

    A line-by-line scan of a ~14 kB text, cheap enough for the watcher thread; the full
    parse (nibabel) runs on the worker.
    """
    text = par.decode("latin-1")
    fields: dict[str, str] = {}
    complete = False
    version_4 = False
    n_images = 0
    total: int | None = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if "image export tool" in line.lower():
                version_4 = line.split()[-1].upper().startswith("V4")
            elif _END_MARKER in line.upper():
                complete = True
            continue
        if line.startswith("."):
            label, _, value = line[1:].partition(":")
            fields[label.strip()] = value.strip()
            continue
        if not line[0].isdigit():
            continue
        n_images += 1
        parts = line.split()
        try:  # V4: image pixel size (bits) is column 8, recon resolution x, y columns 10-11
            bits, nx, ny = int(parts[7]), int(parts[9]), int(parts[10])
        except (IndexError, ValueError):
            total = None
            continue
        if total is not None:
            total += nx * ny * bits // 8
    rec_bytes = total if version_4 and n_images else None
    return ParSummary(complete=complete and n_images > 0, rec_bytes=rec_bytes, fields=fields)


def series_key(fields: Mapping[str, str], folder: str) -> str:
    """The key a PAR/REC dump's series id is hashed from (:func:`rtsc.volume.series_id`).

    Parameters
    ----------
    fields : the PAR's general section (:attr:`ParSummary.fields`)
    folder : the dump's folder relative to the watched folder (XTC writes each series to
        its own folder; the identity fields alone are blank in XTC dumps)
    """
    return "\x1f".join(["parrec", folder, *(fields.get(name, "") for name in IDENTITY_FIELDS)])


@dataclass(frozen=True)
class ParRecDump:
    """A Philips PAR/REC pair (or half of one) handed from the watcher to the worker.

    Attributes
    ----------
    name : str
        The scanner's file stem (``Dump-0003``), for alerts.
    series_key : str
        Hashed into the series id (:func:`series_key`); empty for half a pair.
    t_received : float
        When the pair was taken, seconds since the epoch.
    par, rec : bytes or None
        The files' bytes, as archived.
    par_path, rec_path : Path or None
        The archived copies.
    dump : int or None
        Dump number from the file name (:func:`dump_number`).
    error : str or None
        Why the files cannot be used (half a pair); then ``code`` is the alert's code.
    code : str
    """

    name: str
    series_key: str
    t_received: float
    par: bytes | None = None
    rec: bytes | None = None
    par_path: Path | None = None
    rec_path: Path | None = None
    dump: int | None = None
    error: str | None = None
    code: str = "bad_parrec"

    @property
    def archived(self) -> str:
        """The archived file names, for alerts."""
        names = [p.name for p in (self.par_path, self.rec_path) if p is not None]
        return " + ".join(names) or "nothing"


@dataclass(frozen=True)
class DumpContent:
    """What one PAR/REC pair holds, as :func:`read_dump` reads it.

    Attributes
    ----------
    volumes : list of (int, ndarray)
        0-based index in the run, and the (nx, ny, nz) float32 Fortran-ordered voxels
        (``dv`` scaling); i runs along the PAR's recon x, j along recon y, k along the
        slice numbers.
    affine : (4, 4) float64, voxel -> RAS+ mm (read-only)
    tr_s : float or None
        Repetition time, seconds.
    n_expected : int or None
        Run length ("Max. number of dynamics" when above 1).
    description : str
        Protocol name with anything but [A-Za-z0-9_-] removed.
    image_type : int
        ``image_type_mr`` of the images taken.
    image_types : tuple of int
        Every ``image_type_mr`` the PAR holds.
    notes : tuple of str
        How the header was read where it needed interpreting (TR units, geometry).
    """

    volumes: list[tuple[int, np.ndarray]]
    affine: np.ndarray
    tr_s: float | None
    n_expected: int | None
    description: str
    image_type: int
    image_types: tuple[int, ...]
    notes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volumes[0][1].shape)  # type: ignore[return-value]


def choose_image_type(types: np.ndarray, wanted: int | None = None) -> int:
    """The ``image_type_mr`` to process among those of a PAR.

    Parameters
    ----------
    types : the image types present
    wanted : ``watcher.parrec_image_type``; None: 0 (magnitude) if present, else the lowest

    Raises
    ------
    DicomError
        ``wanted`` is not among them (code ``unsupported``).
    """
    present = sorted({int(t) for t in np.asarray(types).ravel()})
    if wanted is not None:
        if wanted not in present:
            raise DicomError(f"no image of type {wanted} (watcher.parrec_image_type); the PAR "
                             f"holds types {present}", code="unsupported")
        return wanted
    return 0 if 0 in present else present[0]


def repetition_time_s(tr_field: float, echo_times: np.ndarray) -> tuple[float | None, str | None]:
    """TR in seconds from the PAR's "Repetition time [ms]", with a note when interpreted.

    Parameters
    ----------
    tr_field : the first value of "Repetition time [ms]"
    echo_times : the image lines' echo times of the images taken (ms, or s in XTC dumps)

    Returns
    -------
    (tr_s, note)
        ``tr_s`` None when the field is unusable; ``note`` says how an unusual value was
        read (None for an ordinary TR in ms).
    """
    if not math.isfinite(tr_field) or tr_field <= 0:
        return None, f"'Repetition time [ms]' is {tr_field:g}: TR unknown"
    if tr_field >= _MIN_TR_MS:
        return tr_field / 1000.0, None
    echoes = np.asarray(echo_times, dtype=np.float64)
    if echoes.size and np.all((echoes > 0) & (echoes < 1.0)):
        return float(tr_field), (f"'Repetition time [ms]' {tr_field:g} and echo time "
                                 f"{float(echoes.max()):g} read as seconds (XTC real-time "
                                 f"export): TR {tr_field:g} s")
    return None, (f"'Repetition time [ms]' is {tr_field:g}, too short for a volume's TR in "
                  "ms and the echo times are not in seconds: TR unknown")


def _complete_geometry(general: dict, defs: np.ndarray) -> str | None:
    """Put the image lines' angulation and midslice off-centre in a general section that
    leaves them at zero (XTC); returns a note when it did."""
    angulation = np.asarray(defs["image angulation"], dtype=np.float64)
    offcentre = np.asarray(defs["image offcentre"], dtype=np.float64)
    general_zero = (not np.any(np.asarray(general["angulation"], dtype=np.float64))
                    and not np.any(np.asarray(general["off_center"], dtype=np.float64)))
    if not general_zero or not (np.any(angulation) or np.any(offcentre)):
        return None
    if np.ptp(angulation, axis=0).max() > 1e-3:
        raise DicomError("the image lines' angulations differ and the general section gives "
                         "none: several stacks in one dump are not supported",
                         code="unsupported")
    slices = np.asarray(defs["slice number"])
    first = offcentre[slices == slices.min()][0]
    last = offcentre[slices == slices.max()][0]
    general["angulation"] = angulation[0].copy()
    general["off_center"] = (first + last) / 2.0
    return ("geometry from the image lines (the general section's midslice angulation and "
            "off-centre are zero)")


def _rec_in_line_order(rec: bytes, defs: np.ndarray, image_bytes: int) -> bytes:
    """The REC's images in PAR line order (nibabel reads them in that order)."""
    index = np.asarray(defs["index in REC file"], dtype=np.int64)
    n = len(index)
    if np.array_equal(index, np.arange(n)):
        return rec
    if not np.array_equal(np.sort(index), np.arange(n)):
        raise DicomError(f"'index in REC file' is not a permutation of 0..{n - 1}")
    images = np.frombuffer(rec, dtype=np.uint8).reshape(n, image_bytes)
    return images[index].tobytes()


def read_dump(par: bytes, rec: bytes, dump: int | None = None,
              image_type: int | None = None) -> DumpContent:
    """Read one PAR/REC pair into volumes (runs on the pipeline worker).

    Parameters
    ----------
    par, rec : the two files' bytes
    dump : the dump number of the file name (:func:`dump_number`), or None
    image_type : ``watcher.parrec_image_type`` (None: see :func:`choose_image_type`)

    Returns
    -------
    DumpContent

    Raises
    ------
    DicomError
        The PAR cannot be parsed (code ``bad_parrec``), the REC does not hold what the
        PAR declares (``bad_parrec``), or the dump is not one BOLD time series
        (``unsupported``: several echoes, cardiac phases, labels or stacks).
    """
    from nibabel.parrec import PARRECArrayProxy, PARRECError, PARRECHeader, parse_PAR_header

    try:
        general, defs = parse_PAR_header(io.StringIO(par.decode("latin-1")))
    except (PARRECError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise DicomError(f"not a readable PAR header ({type(exc).__name__}: {exc})",
                         code="bad_parrec") from exc
    if len(defs) == 0:
        raise DicomError("the PAR lists no image", code="bad_parrec")
    bits = np.asarray(defs["image pixel size"], dtype=np.int64)
    recon = np.asarray(defs["recon resolution"], dtype=np.int64).reshape(len(defs), 2)
    declared = int(np.sum(recon[:, 0] * recon[:, 1] * bits // 8))
    if len(rec) != declared:
        raise DicomError(f"the REC holds {len(rec)} bytes, the PAR declares {declared} "
                         f"({len(defs)} images)", code="bad_parrec")
    chosen = choose_image_type(defs["image_type_mr"], image_type)
    taken = defs["image_type_mr"] == chosen
    notes = []
    general = dict(general)
    geometry = _complete_geometry(general, defs[taken])
    if geometry is not None:
        notes.append(geometry)
    try:
        header = PARRECHeader(general, defs, permit_truncated=False, strict_sort=True)
        if np.unique(recon, axis=0).shape[0] != 1 or np.unique(bits).size != 1:
            raise PARRECError("images of different sizes")
        image_bytes = int(recon[0, 0] * recon[0, 1] * bits[0] // 8)
        proxy = PARRECArrayProxy(io.BytesIO(_rec_in_line_order(rec, defs, image_bytes)),
                                 header, mmap=False, scaling="dv")
        data = np.asarray(proxy, dtype=np.float64)
        affine = np.asarray(header.get_affine(origin="scanner"), dtype=np.float64)
        labels = header.get_volume_labels()
    except (PARRECError, ValueError) as exc:
        raise DicomError(f"nibabel cannot read the PAR/REC ({exc})", code="bad_parrec") from exc
    if data.ndim == 3:
        data = data[..., None]
    n_vols = data.shape[3]
    keep = np.ones(n_vols, dtype=bool)
    if "image_type_mr" in labels:
        keep &= np.asarray(labels["image_type_mr"]) == chosen
    for name in _UNSUPPORTED_LABELS:
        if name in labels and np.unique(np.asarray(labels[name])[keep], axis=0).shape[0] > 1:
            raise DicomError(f"the dump's images differ in {name!r}: not one BOLD time series",
                             code="unsupported")
    if "dynamic scan number" in labels:
        dynamics = [int(d) for d in np.asarray(labels["dynamic scan number"])[keep]]
    else:
        dynamics = [int(np.asarray(defs["dynamic scan number"])[taken][0])] * int(keep.sum())
    if len(set(dynamics)) != len(dynamics):
        raise DicomError("the dump holds several volumes of one dynamic", code="unsupported")
    max_dynamics = int(general.get("max_dynamics", 1) or 1)
    indices = _indices(dynamics, dump, max_dynamics, general.get("acq_nr"))
    volumes = [(index, np.asfortranarray(data[..., v], dtype=np.float32))
               for index, v in zip(indices, np.flatnonzero(keep))]
    volumes.sort(key=lambda item: item[0])
    tr_field = float(np.asarray(general.get("repetition_time", [0.0])).ravel()[0])
    tr_s, tr_note = repetition_time_s(tr_field, np.asarray(defs["echo_time"])[taken])
    if tr_note is not None:
        notes.append(tr_note)
    affine.flags.writeable = False
    description = re.sub(r"[^A-Za-z0-9_-]", "", str(general.get("protocol_name", "")))[:64]
    return DumpContent(volumes=volumes, affine=affine, tr_s=tr_s,
                       n_expected=max_dynamics if max_dynamics > 1 else None,
                       description=description, image_type=chosen,
                       image_types=tuple(sorted({int(t) for t in defs["image_type_mr"]})),
                       notes=tuple(notes))


def _indices(dynamics: list[int], dump: int | None, max_dynamics: int,
             acquisition: object) -> list[int]:
    """0-based run indices of a dump's volumes (rules in the module docstring)."""
    if len(dynamics) > 1 or (dump is None and max_dynamics > 1):
        if min(dynamics) < 1:
            raise DicomError(f"dynamic scan numbers {dynamics} do not start at 1",
                             code="bad_parrec")
        return [d - 1 for d in dynamics]
    if dump is not None:
        return [dump]
    try:
        number = int(acquisition)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = 0
    if number >= 1:
        return [number - 1]
    raise DicomError("cannot place the dump in its run: no dump number in the file name, "
                     "one dynamic, no acquisition number", code="unsupported")


@dataclass
class _DumpSeries:
    """A PAR/REC series on the worker."""

    info: SeriesInfo
    shape: tuple[int, ...]
    affine: np.ndarray
    next_index: int = 0
    ready: dict[int, tuple[Volume, float]] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)


class ParRecIntake:
    """PAR/REC dumps in, volumes out, in run order per series (lives on the worker).

    A volume is released as soon as every earlier index of its series has been; one whose
    predecessor has not arrived waits ``watcher.parrec_reorder_s`` for it (dumps exported
    out of order), then is released without it (the timing stage reports the gap). A dump
    that arrives after a later one was released, a duplicate, or one whose geometry differs
    from its series' first is archived and alerted, not processed.

    Parameters
    ----------
    config : WatcherConfig
    clock : callable returning seconds since the epoch (tests pass a fake clock)
    """

    def __init__(self, config: WatcherConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._series: dict[str, _DumpSeries] = {}

    def add(self, item: ParRecDump) -> list[Event]:
        """Take one dump; return the volumes and alerts it made ready."""
        sid = series_id(item.series_key) if item.series_key else None
        if item.error is not None or item.par is None or item.rec is None:
            return [AssemblyAlert("warning", item.code, f"{item.name}: "
                                  f"{item.error or 'incomplete PAR/REC pair'}", sid)]
        assert sid is not None
        where = f"{item.name} (archived as {item.archived})"
        try:
            content = read_dump(item.par, item.rec, item.dump, self.config.parrec_image_type)
        except DicomError as exc:
            log.warning("%s: %s", where, exc)
            return [AssemblyAlert("warning", exc.code, f"{where}: {exc}; not processed", sid)]
        events: list[Event] = []
        state = self._series.get(sid)
        if state is None:
            info = SeriesInfo(series=sid, tr_s=content.tr_s, n_expected=content.n_expected,
                              series_number=None, description=content.description,
                              source="parrec")
            state = _DumpSeries(info=info, shape=content.shape, affine=content.affine)
            self._series[sid] = state
            events.append(AssemblyAlert("info", "parrec_series", _series_note(content), sid,
                                        content.volumes[0][0]))
        now = self.clock()
        for index, data in content.volumes:
            problem = self._problem(state, content, index)
            if problem is not None:
                level, code, text = problem
                log.warning("%s: %s", where, text)
                events.append(AssemblyAlert(level, code, f"{where}: {text}", sid, index))
                continue
            volume = Volume(data=data, affine=content.affine, index=index, info=state.info,
                            t_acquired=None, t_received=item.t_received, t_assembled=now,
                            stored_dtype=np.dtype(np.float32))
            state.ready[index] = (volume, now)
        events.extend(self._release(state, now))
        return events

    def poll(self, now: float | None = None) -> list[Event]:
        """Release volumes that have waited ``parrec_reorder_s`` for a missing predecessor."""
        now = self.clock() if now is None else now
        events: list[Event] = []
        for state in self._series.values():
            events.extend(self._release(state, now))
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (seconds since the epoch), or None."""
        deadlines = [state.ready[min(state.ready)][1] + self.config.parrec_reorder_s
                     for state in self._series.values() if state.ready]
        return min(deadlines) if deadlines else None

    def forget(self, series: str) -> None:
        """Drop a finished series' state."""
        self._series.pop(series, None)

    @staticmethod
    def _problem(state: _DumpSeries, content: DumpContent,
                 index: int) -> tuple[str, str, str] | None:
        if content.shape != state.shape or not np.allclose(content.affine, state.affine,
                                                           atol=1e-3):
            return ("warning", "geometry_changed",
                    f"volume {index}: matrix {content.shape} / geometry changed from "
                    f"{state.shape}; archived, not processed")
        if index in state.published or index in state.ready:
            return "info", "duplicate_volume", f"volume {index} received twice; archived only"
        if index < state.next_index:
            return ("warning", "out_of_order",
                    f"volume {index} arrived after volume {state.next_index - 1} was "
                    "processed; archived, not processed")
        return None

    def _release(self, state: _DumpSeries, now: float) -> list[Event]:
        out: list[Event] = []
        while state.ready:
            index = min(state.ready)
            volume, since = state.ready[index]
            if index > state.next_index and now - since < self.config.parrec_reorder_s:
                break  # an earlier dump may still come
            del state.ready[index]
            state.published.add(index)
            state.next_index = index + 1
            out.append(volume)
        return out


def _series_note(content: DumpContent) -> str:
    """The ``parrec_series`` alert: what was taken from the dumps and how."""
    others = [t for t in content.image_types if t != content.image_type]
    parts = [f"Philips PAR/REC dumps: image type {content.image_type} processed"]
    if others:
        parts[0] += f", types {others} archived only"
    parts.extend(content.notes)
    return "; ".join(parts)
