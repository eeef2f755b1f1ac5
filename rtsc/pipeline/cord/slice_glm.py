"""Slice-wise recursive GLM: shared design columns plus columns that differ per slice.

RETROICOR regressors are sampled at each slice's acquisition time, so slice ``k``'s
design is ``X_k = [X_shared, S_k]``. Every voxel of a slice shares ``X_k``, so the exact
recursive OLS of :mod:`rtsc.pipeline.glm.recursive` applies slice by slice: one triangular factor
``R_k`` per slice (the sufficient statistic of ``X_k'X_k``: ``R_k'R_k = X_k'X_k``) and
``Q_k'y`` per voxel, updated by Givens rotations with the same numba kernels. The state
holds only the in-mask voxels, as a compact vector (a volume is reduced to its mask
values once), so volumes waiting for their physiology cost V floats each, not a volume.

:class:`CordGlmStage` runs two such models over the cord mask: with the physiological
columns (``t:<contrast>``, lagging by the volumes whose physiology has not arrived yet)
and without them (``t_nophysio:<contrast>``, up to date), and reports the variance the
physiological columns explain, per slice and over the mask.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.errors import RtscError
from rtsc.pipeline.glm.design import Design, expand_motion, motion_confound_names
from rtsc.pipeline.glm.recursive import GlmFit, GlmState, glm_fit, glm_init, glm_update, t_threshold
from rtsc.pipeline.physio.retroicor import PhysioError, PhysioSource, RegressorBuilder, RetroicorOrders
from rtsc.pipeline.stages import NO_FIELDS, StageResult, automatic_mask
from rtsc.volume import Volume

log = logging.getLogger(__name__)
_MOTION = frozenset(motion_confound_names(24))


@dataclass(frozen=True)
class SliceFit:
    """A slice-wise fit, over the mask voxels in mask order.

    Attributes
    ----------
    n : (nz,) int, volumes per slice model (equal unless a slice is empty)
    dof : (nz,) int, residual degrees of freedom per slice
    rss : (V,) float64, residual sum of squares, intensity**2
    t, effect : (q, V) float64
    """

    n: np.ndarray
    dof: np.ndarray
    rss: np.ndarray
    t: np.ndarray
    effect: np.ndarray
    fits: list[GlmFit | None]


class SliceGlm:
    """Exact recursive OLS with per-slice design columns.

    Parameters
    ----------
    mask : (nx, ny, nz) bool, voxels fitted
    p_shared : int, columns common to every slice (first in each row)
    p_slice : int, slice-specific columns (after the shared ones)
    constant : int or None, index of the constant among the shared columns
    forgetting : float in (0, 1]
    """

    def __init__(self, mask: np.ndarray, p_shared: int, p_slice: int,
                 constant: int | None = None, forgetting: float = 1.0) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.shape = mask.shape
        self.index = np.flatnonzero(mask.ravel(order="F"))  # sorted, Fortran order
        self.slice_of = self.index // (mask.shape[0] * mask.shape[1])
        self.p_shared, self.p_slice = int(p_shared), int(p_slice)
        v = self.index.size
        self.states: list[GlmState | None] = []
        for k in range(mask.shape[2]):
            positions = np.flatnonzero(self.slice_of == k)
            self.states.append(None if positions.size == 0 else glm_init(
                (v, 1, 1), positions, self.p, forgetting, constant))

    @property
    def p(self) -> int:
        return self.p_shared + self.p_slice

    def compact(self, data: np.ndarray) -> np.ndarray:
        """The mask voxels of a volume, (V, 1, 1) float32 (Fortran order, as the state wants)."""
        values = np.asarray(data, dtype=np.float32).ravel(order="F")[self.index]
        return np.asfortranarray(values.reshape(-1, 1, 1))

    def update(self, compact: np.ndarray, shared_row: np.ndarray,
               slice_rows: np.ndarray | None = None) -> None:
        """Add one volume: ``compact`` from :meth:`compact`, ``shared_row`` (p_shared,),
        ``slice_rows`` (nz, p_slice)."""
        shared_row = np.asarray(shared_row, dtype=np.float64)
        for k, state in enumerate(self.states):
            if state is None:
                continue
            row = shared_row if self.p_slice == 0 else np.concatenate([shared_row,
                                                                       slice_rows[k]])
            glm_update(state, compact, row)

    def fit(self, contrasts: np.ndarray) -> SliceFit:
        """Fit every slice; contrasts (q, p) over the full row (shared then slice columns)."""
        c = np.atleast_2d(np.asarray(contrasts, dtype=np.float64))
        v = self.index.size
        t = np.full((c.shape[0], v), np.nan)
        effect = np.full((c.shape[0], v), np.nan)
        rss = np.full(v, np.nan)
        nz = len(self.states)
        n, dof = np.zeros(nz, int), np.zeros(nz, int)
        fits: list[GlmFit | None] = []
        for k, state in enumerate(self.states):
            if state is None:
                fits.append(None)
                continue
            fit = glm_fit(state, c, with_beta=False)
            fits.append(fit)
            pos = state.index
            t[:, pos] = fit.t
            effect[:, pos] = fit.effect
            rss[pos] = fit.sigma2 * fit.dof if fit.dof > 0 else np.nan
            n[k], dof[k] = fit.n, fit.dof
        return SliceFit(n=n, dof=dof, rss=rss, t=t, effect=effect, fits=fits)

    def to_volume(self, values: np.ndarray) -> np.ndarray:
        """Mask-order values -> (nx, ny, nz) float32 (0 outside the mask)."""
        out = np.zeros(self.shape, dtype=np.float32, order="F")
        out.ravel(order="K")[self.index] = values
        return out


@dataclass
class _Pending:
    index: int
    compact: np.ndarray
    shared_row: np.ndarray
    csf_means: np.ndarray | None


class CordGlmStage:
    """The GLM with RETROICOR regressors per slice (config ``physio``), as a stage.

    Parameters
    ----------
    design : Design, the shared columns (task, motion confounds, drifts, constant)
    contrasts : name -> expression; empty: one per trial type
    source : PhysioSource
    orders : RetroicorOrders
    mask : (nx, ny, nz) bool or None (automatic mask of the first volume)
    csf_mask : (nx, ny, nz) bool or None, needed when ``orders.csf``
    lag_s : float, seconds of physiology needed after a volume's last slice
    replay_after_run : bool, keep the volumes whose physiology is missing until the
        series ends and fit them then (a log written after the run); else volumes left
        waiting for more than a minute of run time are dropped from the RETROICOR model
    mask_fraction, forgetting, p_value : as :class:`~rtsc.pipeline.glm.recursive.GlmStage`
    """

    name = "glm"
    produces = frozenset({"physio_pending"})
    consumes_optional = NO_FIELDS

    def __init__(self, design: Design, contrasts: Mapping[str, str] | None,
                 source: PhysioSource, orders: RetroicorOrders, mask: np.ndarray | None = None,
                 csf_mask: np.ndarray | None = None, lag_s: float = 3.0,
                 replay_after_run: bool = True, mask_fraction: float = 0.2,
                 forgetting: float = 1.0, p_value: float = 0.001) -> None:
        self.design = design
        expressions = dict(contrasts) if contrasts else {t: t for t in design.trial_types}
        self.contrast_names = list(expressions)
        shared = np.array([design.contrast(e) for e in expressions.values()]) \
            if expressions else np.zeros((0, design.p))
        self.contrasts_shared = shared
        self.contrasts_full = np.hstack([shared, np.zeros((shared.shape[0], orders.n_columns))])
        if orders.csf and csf_mask is None:
            raise RtscError("physio: the CSF regressor needs physio.csf_mask")
        self.source, self.orders = source, orders
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.csf_mask = None if csf_mask is None else np.asarray(csf_mask, dtype=bool)
        self.lag_s, self.replay_after_run = float(lag_s), bool(replay_after_run)
        self.mask_fraction, self.forgetting, self.p_value = mask_fraction, forgetting, p_value
        self.with_physio: SliceGlm | None = None
        self.without_physio: SliceGlm | None = None
        self.builder: RegressorBuilder | None = None
        self.pending: deque[_Pending] = deque()
        self.censored: list[int] = []
        self.physio_censored: list[int] = []
        self.rows: dict[int, np.ndarray] = {}
        self._previous_motion: np.ndarray | None = None
        self._physio_error: str | None = None

    # ------------------------------------------------------------------ per volume

    def _setup(self, volume: Volume) -> None:
        mask = self.mask if self.mask is not None else automatic_mask(volume.data,
                                                                      self.mask_fraction)
        if mask.shape != volume.shape:
            raise RtscError(f"glm mask shape {mask.shape} differs from the volumes' {volume.shape}")
        if self.csf_mask is not None and self.csf_mask.shape != volume.shape:
            raise RtscError(f"physio.csf_mask shape {self.csf_mask.shape} differs from the "
                            f"volumes' {volume.shape}")
        constant = self.design.column("constant")
        self.with_physio = SliceGlm(mask, self.design.p, self.orders.n_columns, constant,
                                    self.forgetting)
        self.without_physio = SliceGlm(mask, self.design.p, 0, constant, self.forgetting)
        nz = volume.shape[2]
        times = volume.slice_times_s if volume.slice_times_s is not None else np.zeros(nz)
        tr = volume.info.tr_s
        if tr is None:
            raise RtscError("the slice-wise GLM needs the TR (no RepetitionTime in the header)")
        # the clock of volume 0 (a Siemens log is placed on it), even if it never came
        t0 = None if volume.t_acquired is None else volume.t_acquired - volume.index * tr
        self.builder = RegressorBuilder(self.source, self.orders, tr, np.asarray(times),
                                        self.lag_s, t0)

    @property
    def consumes(self) -> frozenset[str]:
        """The shared design's per-volume columns from ``upstream``: the six motion
        parameters when there are motion confounds, every other extra column by name."""
        names = {n for n in self.design.extra_names if n not in _MOTION}
        if any(n in _MOTION for n in self.design.extra_names):
            names.update(MOTION_NAMES)
        return frozenset(names)

    def _shared_row(self, volume: Volume, upstream: Mapping[str, Any] | None) -> np.ndarray | str:
        values: dict[str, float] = {}
        if any(n in _MOTION for n in self.design.extra_names):
            params = [None if upstream is None else upstream.get(k) for k in MOTION_NAMES]
            if any(p is None or not math.isfinite(float(p)) for p in params):
                return "no motion parameters"
            now = np.array(params, dtype=np.float64)
            values.update(expand_motion(now, self._previous_motion))
            self._previous_motion = now
        for name in self.design.extra_names:
            if name not in _MOTION:
                value = None if upstream is None else upstream.get(name)
                if value is None:
                    return f"no value for {name}"
                values[name] = float(value)
        return self.design.row(volume.index, values)

    def _csf_means(self, data: np.ndarray) -> np.ndarray | None:
        if not self.orders.csf or self.csf_mask is None:
            return None
        counts = self.csf_mask.sum(axis=(0, 1))
        sums = np.where(self.csf_mask, data, 0.0).sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)

    def _drain(self, final: bool = False) -> list[tuple[str, str, str]]:
        """Fit the waiting volumes whose physiology is there (in order)."""
        alerts: list[tuple[str, str, str]] = []
        assert self.builder is not None and self.with_physio is not None
        if final:
            self.source.mark_complete()
        try:
            rec = self.builder.recording()
        except PhysioError as exc:
            if self._physio_error != str(exc):
                alerts.append(("warning", "physio_unusable", str(exc)))
                self._physio_error = str(exc)
            return alerts
        while self.pending:
            item = self.pending[0]
            status = self.builder.status(item.index, rec)
            if status == "wait" and not final:
                break
            self.pending.popleft()
            if status != "ready" or rec is None:
                self.physio_censored.append(item.index)
                alerts.append(("warning", "physio_missing",
                               f"volume {item.index}: the physiological recording does not "
                               "cover it; left out of the RETROICOR fit"))
                continue
            try:
                rows = self.builder.rows(item.index, rec, item.csf_means)
            except PhysioError as exc:
                self.physio_censored.append(item.index)
                alerts.append(("warning", "physio_missing", str(exc)))
                continue
            self.rows[item.index] = rows
            self.with_physio.update(item.compact, item.shared_row, rows)
        return alerts

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Add the volume to the model without physiology now, and to the RETROICOR model
        as soon as the physiology covers it (this or a later call, or :meth:`finish`)."""
        if self.with_physio is None:
            self._setup(volume)
        assert self.with_physio is not None and self.without_physio is not None
        if volume.index >= self.design.n_volumes:
            row: np.ndarray | str = f"it is beyond the design's {self.design.n_volumes} volumes"
        else:
            row = self._shared_row(volume, upstream)
        if isinstance(row, str):
            self.censored.append(volume.index)
            return StageResult(flags=["glm_censored"], alerts=[
                ("warning", "glm_censored", f"volume {volume.index} left out of the GLM: {row}")])
        compact = self.with_physio.compact(volume.data)
        self.without_physio.update(compact, row)
        self.pending.append(_Pending(volume.index, compact, row, self._csf_means(volume.data)))
        alerts = self._drain()
        if not self.replay_after_run and len(self.pending) * (volume.info.tr_s or 1.0) > 60.0:
            # no physiology for a minute and no refit wanted: stop holding volumes
            while self.pending:
                self.physio_censored.append(self.pending.popleft().index)
        return StageResult(metrics={"physio_pending": len(self.pending)}, alerts=alerts)

    def finish(self) -> list[tuple[str, str, str]]:
        """Series end: read the physiology one last time (a log written at the end of the
        run arrives now) and fit every volume still waiting."""
        if self.with_physio is None:
            return []
        return self._drain(final=True)

    # ------------------------------------------------------------------ outputs

    def fits(self) -> tuple[SliceFit | None, SliceFit | None]:
        if self.with_physio is None or self.without_physio is None:
            return None, None
        return (self.with_physio.fit(self.contrasts_full),
                self.without_physio.fit(self.contrasts_shared))

    def maps(self) -> dict[str, np.ndarray]:
        """``t:``/``beta:<contrast>`` with physiology, ``t_nophysio:<contrast>`` without,
        and ``physio_r2`` (variance explained by the physiological columns)."""
        full, reduced = self.fits()
        if full is None or reduced is None:
            return {}
        assert self.with_physio is not None
        out: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.contrast_names):
            out[f"t:{name}"] = self.with_physio.to_volume(full.t[j])
            out[f"beta:{name}"] = self.with_physio.to_volume(full.effect[j])
            out[f"t_nophysio:{name}"] = self.with_physio.to_volume(reduced.t[j])
        r2 = self.variance_explained(full, reduced)
        if r2 is not None:
            out["physio_r2"] = self.with_physio.to_volume(r2)
        return out

    def variance_explained(self, full: SliceFit, reduced: SliceFit) -> np.ndarray | None:
        """Per voxel, ``1 - RSS_physio / RSS_without`` over the same volumes (None while the
        two models do not hold the same volumes)."""
        if not np.array_equal(full.n, reduced.n) or not np.any(full.n):
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 - full.rss / reduced.rss

    def _contrast_summary(self, fit: SliceFit) -> dict[str, Any]:
        dofs = fit.dof[fit.n > 0]
        dof = int(dofs.min()) if dofs.size else 0
        threshold = t_threshold(dof, self.p_value)
        out = {}
        for j, name in enumerate(self.contrast_names):
            t = fit.t[j]
            finite = t[np.isfinite(t)]
            out[name] = {"peak_t": float(finite.max()) if finite.size else None,
                         "voxels_above": int(np.sum(finite > threshold))
                         if math.isfinite(threshold) else 0,
                         "threshold_t": threshold if math.isfinite(threshold) else None}
        return out

    def summary(self) -> dict[str, Any]:
        """The GLM summary of :class:`GlmStage` (from the RETROICOR model) plus
        ``glm_physio``: columns, volumes fitted and waiting, the contrasts without the
        physiological columns, and the variance they explain (median per slice, mean
        over the mask)."""
        full, reduced = self.fits()
        out: dict[str, Any] = {"glm_volumes": int(full.n.max()) if full is not None else 0,
                               "glm_censored": list(self.censored),
                               "glm_columns": self.design.p + self.orders.n_columns,
                               "glm_dof": int(full.dof[full.n > 0].min())
                               if full is not None and np.any(full.n) else 0,
                               "glm_p_value": self.p_value,
                               "glm_contrasts": self._contrast_summary(full) if full else {}}
        physio: dict[str, Any] = {"columns": self.orders.names(), "slice_wise": True,
                                  "volumes_without_physio": list(self.physio_censored),
                                  "volumes_waiting": len(self.pending)}
        if full is not None and reduced is not None:
            physio["contrasts_without_physio"] = self._contrast_summary(reduced)
            r2 = self.variance_explained(full, reduced)
            if r2 is not None and self.with_physio is not None:
                per_slice = []
                for k in range(self.with_physio.shape[2]):
                    vals = r2[(self.with_physio.slice_of == k) & np.isfinite(r2)]
                    per_slice.append(float(np.median(vals)) if vals.size else None)
                finite = r2[np.isfinite(r2)]
                physio["variance_explained"] = {
                    "per_slice_median": per_slice,
                    "mask_mean": float(finite.mean()) if finite.size else None}
        out["glm_physio"] = physio
        return out
