"""`rtsc replay`: a DICOM folder or a 4D NIfTI through the same pipeline, at TR pace.

The replayer feeds the running service's worker queue, as the receiver and the folder
watcher do: DICOM files are archived first (byte for byte) and handed over as
:class:`~rtsc.dicom.incoming.Incoming` items, so the assembler, the pipeline, the
publisher and the session writer are exactly those of `rtsc run`. A NIfTI has no DICOM
to assemble: its volumes are handed over as :class:`~rtsc.volume.Volume` objects (the
worker treats them as assembled). Volume ``t`` is handed over at ``t0 + t * TR / speed``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from rtsc.dicom.geometry import int_or_none
from rtsc.dicom.incoming import Incoming, read_part10_file
from rtsc.errors import RtscError
from rtsc.output.session import SessionStore
from rtsc.volume import SeriesInfo, Volume, series_id

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ReplayItem:
    """One thing to hand to the worker, with its place in the schedule.

    Attributes
    ----------
    volume : int
        0-based volume number within its series (the pacing slot).
    tr_s : float
        Repetition time of its series, seconds.
    make : callable() -> Incoming or Volume
        Builds the item when its time comes (reads and archives the file then).
    """

    volume: int
    tr_s: float
    make: Callable[[], Any]


def sidecar_phase_encoding(path: Path) -> dict[str, Any]:
    """``phase_encoding_axis`` and ``bandwidth_pe_hz`` of a NIfTI from its BIDS sidecar
    (``<name>.json`` beside it, as dcm2niix writes): PhaseEncodingDirection (``i``/``j``,
    the sign ignored) and BandwidthPerPixelPhaseEncode (Hz); None for what is missing."""
    name = path.name
    stem = name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") \
        else name
    side = path.with_name(stem + ".json")
    out: dict[str, Any] = {"phase_encoding_axis": None, "bandwidth_pe_hz": None}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    if not isinstance(meta, dict):
        return out
    direction = str(meta.get("PhaseEncodingDirection") or "").rstrip("-")
    if direction in ("i", "j"):
        out["phase_encoding_axis"] = direction
    bandwidth = meta.get("BandwidthPerPixelPhaseEncode")
    if isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) \
            and bandwidth > 0:
        out["bandwidth_pe_hz"] = float(bandwidth)
    return out

def is_nifti(path: Path) -> bool:
    """True for a .nii or .nii.gz file."""
    return path.is_file() and path.name.endswith(_NIFTI_SUFFIXES)


def nifti_items(path: Path, tr_s: float | None = None) -> list[ReplayItem]:
    """The volumes of a 4D NIfTI as replay items.

    Parameters
    ----------
    path : a 4D .nii or .nii.gz file
    tr_s : repetition time, seconds; None reads pixdim[4] (converted from its units)

    Raises
    ------
    RtscError
        Not 4D, or no usable TR.
    """
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 4:
        raise RtscError(f"{path.name}: a 4D NIfTI is needed, its shape is {img.shape}")
    if tr_s is None:
        zoom = float(img.header.get_zooms()[3])
        unit = img.header.get_xyzt_units()[1]
        tr_s = zoom / 1000.0 if unit == "msec" else zoom / 1e6 if unit == "usec" else zoom
    if not tr_s or tr_s <= 0:
        raise RtscError(f"{path.name}: no repetition time in the header; pass --tr")
    stat = path.stat()
    info = SeriesInfo(series=series_id(f"nifti:{path.resolve()}:{stat.st_mtime_ns}"),
                      tr_s=float(tr_s), n_expected=int(img.shape[3]), series_number=None,
                      description=re.sub(r"[^A-Za-z0-9_-]", "", path.name.split(".")[0])[:64],
                      source="nifti", **sidecar_phase_encoding(path))
    affine = np.asarray(img.affine, dtype=np.float64)
    dataobj = img.dataobj
    stored = np.dtype(img.get_data_dtype())
    # A NIfTI's data may be scaled (scl_slope): keep the stored dtype only when it is not.
    slope = img.dataobj.slope if hasattr(img.dataobj, "slope") else 1.0
    inter = img.dataobj.inter if hasattr(img.dataobj, "inter") else 0.0
    if stored.kind not in "iu" or (slope, inter) not in ((1.0, 0.0),):
        stored = np.dtype(np.float32)

    def make(t: int) -> Callable[[], Volume]:
        def build() -> Volume:
            data = np.asfortranarray(np.asarray(dataobj[..., t], dtype=np.float32))
            now = time.time()
            return Volume(data=data, affine=affine, index=t, info=info, t_acquired=None,
                          t_received=now, t_assembled=now, stored_dtype=stored)
        return build

    return [ReplayItem(t, float(tr_s), make(t)) for t in range(img.shape[3])]


def _headers(folder: Path) -> Iterator[tuple[Path, pydicom.Dataset]]:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            yield path, read_part10_file(path)  # values are decoded only when read
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.info("replay: %s skipped (%s)", path.name, exc)


def acquisition_order_key(ds: pydicom.Dataset, name: str) -> tuple[int, int, str]:
    """Sort key of a file within its series, in acquisition order: (volume number,
    InstanceNumber, file name).

    The volume number is AcquisitionNumber (Siemens counts volumes there; GE writes 1 for
    every image and numbers them volume after volume), else TemporalPositionIdentifier,
    else 1; the file name breaks ties.
    """
    volume = int_or_none(ds.get("AcquisitionNumber")) \
        or int_or_none(ds.get("TemporalPositionIdentifier")) or 1
    return volume, int_or_none(ds.get("InstanceNumber")) or 0, name


def dicom_items(folder: Path, store: SessionStore, tr_s: float | None = None,
                copy: bool = True) -> list[ReplayItem]:
    """The DICOM files of a folder as replay items, in acquisition order.

    Files are ordered by series (SeriesNumber), then volume (AcquisitionNumber or
    TemporalPositionIdentifier), then InstanceNumber; each is archived (``copy``: into
    the session, as `rtsc run` archives what it receives; else read where it is, as
    `rtsc archive-qc` does over an archive that is already one) and read when its turn
    comes.
    """
    keyed = []
    for path, ds in _headers(folder):
        if "SeriesInstanceUID" not in ds:
            continue
        order = acquisition_order_key(ds, path.name)
        tr = tr_s or (float(ds.RepetitionTime) / 1000.0
                      if ds.get("RepetitionTime") not in (None, "") else 2.0)
        keyed.append(((int_or_none(ds.get("SeriesNumber")) or 0, str(ds.SeriesInstanceUID),
                       *order), path, str(ds.SeriesInstanceUID), order[0] - 1, tr))
    if not keyed:
        raise RtscError(f"{folder}: no DICOM files")
    keyed.sort(key=lambda k: k[0])

    def make(path: Path, uid: str) -> Callable[[], Incoming]:
        def build() -> Incoming:
            if not copy:
                return Incoming(read_part10_file(path), path, time.time(), "replay")
            payload = path.read_bytes()
            archived = store.archive(uid, payload)
            return Incoming(read_part10_file(archived, payload), archived, time.time(),
                            "replay")
        return build

    return [ReplayItem(max(volume, 0), tr, make(path, uid))
            for _key, path, uid, volume, tr in keyed]


def feed(items: list[ReplayItem], out: "queue.Queue[Any]", speed: float = 1.0,
         stop: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep
         ) -> int:
    """Hand items to the worker queue on their schedule.

    Parameters
    ----------
    items : in order
    out : the service's worker queue
    speed : pace multiplier (1 = real TR pace); 0 = as fast as possible
    stop : polled between items; True ends the replay early

    Returns
    -------
    number of items handed over
    """
    if speed < 0:
        raise RtscError(f"replay speed must be >= 0, got {speed}")
    t0 = time.monotonic()
    slot_start = 0.0
    last_volume: int | None = None
    n = 0
    for item in items:
        if stop():
            break
        if speed > 0 and item.volume != last_volume:
            if last_volume is not None:
                slot_start += item.tr_s / speed
            wait = t0 + slot_start - time.monotonic()
            if wait > 0:
                sleep(wait)
        last_volume = item.volume
        out.put(item.make())
        n += 1
    return n


def replay_items(path: Path, store: SessionStore, tr_s: float | None = None,
                 copy_dicom: bool = True) -> list[ReplayItem]:
    """Replay items of a path: a 4D NIfTI file or a folder of DICOM files (archived into
    the session unless ``copy_dicom`` is False)."""
    path = Path(os.path.expanduser(str(path)))
    if is_nifti(path):
        return nifti_items(path, tr_s)
    if path.is_dir():
        return dicom_items(path, store, tr_s, copy_dicom)
    raise RtscError(f"{path}: neither a 4D NIfTI (.nii, .nii.gz) nor a folder of DICOM files")


def run_replay(config: Any, path: Path, speed: float = 1.0, tr_s: float | None = None,
               on_started: Callable[[Any], None] | None = None,
               copy_dicom: bool = True) -> list[dict[str, Any]]:
    """Replay ``path`` through a :class:`~rtsc.service.run.RunService` (no receiver, no watcher).

    Parameters
    ----------
    config : rtsc.config.Config
    path : a 4D NIfTI or a DICOM folder
    speed : 1 = TR pace, X = X times faster, 0 = as fast as possible
    tr_s : override of the repetition time, seconds
    on_started : called with the started service before the first item (tests subscribe)
    copy_dicom : archive the DICOM files into the session (False: read them in place)

    Returns
    -------
    The ``series.end`` headers of the replayed series.
    """
    from rtsc.config import config_from_dict, merge, to_dict
    from rtsc.service.run import RunService

    config = config_from_dict(merge(to_dict(config), {"receiver": {"enabled": False},
                                                      "watcher": {"dir": None}}))
    service = RunService(config)
    service.start()
    try:
        items = replay_items(path, service.store, tr_s, copy_dicom)
        if on_started is not None:
            on_started(service)
        n = feed(items, service.queue, speed)
        log.info("replay: %d items of %s handed to the pipeline", n, path)
    finally:
        service.stop()  # processes everything queued, then ends open series
    return list(service.ended_series)
