"""ZeroMQ message schema 1: the one place messages are built, encoded and decoded.

Wire format (multipart): ``[topic, header, *buffers]``. ``topic`` is ASCII, ``header``
UTF-8 JSON, and each buffer the raw C-order bytes of an array whose ``dtype`` and
``shape`` the header lists under ``arrays``, in order. Every header carries
``schema`` (1), ``series`` (opaque hashed id) and ``t_published`` (seconds since the
epoch). Topics and their fields are documented in docs/messages.md and in the builders below.

Snapshot service (config ``publish.snapshot_endpoint``, a ZeroMQ ROUTER socket): how a
client that starts late gets the current series so far.

- Request: the one frame ``b"snapshot"`` in a REQ envelope. A REQ socket sends exactly
  that (:func:`rtsc.client.request_snapshot` uses one per request); a DEALER sends
  ``[b"", b"snapshot"]`` and reads ``[b"", *reply]``.
- Reply: ``[b"snapshot", meta, *frames]``, ``meta`` being JSON ``{"schema": 1, "frames":
  [n0, n1, ...]}``; the frames of each message (as published) follow in order and
  ``frames`` says how many belong to each: series.start, every volume so far, the
  alerts, the newest map of each name, and series.end once the series has ended (no
  ``feedback`` messages). Before the first series the list is empty.
  :func:`snapshot_reply` builds it, :func:`decode_snapshot` reads it.
- Any other body in a REQ envelope (another word, more frames) is answered
  ``[b"error", reason]``. Messages without the envelope's empty delimiter frame are
  dropped unanswered; a frame over 4 kB disconnects its sender.
- Bounds, so that one peer cannot cost the others their answers or the publisher its
  memory: each peer has at most two replies queued besides the one being written (a
  peer that sends requests and does not read gets no more until it reads), and the
  reply is assembled at most once per published message, its frames shared by every
  reply until the next one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import MessageError

SCHEMA = 1

TOPIC_SERIES_START = "series.start"
TOPIC_VOLUME = "volume"
TOPIC_MAP = "map"
TOPIC_ALERT = "alert"
TOPIC_SERIES_END = "series.end"
TOPIC_FEEDBACK = "feedback"
TOPIC_VOXELS = "voxels"
TOPICS = (TOPIC_SERIES_START, TOPIC_VOLUME, TOPIC_MAP, TOPIC_ALERT, TOPIC_SERIES_END,
          TOPIC_FEEDBACK, TOPIC_VOXELS)

ALERT_LEVELS = ("info", "warning", "critical")



@dataclass
class Message:
    """A decoded (or to-be-encoded) message.

    Attributes
    ----------
    topic : str
    header : dict
        JSON-safe header, including the common fields once encoded.
    arrays : list of numpy arrays
        Buffers, in the order the header's ``arrays`` lists them.
    """

    topic: str
    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into plain JSON values.

    NaN and infinities become None, so every header is strict JSON.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def encode(message: Message, series: str) -> list[bytes]:
    """Frames for ``message``; adds ``schema``, ``series``, ``t_published``, ``arrays``.

    Parameters
    ----------
    message : Message
    series : str
        Opaque series id (never a DICOM UID or name).
    """
    if message.topic not in TOPICS:
        raise MessageError(f"unknown topic {message.topic!r}; allowed: {', '.join(TOPICS)}")
    arrays = [np.ascontiguousarray(a) for a in message.arrays]
    header = dict(jsonable(message.header))
    t_published = time.time()
    header.update(
        schema=SCHEMA,
        series=series,
        t_published=t_published,
        arrays=[{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays],
    )
    if message.topic in (TOPIC_VOLUME, TOPIC_FEEDBACK) and header.get("t_received") is not None:
        header["latency_s"] = t_published - header["t_received"]
    timing = header.get("timing")
    if message.topic == TOPIC_VOLUME and isinstance(timing, dict) \
            and header.get("t_assembled") is not None:
        timing["assembled_to_published_s"] = t_published - header["t_assembled"]
    message.header = header
    frames = [message.topic.encode("ascii"), json.dumps(header, allow_nan=False).encode("utf-8")]
    frames.extend(a.tobytes() for a in arrays)
    return frames


def decode(frames: Sequence[bytes | memoryview]) -> Message:
    """Parse frames into a :class:`Message`, refusing unknown schemas and bad buffers.

    Raises
    ------
    MessageError
        On a missing header, invalid JSON, a schema other than 1, a malformed
        ``arrays`` spec, or buffers that do not match the declared dtypes and shapes.
    """
    if len(frames) < 2:
        raise MessageError(f"a message needs at least topic and header frames, got {len(frames)}")
    try:
        topic = bytes(frames[0]).decode("ascii")
        header = json.loads(bytes(frames[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"undecodable message: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError("message header is not a JSON object")
    if header.get("schema") != SCHEMA:
        raise MessageError(f"unsupported schema {header.get('schema')!r}; this client reads {SCHEMA}")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise MessageError(f"header 'arrays' is not a list: {specs!r}")
    if len(specs) != len(frames) - 2:
        raise MessageError(f"header lists {len(specs)} arrays but {len(frames) - 2} buffers came")
    arrays = []
    for spec, buf in zip(specs, frames[2:]):
        # A malformed spec (missing key, unknown or object dtype, bad shape) is a
        # MessageError like any other bad message, not a stray TypeError/KeyError.
        try:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(n) for n in spec["shape"])
            if dtype.hasobject:
                raise ValueError("object arrays cannot travel as raw buffers")
            if any(n < 0 for n in shape):
                raise ValueError("negative dimension")
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"bad array spec {spec!r} in header: {exc}") from exc
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if len(buf) != expected:
            raise MessageError(f"buffer of {len(buf)} bytes does not hold {dtype} {shape}")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return Message(topic, header, arrays)


SNAPSHOT_REQUEST = b"snapshot"
SNAPSHOT_ERROR = b"error"


def snapshot_reply(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """The snapshot reply's frames (module docstring), without the REQ envelope.

    Parameters
    ----------
    messages : the encoded frames of each message, in snapshot order. They are passed
        through untouched (bytes or :class:`zmq.Frame`, so that a publisher can share
        one copy of each frame among all its replies).
    """
    meta = {"schema": SCHEMA, "frames": [len(frames) for frames in messages]}
    return [SNAPSHOT_REQUEST, json.dumps(meta).encode("utf-8")] + \
        [frame for frames in messages for frame in frames]


def decode_snapshot(frames: Sequence[bytes | memoryview]) -> list[Message]:
    """The messages of a snapshot reply, oldest first.

    Raises
    ------
    MessageError
        On an error reply, an unknown snapshot schema, frame counts that do not add up,
        or any message :func:`decode` refuses.
    """
    if len(frames) >= 2 and bytes(frames[0]) == SNAPSHOT_ERROR:
        raise MessageError(f"the snapshot service refused the request: "
                           f"{bytes(frames[1]).decode('utf-8', 'replace')}")
    if len(frames) < 2 or bytes(frames[0]) != SNAPSHOT_REQUEST:
        first = bytes(frames[0])[:20] if frames else None
        raise MessageError(f"unexpected snapshot reply {first!r}")
    try:
        meta = json.loads(bytes(frames[1]).decode("utf-8"))
        counts = [int(n) for n in meta["frames"]] if isinstance(meta, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"undecodable snapshot header: {exc}") from exc
    if counts is None or meta.get("schema") != SCHEMA:
        raise MessageError(f"unsupported snapshot header {bytes(frames[1])[:80]!r}")
    if any(n < 2 for n in counts) or sum(counts) != len(frames) - 2:
        raise MessageError(f"snapshot header counts {sum(counts)} frames, {len(frames) - 2} came")
    messages, pos = [], 2
    for count in counts:
        messages.append(decode(frames[pos:pos + count]))
        pos += count
    return messages


# ---- builders: one per topic, the documented fields -------------------------------------

def series_start(shape: Sequence[int], voxel_size_mm: Sequence[float], tr_s: float | None,
                 n_expected: int | None, mode: str, design: dict[str, Any] | None = None,
                 **extra: Any) -> Message:
    """``series.start``: matrix, voxel size (mm), TR (s), expected volumes, mode.

    ``n_expected`` is the run length the scanner announced (NumberOfTemporalPositions;
    Siemens: the protocol's ``lRepetitions`` + 1), null when the headers do not say.
    The service adds ``slice_times_s`` (each slice k's acquisition time within the
    volume, s, from the vendor's headers, null when they give none),
    ``multiband_factor`` and ``phase_encoding_direction`` (BIDS ``i``/``i-``/``j``/``j-``
    in the voxel axes), each null when unknown.

    ``design`` (null without a GLM) is the paradigm the GLM fits, for displays that draw
    it under the ROI time course: ``{"names": [task column names], "columns": [[one
    value per volume of the run], ...]}`` (HRF-convolved, plateau ~1 for blocks). Build
    it with :func:`design_field`.
    """
    return Message(TOPIC_SERIES_START, dict(shape=list(shape), voxel_size_mm=list(voxel_size_mm),
                                            tr_s=tr_s, n_expected=n_expected, mode=mode,
                                            design=design, **extra))


def design_field(names: Sequence[str], columns: np.ndarray) -> dict[str, Any]:
    """The ``design`` field of ``series.start``.

    Parameters
    ----------
    names : the task column names
    columns : (n_volumes, len(names)) float, the task columns
    """
    columns = np.asarray(columns, dtype=np.float64)
    return {"names": list(names), "columns": [[round(float(v), 6) for v in columns[:, j]]
                                              for j in range(columns.shape[1])]}


def volume(index: int, t_acquired: float | None, t_received: float, metrics: dict[str, Any],
           flags: Sequence[str] = (), carpet: np.ndarray | None = None,
           carpet_mask_voxels: int | None = None, **extra: Any) -> Message:
    """``volume``: per-volume metrics. ``latency_s`` is filled in by the publisher.

    ``metrics`` holds the six motion parameters (mm, radians), framewise_displacement
    (mm), dvars, std_dvars, global_signal, outlier, usable_frames, ``roi`` (ROI name ->
    percent signal change against the baseline, null before one exists), ``roi_mean``
    and ``roi_detrended`` (name -> intensity units), ``feedback`` (the neurofeedback
    number: PSC of the feedback ROI or a GLM contrast effect over it, or null), and
    ``stage_ms`` (per-stage processing time before the message, ms; work a stage leaves
    for after it, StageResult.after_publish, is not in it). The QC stages add ``tsnr``,
    ``tsnr_detrended``, ``slice_tsnr``, ``snr``, ``slice_spikes``, ``clean_minutes``,
    ``session_clean_minutes``, ``projected_minutes``, ``criterion`` and ``timing``
    (acquired -> received -> assembled -> published, seconds; the last is filled in
    when the message is encoded), and ``missing_before`` (``[first, last]``, the indices
    skipped since the previous volume, when some were). Missing ones are published as
    null.

    With motion correction, ``valid_voxels`` is the size of the run's validity mask
    after this volume: the voxels (of the whole nx x ny x nz grid) that every volume so
    far sampled inside the acquired field of view (a motion-corrected sample more than
    0.05 voxel outside it, SPM's rule, is invalid, never 0). It only decreases. DVARS,
    std_dvars, global_signal, tSNR, the GLM and the ROIs use their masks AND this one:
    a voxel that leaves it leaves their statistics for the whole run (the ``mean``,
    ``tsnr`` and GLM maps show NaN or 0 there as they do for undefined values, and a
    carpet voxel NaN). The motion stage publishes it (null before the reference
    volume and without motion correction: then every voxel is valid); ``series.end``'s
    summary has the final count as ``valid_voxels``.

    In spinal cord mode (docs/spinal-cord.md) the motion parameters are null and the stages add
    ``slice_trans_x``, ``slice_trans_y`` (per slice, mm, RAS: the in-plane displacement
    of the cord from the reference; null before the reference exists),
    ``slice_trans_max_mm``, ``slice_trans_rms_mm``, ``slice_moco_failed`` (slices that
    fell back), ``framewise_displacement`` (mean over slices of the in-plane distance
    moved since the previous volume), ``slice_tsnr`` and ``slice_signal`` (per slice,
    cord mask), ``cord_tsnr``, ``slice_dropout``, ``pe_axis``, ``pe_shift_mm``,
    ``pe_shift_rms_mm``, ``pe_offset_hz_rms``, ``pe_resp_band_fraction`` and
    ``pe_resp_correlation``; ``dvars``, ``std_dvars`` and ``outlier`` are the cord mask's.

    ``carpet`` (optional, see :mod:`rtsc.pipeline.qc.carpet`): the motion-corrected values
    of a fixed, evenly subsampled set of K in-mask voxels, sent as the message's one
    buffer, (K,) float32 in image intensity units; the header's ``carpet`` field is then
    ``{"voxels": K, "mask_voxels": M, "array": 0}`` (M voxels in the mask; rows in
    Fortran-order flat-index order, i.e. from the lowest slice up), else null. A carpet
    voxel that left the run's validity mask is NaN from then on.
    """
    header: dict[str, Any] = {name: None for name in MOTION_NAMES}
    header.update(framewise_displacement=None, dvars=None, std_dvars=None, global_signal=None,
                  valid_voxels=None, outlier=False, roi={}, feedback=None, usable_frames={},
                  tsnr=None, snr=None,
                  slice_spikes=[], clean_minutes=None, session_clean_minutes=None,
                  projected_minutes=None, criterion=None, timing=None,
                  site_percentiles=None)
    header.update(metrics)
    header.update(index=index, t_acquired=t_acquired, t_received=t_received,
                  flags=list(flags), **extra)
    arrays: list[np.ndarray] = []
    header["carpet"] = None
    if carpet is not None:
        arrays.append(np.ascontiguousarray(carpet, dtype=np.float32).ravel())
        header["carpet"] = {"voxels": int(arrays[0].size), "mask_voxels": carpet_mask_voxels,
                            "array": 0}
    return Message(TOPIC_VOLUME, header, arrays)


def feedback(index: int, t_received: float, value: float | None,
             roi: dict[str, Any]) -> Message:
    """``feedback``: a volume's neurofeedback number, published as soon as the ROI stage
    has it, before the observer stages (DVARS, QC, ...) run, so stimulus software waits
    only for motion correction, the GLM and the ROI. ``value`` (or null before a
    baseline exists) and ``roi`` (name -> PSC) equal the ``feedback`` and ``roi`` fields
    of the volume's ``volume`` message; ``latency_s`` is filled in by the publisher.
    Published only when an ROI or ``glm.feedback: plugin`` is configured (then as soon as
    the plugin has the value); not kept in the snapshot (the ``volume``
    headers there carry the same values)."""
    return Message(TOPIC_FEEDBACK, dict(index=index, t_received=t_received, feedback=value,
                                        roi=roi))


def voxels(index: int, t_received: float, values: np.ndarray) -> Message:
    """``voxels`` (``publish.volumes``): a volume's motion-corrected values at the voxels
    of the series' ``voxels`` map, in Fortran (x fastest) order, float32; NaN where this
    volume's sample fell outside the acquired grid (as in the resliced volume). Published
    after the volume's ``volume`` message; not kept in the snapshot."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return Message(TOPIC_VOXELS, dict(index=index, t_received=t_received,
                                      n_voxels=int(values.size)), [values])


def map_message(name: str, affine: np.ndarray, data: np.ndarray, index: int) -> Message:
    """``map``: a named float32 map (``mean``, ``tsnr``, ``t:<contrast>``) with its affine."""
    return Message(TOPIC_MAP, dict(name=name, affine=np.asarray(affine).tolist(), index=index),
                   [np.ascontiguousarray(data, dtype=np.float32)])


def alert(level: str, code: str, message: str, index: int | None = None) -> Message:
    """``alert``: level (info/warning/critical), code, human message, volume index."""
    if level not in ALERT_LEVELS:
        raise MessageError(f"alert level {level!r}; allowed: {', '.join(ALERT_LEVELS)}")
    return Message(TOPIC_ALERT, dict(level=level, code=code, message=message, index=index))


def series_end(n_volumes: int, summary: dict[str, Any], outputs: dict[str, str],
               site_percentiles: dict[str, float | None] | None = None) -> Message:
    """``series.end``: volume count, QC summary, output paths, and the summary's QC
    figures as percentiles among the earlier series of the protocol (null without the
    history; see :mod:`rtsc.history.percentile`)."""
    return Message(TOPIC_SERIES_END, dict(n_volumes=n_volumes, summary=summary, outputs=outputs,
                                          site_percentiles=site_percentiles))
