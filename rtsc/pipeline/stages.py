"""The stage interface and the first, simple stages.

A stage is a small class holding explicit state, with ``update(volume) -> StageResult``;
its maths is a pure step function over a dataclass state that tests call directly.

Stages talk through named fields, and each stage declares them:

* ``produces``: the fields its results may hold, metrics (published in the ``volume``
  message) and hand-offs (typed values for later stages, never published). Two stages
  of one pipeline may not produce the same field.
* ``consumes``: the fields it reads from ``upstream`` and needs; an earlier stage must
  produce each of them.
* ``consumes_optional``: fields it reads when an earlier stage produces them (e.g. the
  QC stage's FD, absent when motion correction is off); no later stage may produce them.

:class:`rtsc.pipeline.series.SeriesPipeline` checks the declarations when it is built
(:func:`check_declarations`) and holds the stages to them volume by volume: ``upstream``
answers only the declared fields (:class:`Upstream`) and a result with an undeclared
field is refused (:func:`check_result`). A stage without declarations (a test's probe)
produces and consumes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from rtsc.errors import RtscError
from rtsc.pipeline._mask_kernels import percentile
from rtsc.pipeline.motion._kernels import accumulate, accumulate_masked_mean, masked_mean
from rtsc.volume import Coverage, Volume

#: No fields (the default declaration).
NO_FIELDS: frozenset[str] = frozenset()

#: An alert: (level, code, message); ``level`` is "info", "warning" or "critical".
Alert = tuple[str, str, str]


@dataclass
class StageResult:
    """What one stage adds for one volume.

    Attributes
    ----------
    metrics : dict
        Fields merged into the ``volume`` message (names from docs/messages.md).
    flags : list of str
        Short per-volume flags (``outlier``, ``missing_slices`` ...).
    alerts : list of (level, code, message)
    volume : Volume or None
        A replacement for the stages after this one (the motion-corrected volume).
    handoff : dict
        Typed values for later stages of this volume, by field name, not published
        (the deferred motion stage's ``pending_reslice``).
    after_publish : callable() or None
        Work of this volume that no field of its messages needs (it updates the
        stage's state for its maps, its summary and the next volumes: the GLM's fit
        when no later stage reads it). :class:`~rtsc.pipeline.series.SeriesPipeline`
        runs it once the ``volume`` message is out (:meth:`run_later`), and in any case
        before the next volume, the stage's maps, summary or series end; the stage
        must not read or change its inputs' buffers after that. It may raise: a
        ``stage_failed`` alert, as from ``update``.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    volume: Volume | None = None
    handoff: dict[str, Any] = field(default_factory=dict)
    after_publish: Callable[[], None] | None = None


class Stage(Protocol):
    """A pipeline stage: state for one series, updated volume by volume.

    ``produces``, ``consumes`` and ``consumes_optional`` are the declarations of the
    module docstring (class attributes, or properties where they depend on the
    stage's settings).
    """

    name: str
    produces: frozenset[str]
    consumes: frozenset[str]
    consumes_optional: frozenset[str]

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        """Process one volume (in acquisition order) and report.

        ``upstream`` holds the metrics the earlier stages produced for this volume
        (e.g. the motion parameters, for the GLM's confounds); stages that do not need
        it ignore it.
        """
        ...

    def maps(self) -> dict[str, np.ndarray]:
        """Current maps, name -> (nx, ny, nz) float32; asked for only when published."""
        ...

    def summary(self) -> dict[str, Any]:
        """Series-level figures for qc.json and ``series.end``."""
        ...


class StageContractError(RtscError):
    """A stage set that breaks its declarations: two producers of a field, a field
    consumed before (or without) its producer, or a field read or written undeclared."""


def declared(stage: Any, kind: str) -> frozenset[str]:
    """A stage's ``produces``, ``consumes`` or ``consumes_optional`` (empty when the stage
    does not declare it)."""
    return frozenset(getattr(stage, kind, NO_FIELDS))


def check_declarations(stages: Sequence[Any]) -> None:
    """Refuse a stage order whose declarations do not hold.

    Raises
    ------
    StageContractError
        Naming both stages and the field when two stages produce it; naming the
        stage, the field and the order when a consumed field is produced by no earlier
        stage (or a field read when present is produced by a later one).
    """
    order = " -> ".join(stage.name for stage in stages)
    producer: dict[str, str] = {}
    for stage in stages:
        for name in sorted(declared(stage, "produces")):
            if name in producer:
                raise StageContractError(f"field {name!r} is produced by two stages, "
                                         f"{producer[name]!r} and {stage.name!r}")
            producer[name] = stage.name
    earlier: set[str] = set()
    for stage in stages:
        for kind in ("consumes", "consumes_optional"):
            for name in sorted(declared(stage, kind) - earlier):
                if name in producer:
                    raise StageContractError(
                        f"stage {stage.name!r} consumes {name!r}, produced by the later "
                        f"stage {producer[name]!r}; order: {order}")
                if kind == "consumes":
                    raise StageContractError(f"stage {stage.name!r} consumes {name!r}, "
                                             f"which no stage produces; order: {order}")
        earlier |= declared(stage, "produces")


def check_result(stage: Any, result: StageResult) -> None:
    """Refuse a result holding a field its stage does not declare (StageContractError)."""
    extra = (result.metrics.keys() | result.handoff.keys()) - declared(stage, "produces")
    if extra:
        raise StageContractError(f"stage {stage.name!r} wrote undeclared field(s) "
                                 f"{', '.join(sorted(extra))}")


class Upstream(Mapping[str, Any]):
    """What a stage may read of the fields earlier stages produced for this volume:
    its declared ``consumes`` and ``consumes_optional``, metrics or hand-offs.

    Reading any other field raises StageContractError (not KeyError, so that ``get``
    and ``in`` do not hide it); a declared field not produced for this volume is
    absent, as in a dict.
    """

    def __init__(self, stage: Any, metrics: Mapping[str, Any],
                 handoff: Mapping[str, Any]) -> None:
        self._stage = stage.name
        self._allowed = declared(stage, "consumes") | declared(stage, "consumes_optional")
        self._metrics = metrics
        self._handoff = handoff

    def __getitem__(self, name: str) -> Any:
        if name not in self._allowed:
            raise StageContractError(f"stage {self._stage!r} read undeclared field {name!r}")
        if name in self._metrics:
            return self._metrics[name]
        return self._handoff[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._allowed
                if name in self._metrics or name in self._handoff)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def automatic_mask(data: np.ndarray, fraction: float) -> np.ndarray:
    """Voxels brighter than ``fraction`` of the 98th percentile (a head/cord mask for EPI).

    Parameters
    ----------
    data : (nx, ny, nz) float array
    fraction : float in [0, 1]

    Returns
    -------
    (nx, ny, nz) bool
    """
    reference = percentile(data, 98)  # np.percentile's, without its copy and partition
    if reference != reference:  # NaN: a resliced volume with invalid voxels
        finite = np.isfinite(data)
        reference = percentile(data[finite], 98) if finite.any() else np.inf
    return data > fraction * reference


def coverage_left(coverage: Coverage, seen: Coverage | None) -> np.ndarray | None:
    """The voxels that left between the coverage a stage applied last (``seen``) and
    ``coverage`` (:attr:`Coverage.left`) when ``coverage`` is the very next version and
    its maker listed them; else None (the stage intersects with ``coverage.mask``)."""
    if seen is None or coverage.left is None or coverage.version != seen.version + 1:
        return None
    return coverage.left


def positions_in(sorted_index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The positions in ``sorted_index`` (increasing) of those ``values`` it holds."""
    positions = np.searchsorted(sorted_index, values)
    inside = positions < sorted_index.size
    positions = positions[inside]
    return positions[sorted_index[positions] == np.asarray(values)[inside]]


def valid_mask(mask: np.ndarray, coverage: Coverage | None) -> np.ndarray:
    """``mask`` AND the run's validity mask (``mask`` itself when there is none).

    Parameters
    ----------
    mask : (nx, ny, nz) bool
    coverage : Coverage or None (``Volume.coverage``)
    """
    if coverage is None:
        return mask
    if coverage.mask.shape != mask.shape:
        raise ValueError(f"coverage {coverage.mask.shape} and mask {mask.shape} differ")
    return mask & coverage.mask


def coverage_news(volume: Volume, seen: Coverage | None) -> Coverage | None:
    """``volume.coverage`` when voxels have left the run since ``seen`` (the coverage a
    stage last applied; None: none yet), else None. Coverages only shrink, and a new
    one has a higher version."""
    coverage = volume.coverage
    if coverage is None or (seen is not None and coverage.version == seen.version):
        return None
    return coverage


@dataclass
class SignalState:
    """Running float64 sum of the volumes and the mask fixed on the first volume."""

    mask: np.ndarray
    total: np.ndarray
    n: int = 0
    coverage: Coverage | None = None

    @property
    def mean(self) -> np.ndarray:
        """Mean image so far, (nx, ny, nz) float64."""
        return self.total / max(self.n, 1)


def signal_init(first: np.ndarray, mask_fraction: float) -> SignalState:
    """State for a series whose first volume is ``first`` (memory order follows it)."""
    mask = np.asarray(automatic_mask(first, mask_fraction), order="K")
    return SignalState(mask=mask, total=np.zeros_like(first, dtype=np.float64))


def signal_restrict(state: SignalState, coverage: Coverage) -> None:
    """Leave out of the global signal, from now on, the voxels the run no longer covers."""
    order = "F" if state.mask.flags.f_contiguous else "C"
    state.mask = np.asarray(valid_mask(state.mask, coverage), order=order)
    state.coverage = coverage


def signal_step(state: SignalState, data: np.ndarray) -> float:
    """Add ``data`` to the running sum; return the global signal (mean in the mask).

    The running sum (the ``mean`` map) takes every voxel: NaN where a voxel was
    invalid in any volume so far.

    Parameters
    ----------
    state : SignalState
    data : (nx, ny, nz) float32, same memory order as the first volume

    Returns
    -------
    global_signal : float, image intensity units (NaN for an empty mask)
    """
    state.n += 1
    return accumulate_masked_mean(state.total, data, state.mask)


def signal_value(state: SignalState, data: np.ndarray) -> float:
    """:func:`signal_step` in two halves, this the first: count ``data`` and return the
    global signal (mean in the mask, the same bits); :func:`signal_accumulate` adds it
    to the running sum. The signal stage publishes between the two.

    Parameters
    ----------
    state : SignalState
    data : (nx, ny, nz) float32, same memory order as the first volume

    Returns
    -------
    global_signal : float, image intensity units (NaN for an empty mask)
    """
    state.n += 1
    return masked_mean(data, state.mask)


def signal_accumulate(state: SignalState, data: np.ndarray) -> None:
    """Add ``data`` to the running sum (the ``mean`` map); see :func:`signal_value`."""
    accumulate(state.total, data)


class SignalStage:
    """Global signal per volume and the running mean map.

    Parameters
    ----------
    mask_fraction : float
        See :func:`automatic_mask`.
    """

    name = "signal"
    produces = frozenset({"global_signal"})
    consumes = NO_FIELDS
    consumes_optional = NO_FIELDS

    def __init__(self, mask_fraction: float) -> None:
        self.mask_fraction = mask_fraction
        self.state: SignalState | None = None
        self.values: list[float] = []
        self._pending: np.ndarray | None = None  # a volume not in the running sum yet

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        if self.state is None:
            self.state = signal_init(volume.data, self.mask_fraction)
        coverage = coverage_news(volume, self.state.coverage)
        if coverage is not None:
            signal_restrict(self.state, coverage)
        # The mean map's running sum is not in the message: it waits until the message
        # is out (the same sums as signal_step, one pass each). A caller that never
        # runs after_publish (a test, outside SeriesPipeline) gets it here or in maps().
        self._add_pending()
        value = signal_value(self.state, volume.data)
        self.values.append(value)
        self._pending = volume.data
        return StageResult(metrics={"global_signal": value}, after_publish=self._add_pending)

    def _add_pending(self) -> None:
        """Add the last volume to the running sum, if not done yet."""
        data, self._pending = self._pending, None
        if data is not None and self.state is not None:
            signal_accumulate(self.state, data)

    def maps(self) -> dict[str, np.ndarray]:
        if self.state is None:
            return {}
        self._add_pending()
        return {"mean": self.state.mean.astype(np.float32)}

    def summary(self) -> dict[str, Any]:
        values = np.asarray(self.values)
        finite = values[np.isfinite(values)]
        return {
            "global_signal_mean": float(finite.mean()) if finite.size else None,
            "global_signal_cv_pct": float(100 * finite.std() / finite.mean())
            if finite.size and finite.mean() else None,
            "mask_voxels": int(self.state.mask.sum()) if self.state is not None else 0,
        }
