"""The motion stage: register each volume, publish the six parameters and FD, reslice.

Parameters follow :mod:`rtsc.conventions` (fMRIPrep names; head displacement from the reference in
its RAS+ frame; mm and radians). A volume that cannot be registered (the fit does not
converge, the residual is far above that of the last few volumes, most samples fall
outside, or the head would have jumped more than ``max_jump_mm``) is flagged, its
estimate is discarded (published as null), an alert says so, and the next volume starts
from the last good estimate.

The residual is compared with the median of the last ``RESIDUAL_WINDOW`` converged
registrations, not the whole run's: after an abrupt move the residual of a correct
registration settles at a new level (partial-volume differences that a rigid
resampling cannot undo: in a simulated run, 2.2 -> 5.0 -> 7.3 after moves of 0.9 and
1.2 mm, every estimate within 0.03 mm of the truth). A volume whose head moved
(:data:`RESIDUAL_MOTION_MM`) may rise further before it fails, and then sets the new
level at once; a spike or a dropout is one volume (or a few) far above its neighbours
without such a move, or far above even that (a dropout of ten slices: 47x).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from rtsc.config import MotionConfig
from rtsc.config.pipeline import parse_motion_reference
from rtsc.conventions import FD_RADIUS_MM, MOTION_NAMES, framewise_displacement
from rtsc.errors import RtscError
from rtsc.pipeline.motion._resample_kernels import rows_to_mask
from rtsc.pipeline.motion.reference import (
    MIN_SHARED_HEAD,
    ReferenceImage,
    carry_reference,
    shared_head,
)
from rtsc.pipeline.motion.register import RegistrationResult, RigidRegistration
from rtsc.pipeline.stages import NO_FIELDS, Alert, StageResult
from rtsc.volume import Coverage, Volume


#: Converged registrations whose residual median is the reference for the next one.
RESIDUAL_WINDOW = 5
#: A volume whose head moved at least this much (FD from the last good estimate, mm)
#: may leave a residual up to MOVED_RMS_FACTOR times ``motion.fail_rms_factor`` times
#: the median before it counts as failed, and then sets the new level: a correct
#: registration right after an abrupt move has a residual several times that before it
#: (a simulated 2.3 mm move: 1.8 -> 6.1, 3.4x, every later volume at the new level),
#: which failed the move's volume and the two after it (their FD published as null, the
#: jump unannounced); a signal dropout in ten slices is 47x.
RESIDUAL_MOTION_MM = 0.5
MOVED_RMS_FACTOR = 3.0


def failure_reason(result: RegistrationResult, jump_mm: float | None,
                   rms_history: Sequence[float], config: MotionConfig) -> str | None:
    """Why a registration result must not be trusted, or None when it can be.

    ``jump_mm`` is the framewise displacement from the last good estimate (None for the
    first registered volume)."""
    if not result.converged:
        return f"no convergence in {result.iterations} iterations"
    if result.fraction_used < 0.5:
        return f"only {100 * result.fraction_used:.0f}% of the head overlaps the reference"
    if jump_mm is not None and jump_mm > config.max_jump_mm:
        return f"head would have moved {jump_mm:.1f} mm since the previous volume"
    if len(rms_history) >= RESIDUAL_WINDOW:
        typical = statistics.median(rms_history[-RESIDUAL_WINDOW:])
        factor = config.fail_rms_factor
        if jump_mm is not None and jump_mm >= RESIDUAL_MOTION_MM:
            factor *= MOVED_RMS_FACTOR
        if result.rms_residual > factor * typical:
            return (f"residual {result.rms_residual:.1f} is {result.rms_residual / typical:.1f}x "
                    f"the median of the last {RESIDUAL_WINDOW} volumes (dropout, spike or "
                    "artefact)")
    return None


def next_rms_history(history: list[float], rms: float, jump_mm: float | None,
                     fail_rms_factor: float) -> list[float]:
    """The residual window after an accepted registration: ``rms`` appended, or, when the
    head moved (:data:`RESIDUAL_MOTION_MM`) and the residual rose past
    ``fail_rms_factor`` times the median, the window filled with ``rms`` (the moved
    head's level is the baseline from now on)."""
    if jump_mm is not None and jump_mm >= RESIDUAL_MOTION_MM \
            and len(history) >= RESIDUAL_WINDOW \
            and rms > fail_rms_factor * statistics.median(history[-RESIDUAL_WINDOW:]):
        return [rms] * RESIDUAL_WINDOW
    return [*history, rms][-RESIDUAL_WINDOW:]


@dataclass
class MotionState:
    """Per-series state of the motion stage."""

    registration: RigidRegistration | None = None
    last_good_matrix: np.ndarray | None = None
    last_good_params: np.ndarray | None = None
    rms_history: list[float] = field(default_factory=list)
    params: list[np.ndarray] = field(default_factory=list)
    fd: list[float] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    usable: dict[float, int] = field(default_factory=dict)  # FD threshold -> frames at or under
    #: the run's valid interval of each row, (lo, hi) (ny, nz) int64: see coverage_step
    valid_rows: tuple[np.ndarray, np.ndarray] | None = None
    coverage: Coverage | None = None


def coverage_step(state: MotionState, lo: np.ndarray, hi: np.ndarray,
                  starts: np.ndarray, stops: np.ndarray, nx: int) -> Coverage:
    """AND one volume's validity (its rows' intervals, :meth:`RigidRegistration.valid_rows`)
    into the run's; return the run's Coverage, a new one only when voxels left.

    Intervals intersect into intervals, so the run's validity is two (ny, nz) arrays and
    this costs O(ny nz) per volume; the (nx, ny, nz) mask is rebuilt only when it shrinks.
    """
    changed = None
    if state.valid_rows is not None:
        lo = np.maximum(state.valid_rows[0], lo)
        hi = np.minimum(state.valid_rows[1], hi)
        empty = lo >= hi
        if empty.any():  # one spelling for an empty interval, so that equal means equal
            lo = np.where(empty, starts, lo)
            hi = np.where(empty, starts, hi)
        changed = (lo != state.valid_rows[0]) | (hi != state.valid_rows[1])
        if state.coverage is not None and not changed.any():
            return state.coverage
    state.valid_rows = (lo, hi)
    version = 0 if state.coverage is None else state.coverage.version + 1
    mask = rows_to_mask(nx, starts, stops, lo, hi)  # new, owned here: no copy
    mask.flags.writeable = False
    left = None
    if state.coverage is not None and changed is not None:
        left = voxels_left(state.coverage.mask, mask, changed)
    state.coverage = Coverage(mask, int(np.count_nonzero(mask)), version, left)
    return state.coverage


def voxels_left(before: np.ndarray, after: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The voxels in ``before`` and not in ``after`` ((nx, ny, nz) bool, Fortran order),
    looked for only in the x-rows where ``rows`` ((ny, nz) bool) is True: increasing
    Fortran-order flat indices, (k,) int64."""
    nx = before.shape[0]
    columns = np.flatnonzero(rows.ravel(order="F"))  # row (j, k) starts at nx (j + ny k)
    was = before.reshape(nx, -1, order="F")[:, columns]
    now = after.reshape(nx, -1, order="F")[:, columns]
    x, c = np.nonzero(was & ~now)
    return np.sort(x + nx * columns[c]).astype(np.int64)


@dataclass(frozen=True)
class PendingReslice:
    """A registered volume waiting for its reslice: the deferred :class:`MotionStage`'s
    hand-off (field ``pending_reslice``) to the :class:`ResliceStage`.

    Attributes
    ----------
    index : int, the volume's index
    data : (nx, ny, nz) float32, the volume as acquired
    matrix : (4, 4) float64, its registration (RAS+ mm; the last good one, or the
        identity, when this volume's failed)
    registration : RigidRegistration, the series' reference grid and resampling
    """

    index: int
    data: np.ndarray
    matrix: np.ndarray
    registration: RigidRegistration

    def sample(self, flat_index: np.ndarray) -> np.ndarray:
        """The values :meth:`reslice` gives at these voxels (Fortran flat indices into
        the reference grid), bit-identical, without reslicing the volume: the early
        neurofeedback ROI's ``Volume.corrected_at``."""
        return self.registration.sampler(self.data, self.matrix)(flat_index)

    def reslice(self) -> np.ndarray:
        """The corrected volume, (nx, ny, nz) float32 on the reference grid."""
        return self.registration.reslice(self.data, self.matrix)


class MotionStage:
    """Registration stage (see the module docstring).

    Parameters
    ----------
    config : MotionConfig
    fd_radius_mm : float, sphere radius turning rotations into mm for FD
    fd_thresholds_mm : sequence of float, thresholds for the usable-frame counts
    defer_reslice : bool
        False: :meth:`update` returns the resliced (corrected) volume. True: it returns
        the acquired volume with ``corrected_at`` set, and hands a
        :class:`PendingReslice` (field ``pending_reslice``) to a :class:`ResliceStage`
        later in the pipeline, so that stages needing only a few corrected voxels (the
        neurofeedback ROI) run before that cost.
    count_usable : bool
        Publish ``usable_frames`` (frames at or under each FD threshold). False when
        the QC stage publishes its own count (runs of ``qc.min_run_frames``).
    """

    name = "motion"
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, config: MotionConfig, fd_radius_mm: float = FD_RADIUS_MM,
                 fd_thresholds_mm: Sequence[float] = (0.2, 0.3, 0.4),
                 defer_reslice: bool = False, count_usable: bool = True,
                 previous_reference: ReferenceImage | None = None) -> None:
        self.config = config
        self.defer_reslice = defer_reslice
        self.count_usable = count_usable
        self.radius_mm = fd_radius_mm
        self.thresholds = list(fd_thresholds_mm)
        self.state = MotionState()
        kind, index = parse_motion_reference(config.reference)
        self._reference_index = index if kind == "volume" else None
        self._reference_path = Path(config.reference) if kind == "file" else None
        #: the earlier series' reference, with ``motion.reference: series:PREVIOUS``
        self._previous = previous_reference if kind == "previous" else None
        self._wants_previous = kind == "previous"
        #: what this series registers to, for the next series (set on its first volume)
        self.reference_image: ReferenceImage | None = None

    @property
    def produces(self) -> frozenset[str]:
        fields = {*MOTION_NAMES, "framewise_displacement", "registration_iterations",
                  "registration_rms", "valid_voxels"}
        if self.count_usable:
            fields.add("usable_frames")
        if self.defer_reslice:
            fields.add("pending_reslice")
        return frozenset(fields)

    def _carried(self, volume: Volume) -> tuple[np.ndarray | None, list[Alert]]:
        """The earlier series' reference on this grid, or None (and why)."""
        previous = self._previous
        if previous is None:
            return None, [("info", "motion_reference_first",
                           "motion.reference series:PREVIOUS: no earlier series in this run; "
                           "the reference is this series' first volume")]
        data, inside = carry_reference(previous, volume.shape, volume.affine)
        shared = shared_head(volume.data, inside)
        if shared < MIN_SHARED_HEAD:
            return None, [("warning", "motion_reference_first",
                           f"motion.reference series:PREVIOUS: only {100 * shared:.0f}% of "
                           f"this series' head lies in series {previous.series}'s field of "
                           "view; the reference is this series' first volume")]
        return data, [("info", "motion_reference_previous",
                       f"motion reference: series {previous.series}'s, resampled onto this "
                       f"grid ({100 * shared:.0f}% of the head in its field of view)")]

    def _make_registration(self, volume: Volume) -> tuple[RigidRegistration, list[Alert]]:
        """The registration to this series' reference, and alerts about its choice."""
        alerts: list[Alert] = []
        if self._wants_previous:
            carried, alerts = self._carried(volume)
            if carried is not None:
                assert self._previous is not None
                # carried on unchanged: the session keeps its first series' reference
                self.reference_image = dataclasses.replace(
                    self._previous, data=carried, affine=np.asarray(volume.affine, np.float64))
                return self._registration_to(carried, volume), alerts
        if self._reference_path is not None:
            image = nib.load(self._reference_path)
            data = np.asarray(image.dataobj, dtype=np.float32)
            if data.shape != volume.shape or not np.allclose(image.affine, volume.affine,
                                                             atol=1e-3):
                raise RtscError(f"motion.reference {self._reference_path}: grid {data.shape} "
                                f"does not match the acquired grid {volume.shape}")
        else:
            data = volume.data
        self.reference_image = ReferenceImage(np.array(data, dtype=np.float32, order="F"),
                                              np.asarray(volume.affine, np.float64),
                                              volume.info.series)
        return self._registration_to(data, volume), alerts

    def _registration_to(self, data: np.ndarray, volume: Volume) -> RigidRegistration:
        cfg = self.config
        return RigidRegistration(data, volume.affine, smooth_vox=cfg.smooth_vox,
                                 max_iterations=cfg.max_iterations,
                                 tolerance_mm=cfg.tolerance_mm, max_points=cfg.max_points,
                                 reslice_margin=3 if cfg.reslice == "head" else None)

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        state = self.state
        built_reference = False
        setup: list[Alert] = []
        if state.registration is None:
            if self._reference_index is not None and volume.index < self._reference_index:
                return StageResult(flags=["before_reference"])
            state.registration, setup = self._make_registration(volume)
            # the reference is this very volume: no residual to learn from
            built_reference = self._reference_path is None and \
                self.reference_image.series == volume.info.series  # type: ignore[union-attr]
        result = state.registration.register(volume.data, state.last_good_matrix)
        fd = None if state.last_good_params is None else framewise_displacement(
            state.last_good_params, result.params, self.radius_mm)
        reason = failure_reason(result, fd, state.rms_history, self.config)
        out = StageResult(alerts=setup)
        metrics: dict[str, Any] = {"registration_iterations": result.iterations,
                                   "registration_rms": result.rms_residual}
        state.iterations.append(result.iterations)
        if result.converged and not built_reference:  # the reference has no residual
            state.rms_history = next_rms_history(state.rms_history, result.rms_residual,
                                                 fd if reason is None else None,
                                                 self.config.fail_rms_factor)
        if reason is not None:
            state.failed.append(volume.index)
            state.params.append(np.full(6, np.nan))
            state.fd.append(float("nan"))
            metrics.update({name: None for name in MOTION_NAMES}, framewise_displacement=None)
            out.flags.append("registration_failed")
            out.alerts.append(("warning", "registration_failed",
                               f"volume {volume.index} not registered: {reason}; its estimate "
                               "is discarded and the next volume starts from the last good one"))
            matrix = state.last_good_matrix if state.last_good_matrix is not None else np.eye(4)
        else:
            fd = 0.0 if fd is None else fd
            for threshold in self.thresholds:
                if fd <= threshold:
                    state.usable[threshold] = state.usable.get(threshold, 0) + 1
            state.params.append(result.params)
            state.fd.append(fd)
            state.last_good_matrix, state.last_good_params = result.matrix, result.params
            metrics.update(dict(zip(MOTION_NAMES, map(float, result.params))),
                           framewise_displacement=fd)
            matrix = result.matrix
        if self.count_usable:
            metrics["usable_frames"] = {f"{t:g}": state.usable.get(t, 0)
                                        for t in self.thresholds}
        # The coverage is known from the matrix alone, before the reslice: the early ROI
        # (corrected_at) sees it too.
        registration = state.registration
        coverage = coverage_step(state, *registration.valid_rows(matrix), *registration.extents,
                                 volume.shape[0])
        metrics["valid_voxels"] = coverage.n_valid
        out.metrics = metrics
        if self.defer_reslice:
            pending = PendingReslice(volume.index, volume.data, matrix, registration)
            out.handoff["pending_reslice"] = pending
            out.volume = dataclasses.replace(volume, corrected_at=pending.sample,
                                             coverage=coverage)
        else:
            out.volume = dataclasses.replace(
                volume, data=registration.reslice(volume.data, matrix), coverage=coverage)
        return out

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        fd = np.asarray(self.state.fd, dtype=np.float64)
        good = fd[np.isfinite(fd)]
        params = np.asarray(self.state.params) if self.state.params else np.zeros((0, 6))
        finite = params[np.all(np.isfinite(params), axis=1)] if len(params) else params
        return {
            "fd_mean": float(good.mean()) if good.size else None,
            "fd_max": float(good.max()) if good.size else None,
            "fd_num_by_threshold": {f"{t:g}": int(np.sum(good > t)) for t in self.thresholds},
            "max_abs_trans_mm": float(np.abs(finite[:, :3]).max()) if len(finite) else None,
            "max_abs_rot_deg": float(np.degrees(np.abs(finite[:, 3:]).max()))
            if len(finite) else None,
            "registration_failed": list(self.state.failed),
            "registration_iterations_median": float(np.median(self.state.iterations))
            if self.state.iterations else None,
            "valid_voxels": self.state.coverage.n_valid if self.state.coverage else None,
        }


class ResliceStage:
    """Reslices the volume the deferred :class:`MotionStage` registered (its
    :class:`PendingReslice`): the stages after it see the motion-corrected volume. A
    volume the motion stage did not register (before the reference, or the stage
    failed) passes as it is."""

    name = "reslice"
    produces = NO_FIELDS
    consumes = frozenset({"pending_reslice"})
    consumes_optional = NO_FIELDS

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        pending = (upstream or {}).get("pending_reslice")
        if not isinstance(pending, PendingReslice) or pending.index != volume.index:
            return StageResult()
        return StageResult(volume=dataclasses.replace(volume, data=pending.reslice(),
                                                      corrected_at=None))

    def maps(self) -> dict[str, np.ndarray]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}
