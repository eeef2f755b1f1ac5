"""Regions of interest and the neurofeedback value: ROI means, online detrending, PSC.

ROIs (config ``glm.roi``, see :func:`parse_roi_spec`)
------------------------------------------------------
* ``MaskRoi``: a mask NIfTI in the acquired (reference) grid; nonzero finite voxels are
  in. Its shape must equal the volumes' and its affine agree to 1e-3 mm (no resampling:
  a mask in another grid is an error, not a silent reinterpretation).
* ``SphereRoi``: the voxels whose centres (through the volumes' affine) lie within
  ``radius_mm`` of ``center_ras_mm`` (RAS+ mm), boundary included.
* ``ContrastRoi``: the ``top_k`` voxels with the largest t of a GLM contrast (signed: a
  negative effect is asked for with a negated contrast), optionally among the voxels of
  a mask or sphere given as ``within``. It is re-selected from the GLM's current t-map
  whenever the GLM has added a volume, by default for the whole run; with
  ``freeze_after = N`` the selection made after volume ``N - 1`` (a localiser) is kept
  from then on (if the contrast is not estimable by then, the first selection made
  later is kept). Until the contrast is estimable (its t is NaN everywhere) the ROI has
  no value (None).

A ROI's value history is always that of its *current* voxels: when a top-k ROI changes,
its means over the earlier volumes are recomputed from a history of the candidate
voxels' values (float32, one row per volume, ``4 * candidates`` bytes per volume; dropped
at the freeze), so the trend, baseline and PSC never mix voxel sets.

The trend, baseline and percent signal change of each ROI are defined in
:mod:`rtsc.pipeline.roi.trend`; contrast t and effects on a subset of the GLM's voxels
in :mod:`rtsc.pipeline.glm.subset`.

Messages
--------
:class:`RoiStage` adds to the ``volume`` message ``roi`` = name -> PSC (percent, None
before a baseline exists: the quantity neurofeedback displays, independent of the
scanner's intensity scale), ``roi_mean`` = name -> mean (intensity units), and
``roi_detrended`` = name -> detrended mean (intensity units), each None while a top-k
ROI has no voxels; and ``feedback``: one number or None, either the PSC of one ROI
(``feedback="psc"``) or the GLM contrast effect averaged over an ROI's voxels
(``feedback="contrast"``, intensity units, ``c'beta``).

Latency
-------
The feedback must leave within 10 ms of the volume's arrival, registration included,
so this stage does per volume only what depends on the new volume:

* masks are resolved once, on the first volume (mask files are read at construction),
  into sorted flat Fortran-order index arrays (a sphere is evaluated in its bounding
  box only): each volume costs one gather and one float64 sum per ROI, then O(q**2)
  scalar work for the fit and the PSC;
* the contrast feedback never fits the whole brain: the effect is linear in the data,
  so the mean of the voxels' effects is the effect of the mean of their ``z = Q'y``
  columns, a (p, k) gather and one p x p solve (glm_fit's pseudo-inverse path only
  while the design is rank-deficient), redone only when the GLM has a new volume;
* a top-k ROI computes t on its candidate voxels only (restrict them with ``within``),
  and when its voxels change, only the voxels that entered or left are gathered over
  the past volumes.

Measured at 64 x 64 x 36 (shared 2-vCPU VM, medians over 120 volumes of update()
alone, ranges over runs): a 303-voxel sphere with rest baseline and task covariate
0.03-0.05 ms (0.08 ms for three); with ``feedback="contrast"`` 0.12-0.14 ms; a top-300
ROI within a 25 mm sphere, re-selected every volume, 0.5-0.6 ms; over the whole brain
1-1.8 ms, with 4 bytes per GLM voxel per volume of new memory whose page faults showed
as occasional 2-4 ms stalls (so freeze it, or restrict it with ``within``); frozen, 0.04
ms. The first volume (mask set-up) costs 0.4-2 ms, 2-6 ms with a whole-brain top-k ROI.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from rtsc.pipeline.glm.design import Design
from rtsc.pipeline.glm.recursive import GlmStage, GlmState
from rtsc.pipeline.glm.subset import contrast_t, mean_effect
from rtsc.pipeline.roi.feedback import FEEDBACK_KINDS, FeedbackSource
from rtsc.pipeline.roi.placement import RoiPlacer
from rtsc.pipeline.roi.spec import (
    ContrastRoi,
    MaskRoi,
    MniRoi,
    RoiError,
    RoiSpec,
    SphereRoi,
    flat_index,
    is_integer,
    roi_mean,
)
from rtsc.pipeline.roi.topk import CandidateHistory, top_k_positions
from rtsc.pipeline.roi.trend import (
    TrendState,
    detrended_value,
    percent_change,
    task_rest_volumes,
    trend_batch,
    trend_init,
    trend_step,
)
from rtsc.pipeline.stages import NO_FIELDS, StageResult
from rtsc.volume import Coverage, Volume

log = logging.getLogger(__name__)

#: Baseline with ``baseline="auto"`` and no design to find rest volumes in.
DEFAULT_BASELINE_VOLUMES = 10


# ---- the stage ----------------------------------------------------------------------------------

@dataclass
class RoiTrack:
    """One ROI's voxels and time course.

    Attributes
    ----------
    name : str
    spec : RoiSpec
    trend : TrendState
    x : list of float, volume indices of the values
    y : list of float, ROI means (intensity units), float64
    index : (k,) int64 or None, the ROI's voxels (flat Fortran order); None: not selected yet
    candidates : (V',) int64 or None, a top-k ROI's candidate voxels (flat Fortran order)
    candidate_positions : (V',) int64 or None, their positions in the GLM's voxels (None:
        all of them)
    selection : (k,) int64 or None, a top-k ROI's voxels as positions in ``candidates``
    history : CandidateHistory or None, the candidates' values (until frozen)
    sums : list of float, the history's sums over ``selection``, one per volume
    glm_n : int, GLM volumes at the last selection
    frozen : bool
    version : int, counts the changes of the voxel set
    coverage_version : int, the run's validity mask (``Volume.coverage``) last applied
    voxels : (k0,) int64 or None, a mask or sphere ROI's voxels as resolved (flat
        Fortran order); ``index`` is those still in the run's validity mask
    columns : (k,) int64 or None, their positions in ``voxels`` (columns of ``history``)
    """

    name: str
    spec: RoiSpec
    trend: TrendState
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    index: np.ndarray | None = None
    candidates: np.ndarray | None = None
    candidate_positions: np.ndarray | None = None
    selection: np.ndarray | None = None
    history: CandidateHistory | None = None
    sums: list[float] = field(default_factory=list)
    glm_n: int = -1
    frozen: bool = False
    version: int = 0
    coverage_version: int = -1
    voxels: np.ndarray | None = None
    columns: np.ndarray | None = None


class RoiStage:
    """ROI means, detrended values, PSC and the neurofeedback value, volume by volume.

    Runs after the motion stage (it receives the motion-corrected volume) and after the
    GLM stage when an ROI or the feedback needs the GLM. See the module docstring for the
    definitions and the message fields.

    Parameters
    ----------
    rois : dict name -> RoiSpec (:func:`parse_roi_spec`), at least one, in order
    feedback : ``"psc"`` (the PSC of ``feedback_roi``) or ``"contrast"`` (the GLM effect
        of ``feedback_contrast`` averaged over ``feedback_roi``'s voxels in the GLM mask)
    feedback_roi : str or None, default the first ROI
    feedback_contrast : str or None, default the feedback ROI's contrast if it is a top-k
        ROI, else the GLM's first contrast
    baseline : int N >= 1 (the first N volumes), ``"rest"`` (rest volumes of the design)
        or ``"auto"``: rest when the design has task columns, else the first
        ``DEFAULT_BASELINE_VOLUMES``
    rest_threshold : float in [0, 1), see :func:`task_rest_volumes`
    detrend : ``"linear"`` or ``"none"``
    task_covariates : bool, fit the line jointly with the design's task columns (see the
        module docstring); without a design there are none
    glm : GlmStage or None, needed by top-k ROIs and ``feedback="contrast"``
    design : Design or None, for rest volumes and the task/rest summary; default the
        GLM's design

    Raises
    ------
    RoiError
        Bad parameters, unknown names, a mask file that cannot be read, or a GLM needed
        and not given.
    """

    name = "roi"
    produces = frozenset({"roi", "roi_mean", "roi_detrended", "feedback", "feedback_raw",
                          "mni_registration"})
    consumes = NO_FIELDS  # the GLM's fit is read from the GlmStage given
    consumes_optional = NO_FIELDS

    def __init__(self, rois: Mapping[str, RoiSpec], feedback: str = "psc",
                 feedback_roi: str | None = None, baseline: int | str = "auto",
                 rest_threshold: float = 0.1, detrend: str = "linear",
                 glm: GlmStage | None = None, design: Design | None = None,
                 feedback_contrast: str | None = None, task_covariates: bool = True,
                 feedback_roi_b: str | None = None, window: int = 20,
                 motion_regression: bool = False, smoothing: str = "none",
                 ema_alpha: float = 0.5, kalman_q_over_r: float = 0.1) -> None:
        if not rois:
            raise RoiError("RoiStage: no ROI given")
        for name, spec in rois.items():
            if not isinstance(spec, (MaskRoi, SphereRoi, MniRoi, ContrastRoi)):
                raise RoiError(f"ROI {name!r}: {spec!r} is not a MaskRoi, SphereRoi, MniRoi "
                               "or ContrastRoi (see parse_roi_spec)")
        if feedback not in FEEDBACK_KINDS:
            raise RoiError(f"feedback {feedback!r}: allowed: {', '.join(FEEDBACK_KINDS)}")
        if detrend not in ("linear", "none"):
            raise RoiError(f"detrend {detrend!r}: allowed: linear, none")
        if not 0.0 <= rest_threshold < 1.0:
            raise RoiError(f"rest_threshold {rest_threshold!r}: allowed: [0, 1)")
        self.glm = glm
        self.design = design if design is not None else (glm.design if glm else None)
        labels = task_rest_volumes(self.design, rest_threshold) if self.design else None
        self.task_flags: np.ndarray | None = labels[0] if labels else None
        self.rest_flags: np.ndarray | None = labels[1] if labels else None
        if baseline == "auto":
            baseline = "rest" if self.rest_flags is not None else DEFAULT_BASELINE_VOLUMES
        if baseline == "rest":
            if self.rest_flags is None:
                raise RoiError("baseline 'rest' needs a design with task columns (give "
                               "glm= or design=), or use baseline=N (the first N volumes)")
        elif not is_integer(baseline) or int(baseline) < 1:  # type: ignore[arg-type]
            raise RoiError(f"baseline {baseline!r}: allowed: an integer N >= 1 (the first N "
                           "volumes), 'rest' or 'auto'")
        self.baseline: int | str = baseline if baseline == "rest" else int(baseline)
        self.detrend = detrend
        self.feedback = feedback
        self.feedback_roi = feedback_roi if feedback_roi is not None else next(iter(rois))
        if self.feedback_roi not in rois:
            raise RoiError(f"feedback_roi {self.feedback_roi!r}: not an ROI; ROIs: "
                           f"{', '.join(rois)}")
        try:
            self.source = FeedbackSource(feedback, self.feedback_roi, feedback_roi_b,
                                         list(rois), window, motion_regression, smoothing,
                                         ema_alpha, kalman_q_over_r)
        except ValueError as exc:
            raise RoiError(str(exc)) from None
        self.consumes_optional = self.source.consumes_optional
        needs_glm = [n for n, s in rois.items() if isinstance(s, ContrastRoi)]
        #: True when the stage reads the GLM (contrast feedback, top-k ROIs)
        self.needs_glm = bool(needs_glm) or feedback == "contrast"
        if (needs_glm or feedback == "contrast") and glm is None:
            what = f"top-k ROI {', '.join(needs_glm)}" if needs_glm else "feedback=contrast"
            raise RoiError(f"{what} needs the GLM stage (glm=...): is glm.events set?")
        known = list(glm.contrast_names) if glm is not None else []
        for n in needs_glm:
            contrast = rois[n].contrast  # type: ignore[union-attr]
            if contrast not in known:
                raise RoiError(f"ROI {n!r}: contrast {contrast!r} is not a GLM contrast; "
                               f"contrasts: {', '.join(known) or '(none)'}")
        self.feedback_contrast: str | None = None
        if feedback == "contrast":
            spec = rois[self.feedback_roi]
            chosen = feedback_contrast or (spec.contrast if isinstance(spec, ContrastRoi)
                                           else (known[0] if known else None))
            if chosen not in known:
                raise RoiError(f"feedback_contrast {chosen!r}: not a GLM contrast; "
                               f"contrasts: {', '.join(known) or '(none)'}")
            self.feedback_contrast = chosen
        self._task: np.ndarray | None = None
        if task_covariates and detrend == "linear" and self.design is not None \
                and self.design.task_names:
            self._task = np.ascontiguousarray(self.design.fixed[:, :len(self.design.task_names)])
        n_task = 0 if self._task is None else self._task.shape[1]
        self.tracks = {name: RoiTrack(name, spec, trend_init(detrend == "linear", n_task))
                       for name, spec in rois.items()}
        # Files are read now, not on the first volume (whose latency counts).
        self.placer = RoiPlacer(rois.values())
        self.shape: tuple[int, int, int] | None = None
        self.affine: np.ndarray | None = None
        self._effect_key: tuple[int, int] | None = None
        self._effect: float | None = None
        self._effect_positions: np.ndarray | None = None

    # -- set-up on the first volume --

    def _glm_state(self) -> GlmState:
        state = self.glm.state if self.glm is not None else None
        if state is None:
            raise RoiError("RoiStage needs the GLM stage's state: run the GLM stage "
                           "before the ROI stage")
        return state

    def _start(self, volume: Volume) -> list[tuple[str, str, str]]:
        self.shape = volume.shape
        self.affine = np.asarray(volume.affine, dtype=np.float64)
        alerts = self.placer.start(volume.data, volume.affine)
        for track in self.tracks.values():
            spec = track.spec
            if not isinstance(spec, ContrastRoi):
                track.index = track.voxels = flat_index(self.placer.mask(spec))
                track.columns = np.arange(track.voxels.size, dtype=np.int64)
                # the voxels' values, so that the means over the earlier volumes can be
                # recomputed if some of them leave the run's validity mask
                track.history = CandidateHistory(track.voxels.size,
                                         self.design.n_volumes if self.design else 256)
                log.info("ROI %s: %d voxels", track.name, track.index.size)
                continue
            glm_index = self._glm_state().index
            positions = None
            if spec.within is not None:
                inside = self.placer.mask(spec.within).ravel(order="F")[glm_index]
                positions = np.flatnonzero(inside).astype(np.int64)
                if positions.size == 0:
                    raise RoiError(f"ROI {track.name!r}: no voxel of its 'within' region is "
                                   "in the GLM mask")
            log.info("ROI %s: top %d of %d candidate voxels by t of %s", track.name,
                     spec.top_k, glm_index.size if positions is None else positions.size,
                     spec.contrast)
            track.candidate_positions = positions
            track.candidates = glm_index if positions is None else glm_index[positions]
            rows = spec.freeze_after or (self.design.n_volumes if self.design else 256)
            track.history = CandidateHistory(track.candidates.size, rows)
        return alerts

    # -- per volume --

    def _is_baseline(self, index: int) -> bool:
        if self.baseline == "rest":
            assert self.rest_flags is not None
            return bool(index < self.rest_flags.size and self.rest_flags[index])
        return index < int(self.baseline)

    def _baseline_flags(self, x: np.ndarray) -> np.ndarray:
        index = x.astype(np.int64)
        if self.baseline == "rest":
            assert self.rest_flags is not None
            inside = index < self.rest_flags.size
            return inside & self.rest_flags[np.where(inside, index, 0)]
        return index < int(self.baseline)

    def _ready(self, track: RoiTrack, index: int) -> bool:
        """Does the baseline exist (see the module docstring)?"""
        if track.trend.n_base == 0:
            return False
        return self.baseline == "rest" or index >= int(self.baseline) - 1

    def _fitted(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which values enter the fit: finite ones (NaN voxels stay out) within the design
        when it gives task covariates."""
        keep = np.isfinite(y)
        if self._task is not None:
            keep &= x < self._task.shape[0]
        return keep

    def _add(self, track: RoiTrack, x: float, y: float) -> None:
        if not math.isfinite(y):
            return
        track.x.append(x)
        track.y.append(y)
        index = int(x)
        if self._task is None:
            trend_step(track.trend, x, y, self._is_baseline(index))
        elif index < self._task.shape[0]:
            trend_step(track.trend, x, y, self._is_baseline(index), self._task[index])

    def _rebuild(self, track: RoiTrack, hx: np.ndarray, hy: np.ndarray) -> float:
        """Replace the track's values and fit by ``hy`` (the means of its current voxels
        over the volumes ``hx``); returns the last value."""
        finite = np.isfinite(hy)
        track.x, track.y = hx[finite].tolist(), hy[finite].tolist()
        keep = self._fitted(hx, hy)
        task = None if self._task is None else self._task[hx[keep].astype(np.int64)]
        track.trend = trend_batch(hx[keep], hy[keep], self._baseline_flags(hx[keep]),
                                  self.detrend == "linear", task)
        return float(hy[-1]) if hy.size else math.nan

    def _fixed_value(self, track: RoiTrack, values: np.ndarray, x: float,
                     coverage: Coverage | None) -> float:
        """A mask or sphere ROI: store its voxels' values (``values``, over ``voxels``),
        drop the voxels that left the run's validity mask (its earlier means are then
        recomputed from the stored values over the voxels left), return the mean."""
        assert track.history is not None and track.columns is not None
        assert track.voxels is not None
        track.history.append(x, values)
        if coverage is not None and coverage.version != track.coverage_version:
            track.coverage_version = coverage.version
            keep = coverage.mask.ravel(order="F")[track.voxels[track.columns]]
            if not keep.all():
                track.columns = track.columns[keep]
                track.index = track.voxels[track.columns]
                track.version += 1
                log.info("ROI %s: %d of its voxels left the field of view; %d remain",
                         track.name, keep.size - track.columns.size, track.columns.size)
                hx = np.asarray(track.history.x)
                if track.columns.size == 0:
                    track.x, track.y = [], []
                    track.trend = trend_init(self.detrend == "linear",
                                             0 if self._task is None else self._task.shape[1])
                    return math.nan
                return self._rebuild(track, hx,
                                     track.history.sums(track.columns) / track.columns.size)
        y = roi_mean(values, track.columns)
        self._add(track, x, y)
        return y

    def _update_top_k(self, track: RoiTrack, flat: np.ndarray, x: float,
                      alerts: list[tuple[str, str, str]]) -> float:
        """Store the candidates' values, re-select if the GLM moved; return the ROI mean
        (an ``roi_frozen`` info alert goes to ``alerts`` when the selection is frozen)."""
        assert track.candidates is not None and isinstance(track.spec, ContrastRoi)
        assert track.history is not None and self.glm is not None
        values = flat[track.candidates]
        track.history.append(x, values)
        if track.selection is not None:
            track.sums.append(float(np.sum(values[track.selection], dtype=np.float64)))
        state = self._glm_state()
        old = track.selection
        # re-select when the GLM moved or voxels left the run (their t is NaN now)
        version = -1 if state.valid is None else int(state.valid.size
                                                      - np.count_nonzero(state.valid))
        if state.n != track.glm_n or version != track.coverage_version:
            track.glm_n = state.n
            track.coverage_version = version
            weights = self.glm.contrast_weights[self.glm.contrast_names.index(
                track.spec.contrast)]
            chosen = top_k_positions(contrast_t(state, weights, track.candidate_positions),
                                     track.spec.top_k)
            if chosen is not None and (old is None or not np.array_equal(chosen, old)):
                track.selection = chosen
                track.index = track.candidates[chosen]
                track.version += 1
        selection = track.selection
        if selection is None:
            return math.nan
        if selection is not old:
            # The history of the new voxel set replaces the old one (module docstring):
            # only the voxels that changed are gathered over the past volumes.
            if old is None:
                sums = track.history.sums(selection)
            else:
                sums = np.asarray(track.sums) \
                    + track.history.sums(np.setdiff1d(selection, old, assume_unique=True)) \
                    - track.history.sums(np.setdiff1d(old, selection, assume_unique=True))
                if not np.all(np.isfinite(sums)):  # NaN voxels do not subtract out
                    sums = track.history.sums(selection)
            track.sums = sums.tolist()
            y = self._rebuild(track, np.asarray(track.history.x), sums / selection.size)
        else:
            y = track.sums[-1] / selection.size
            self._add(track, x, y)
        freeze = track.spec.freeze_after
        if freeze is not None and x >= freeze - 1:
            track.frozen = True
            track.history = None
            track.sums = []
            alerts.append(("info", "roi_frozen",
                           f"ROI {track.name}: {selection.size} voxels of largest t of "
                           f"{track.spec.contrast} kept from volume {int(x)} on"))
        return y

    def _contrast_feedback(self) -> float | None:
        track = self.tracks[self.feedback_roi]
        if track.index is None or self.glm is None or self.glm.state is None:
            return None
        state = self.glm.state
        key = (state.n, track.version)
        if key != self._effect_key:
            if track.candidates is not None:  # a top-k ROI: positions known
                assert track.selection is not None
                positions = track.selection if track.candidate_positions is None \
                    else track.candidate_positions[track.selection]
            else:
                # A fixed ROI: its voxels inside the GLM mask (sorted both).
                if self._effect_positions is None:
                    where = np.searchsorted(state.index, track.index)
                    where = np.minimum(where, state.index.size - 1)
                    self._effect_positions = where[state.index[where] == track.index]
                    if self._effect_positions.size == 0:
                        raise RoiError(f"ROI {track.name!r}: no voxel in the GLM mask, so no "
                                       "contrast feedback")
                positions = self._effect_positions
            assert self.feedback_contrast is not None
            weights = self.glm.contrast_weights[self.glm.contrast_names.index(
                self.feedback_contrast)]
            value = mean_effect(state, weights, positions) if state.n else math.nan
            self._effect = value if math.isfinite(value) else None
            self._effect_key = key
        return self._effect

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Add one volume; ``upstream`` (earlier stages' metrics) is not used.

        Before the reslice stage (``volume.corrected_at`` set) the ROI's voxels are read
        motion-corrected through it; the values are those of the resliced volume."""
        metrics: dict[str, Any] = {}
        alerts: list[tuple[str, str, str]] = []
        if self.shape is None:
            alerts += self._start(volume)
            if self.placer.registration is not None:
                metrics["mni_registration"] = self.placer.registration.as_message()
        elif volume.shape != self.shape:
            raise RoiError(f"volume shape {volume.shape} differs from the series' {self.shape}")
        flat = volume.data.ravel(order="F")  # a view for the usual Fortran-ordered data
        x = float(volume.index)
        means: dict[str, float | None] = {}
        detrended: dict[str, float | None] = {}
        psc: dict[str, float | None] = {}
        for name, track in self.tracks.items():
            if track.candidates is not None and not track.frozen:
                if volume.corrected_at is not None:
                    raise RoiError("a top-k ROI needs the resliced volume: the ROI stage "
                                    "must run after the reslice stage")
                y = self._update_top_k(track, flat, x, alerts)
            elif track.voxels is not None:  # a mask or sphere ROI
                if volume.corrected_at is not None:  # before the reslice stage
                    values = volume.corrected_at(track.voxels)
                else:
                    values = flat[track.voxels]
                y = self._fixed_value(track, values, x, volume.coverage)
            else:  # a top-k ROI, frozen
                assert track.index is not None
                if volume.corrected_at is not None:
                    values = volume.corrected_at(track.index)
                    y = roi_mean(values, np.arange(values.size))
                else:
                    y = roi_mean(flat, track.index)
                self._add(track, x, y)
            ok = math.isfinite(y)
            means[name] = y if ok else None
            detrended[name] = detrended_value(track.trend, x, y) if ok else None
            psc[name] = percent_change(track.trend, x, y) \
                if ok and self._ready(track, volume.index) else None
        value, raw = self.source.update(psc, means, self._contrast_feedback, upstream)
        metrics.update({"roi": psc, "roi_mean": means, "roi_detrended": detrended,
                        "feedback": value, "feedback_raw": raw})
        return StageResult(metrics=metrics, alerts=alerts)

    # -- outputs --

    def maps(self) -> dict[str, np.ndarray]:
        """``roi:<name>``: (nx, ny, nz) float32 Fortran-ordered, 1 in the ROI, 0 outside
        (a top-k ROI once selected)."""
        found: dict[str, np.ndarray] = {}
        if self.shape is None:
            return found
        for name, track in self.tracks.items():
            if track.index is not None:
                out = np.zeros(self.shape, dtype=np.float32, order="F")
                out.ravel(order="F")[track.index] = 1.0
                found[f"roi:{name}"] = out
        return found

    def psc_series(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The ROI's volume indices and PSC of every volume under the final line and
        baseline (None without a baseline)."""
        track = self.tracks[name]
        x, y = np.asarray(track.x), np.asarray(track.y)
        if not self._ready(track, int(x[-1]) if x.size else -1):
            return x, None
        t = track.trend
        baseline = t.offset + t.base_y - t.slope * t.base_x
        return x, 100.0 * (((y - t.offset) - t.base_y) - t.slope * (x - t.base_x)) / baseline

    def summary(self) -> dict[str, Any]:
        """Per ROI: kind, voxels, volumes, baseline volumes, frozen (top-k), and the mean
        PSC over task and rest volumes of the design (recomputed under the final line and
        baseline; None when unknown); and the feedback source."""
        rois: dict[str, Any] = {}
        for name, track in self.tracks.items():
            spec = track.spec
            kind = f"mni_{spec.kind}" if isinstance(spec, MniRoi) else \
                {MaskRoi: "mask", SphereRoi: "sphere", ContrastRoi: "top_k"}[type(spec)]
            entry: dict[str, Any] = {
                "kind": kind, "voxels": int(track.index.size) if track.index is not None
                else None, "volumes": len(track.y), "baseline_volumes": track.trend.n_base,
                "psc_task_mean": None, "psc_rest_mean": None, "psc_task_minus_rest": None}
            if kind == "top_k":
                entry["frozen"] = track.frozen
            x, values = self.psc_series(name)
            if values is not None and self.task_flags is not None:
                assert self.rest_flags is not None
                known = x < self.task_flags.size
                where = x[known].astype(np.int64)
                task = values[known][self.task_flags[where]]
                rest = values[known][self.rest_flags[where]]
                if task.size:
                    entry["psc_task_mean"] = float(task.mean())
                if rest.size:
                    entry["psc_rest_mean"] = float(rest.mean())
                if task.size and rest.size:
                    entry["psc_task_minus_rest"] = float(task.mean() - rest.mean())
            rois[name] = entry
        reg = self.placer.registration
        return {"roi": rois, "mni_registration": None if reg is None else reg.as_message(),
                "roi_feedback": {"source": self.feedback, "roi": self.feedback_roi,
                                 "roi_b": self.source.roi_b, "smoothing": self.source.smoothing,
                                 "contrast": self.feedback_contrast,
                                 "baseline": self.baseline, "detrend": self.detrend,
                                 "task_covariates": self._task is not None}}
