"""The GLM stage of a new series, built from the configuration, and the start-up check
of the ``glm`` section.

Shared by brain mode (:mod:`rtsc.pipeline.series`) and spinal cord mode
(:mod:`rtsc.pipeline.cord.stages`): with ``physio.file`` the GLM is the slice-wise
RETROICOR one (:class:`~rtsc.pipeline.cord.slice_glm.CordGlmStage`), else the
whole-volume :class:`~rtsc.pipeline.glm.recursive.GlmStage`.
"""

from __future__ import annotations

from typing import Any

from rtsc.config import Config
from rtsc.errors import ConfigError, RtscError
from rtsc.pipeline.cord.slice_glm import CordGlmStage
from rtsc.pipeline.glm.design import cosine_drift_order, make_design, motion_confound_names
from rtsc.pipeline.glm.paradigm import (
    DesignError,
    conditions_to_events,
    parse_contrast,
    read_events,
)
from rtsc.pipeline.glm.recursive import GlmStage
from rtsc.pipeline.physio.retroicor import PhysioSource, RetroicorOrders
from rtsc.pipeline.roi.feedback import TWO_ROI_KINDS
from rtsc.pipeline.roi.spec import ContrastRoi, MaskRoi, load_mask, parse_roi_spec
from rtsc.pipeline.stages import Alert
from rtsc.volume import SeriesInfo


#: Volumes a run needs per design column for the GLM to keep its default 24 motion
#: columns; a shorter run gets 6 (with an info alert): 24 columns of a 24-volume run
#: leave no degrees of freedom, and even at half a run a map waits for the columns.
MIN_VOLUMES_PER_COLUMN = 2

#: Most cosine drift columns a GLM design may have (a run of 3.6 hours with
#: ``glm.high_pass_s`` 128 s). The design is sized by the run length before the run
#: (the cosines depend on it), the GLM's state by its columns (columns x voxels, and
#: columns**2 work per volume): a header announcing NumberOfTemporalPositions 20000 at
#: TR 2 s would want 625 columns. Such a series gets no GLM, with an alert.
MAX_DRIFT_COLUMNS = 200


def glm_events(config: Config) -> list[tuple[float, float, str]] | None:
    """The paradigm: ``glm.events`` (a BIDS events.tsv) plus ``glm.conditions`` (inline),
    sorted by onset; None when neither is given (no GLM).

    Raises
    ------
    DesignError or OSError
        A file that cannot be read or a malformed event (naming the file or the key).
    """
    glm = config.glm
    if glm.events is None and not glm.conditions:
        return None
    events = read_events(glm.events) if glm.events is not None else []
    events += conditions_to_events(glm.conditions)
    return sorted(events, key=lambda e: (e[0], e[2]))


def check_glm_config(config: Config) -> None:
    """Read the paradigm, parse ``glm.contrasts`` and ``glm.roi`` once at start-up.

    Raises
    ------
    ConfigError
        Naming the key: an unreadable or malformed events file or condition, a contrast
        that names an unknown trial type or is not a linear expression, a bad ROI.
    """
    glm = config.glm
    rois = parse_roi_spec(glm.roi)  # ConfigError naming glm.roi
    for spec in rois.values():
        for part in (spec, getattr(spec, "within", None)):
            if isinstance(part, MaskRoi):
                try:
                    load_mask(part.path)
                except RtscError as exc:
                    raise ConfigError(f"glm.roi: {exc}") from None
    top_k = [name for name, spec in rois.items() if isinstance(spec, ContrastRoi)]
    check_feedback_config(config, list(rois))
    try:
        if glm.events is not None:
            read_events(glm.events)
    except (OSError, DesignError) as exc:
        raise ConfigError(f"glm.events: {exc}") from None
    try:
        conditions_to_events(glm.conditions)
    except DesignError as exc:
        raise ConfigError(str(exc)) from None  # names glm.conditions.<trial_type>
    events = glm_events(config)
    if events is None:
        if glm.contrasts:
            raise ConfigError("glm.contrasts: given without glm.events or glm.conditions "
                              "(no design to contrast)")
        if top_k or glm.feedback == "contrast":
            what = f"glm.roi ({', '.join(top_k)}: top-k of a contrast)" if top_k \
                else "glm.feedback: contrast"
            raise ConfigError(f"{what} needs the GLM: set glm.events or glm.conditions")
        return
    trial_types = sorted({e[2] for e in events})
    for name, expression in glm.contrasts.items():
        try:
            parse_contrast(expression, trial_types)
        except DesignError as exc:
            raise ConfigError(f"glm.contrasts.{name}: {exc}") from None
    contrasts = list(glm.contrasts) or trial_types
    for name in top_k:
        if rois[name].contrast not in contrasts:  # type: ignore[union-attr]
            raise ConfigError(f"glm.roi: ROI {name!r} selects by contrast "
                              f"{rois[name].contrast!r}; contrasts: "  # type: ignore[union-attr]
                              f"{', '.join(contrasts)}")
    if glm.feedback_contrast is not None and glm.feedback_contrast not in contrasts:
        raise ConfigError(f"glm.feedback_contrast: {glm.feedback_contrast!r} is not a "
                          f"contrast; contrasts: {', '.join(contrasts)}")


def check_feedback_config(config: Config, roi_names: list[str]) -> None:
    """The feedback keys that depend on each other and on the ROIs (ConfigError naming
    the key)."""
    glm = config.glm
    for key in ("feedback_roi", "feedback_roi_b"):
        name = getattr(glm, key)
        if name is not None and name not in roi_names:
            raise ConfigError(f"glm.{key}: {name!r} is not an ROI; ROIs: "
                              f"{', '.join(roi_names) or '(none: set glm.roi)'}")
    if glm.feedback in TWO_ROI_KINDS:
        first = glm.feedback_roi or (roi_names[0] if roi_names else None)
        if glm.feedback_roi_b is None or glm.feedback_roi_b == first:
            raise ConfigError(f"glm.feedback_roi_b: feedback: {glm.feedback} needs a second "
                              f"ROI, other than {first!r}; ROIs: "
                              f"{', '.join(roi_names) or '(none: set glm.roi)'}")
    if 0 < glm.feedback_integrity_window < 6:
        raise ConfigError(f"glm.feedback_integrity_window: {glm.feedback_integrity_window}; "
                          "allowed: 0 (off) or 6 or more")
    if glm.feedback_motion_regression:
        if glm.feedback in ("contrast", "plugin"):
            why = "whose GLM already has the motion confounds (glm.motion_confounds)" \
                if glm.feedback == "contrast" else "a plugin's own value, not regressed"
            raise ConfigError(f"glm.feedback_motion_regression: true with feedback: "
                              f"{glm.feedback}, {why}; allowed with psc, difference, "
                              "correlation")
        if not config.motion.enabled:
            raise ConfigError("glm.feedback_motion_regression: needs motion.enabled: true")
    if glm.feedback == "correlation" and glm.feedback_motion_regression:
        if glm.feedback_window < 10:
            raise ConfigError(f"glm.feedback_window: {glm.feedback_window} with "
                              "feedback_motion_regression; allowed: 10 or more (2 + 6 "
                              "columns and two degrees of freedom)")


def build_cord_glm_stage(config: Config, design: Any,
                         physio: PhysioSource | None = None) -> CordGlmStage:
    """The slice-wise GLM with RETROICOR columns (config ``physio``); its mask is
    ``spinal_cord.mask`` when given, else the automatic mask. ``physio`` is the series'
    reader of ``physio.file`` when another stage shares it; None opens one."""
    ph = config.physio
    assert ph.file is not None
    source = physio if physio is not None else PhysioSource(ph.file, ph.format)
    orders = RetroicorOrders.preset(ph.preset, ph.cardiac_order, ph.respiratory_order,
                                    ph.interaction_order, ph.csf)
    mask = load_mask(config.spinal_cord.mask)[0] if config.spinal_cord.mask else None
    csf_mask = load_mask(ph.csf_mask)[0] if ph.csf_mask and orders.csf else None
    return CordGlmStage(design, config.glm.contrasts, source, orders,
                        mask=mask, csf_mask=csf_mask, lag_s=ph.lag_s,
                        replay_after_run=ph.replay_after_run,
                        mask_fraction=config.pipeline.mask_fraction,
                        forgetting=config.glm.forgetting, p_value=config.glm.p_value)


def build_glm_stage(config: Config, info: SeriesInfo, physio: PhysioSource | None = None,
                    ) -> tuple[GlmStage | CordGlmStage | None, list[Alert]]:
    """The GLM stage of a new series, or None (no events, or the run length unknown).

    The design needs the run length up front (the cosine drift depends on it): the
    header's expected volume count (at most ``session.max_volumes``: the assembler
    refuses more), else ``glm.n_volumes``; a run length that needs more than
    :data:`MAX_DRIFT_COLUMNS` cosine columns gets no GLM (``glm_disabled`` alert).
    ``physio``: the series' shared reader of ``physio.file`` (see
    :func:`build_cord_glm_stage`).
    """
    glm = config.glm
    try:
        events = glm_events(config)
    except (OSError, RtscError) as exc:  # e.g. the events file changed since start-up
        return None, [("warning", "glm_disabled", f"no GLM for this series: {exc}")]
    if events is None:
        return None, []
    n_volumes = info.n_expected or glm.n_volumes
    if n_volumes is None or info.tr_s is None:
        missing = "the run length (no NumberOfTemporalPositions; set glm.n_volumes)" \
            if n_volumes is None else "the TR (no RepetitionTime in the header)"
        return None, [("warning", "glm_disabled", f"no GLM for this series: {missing}")]
    drifts = cosine_drift_order(n_volumes, info.tr_s, glm.high_pass_s) \
        if glm.drift == "cosine" else 0
    if drifts > MAX_DRIFT_COLUMNS:
        source = "the header's run length" if info.n_expected else "glm.n_volumes"
        return None, [("warning", "glm_disabled", (
            f"no GLM for this series: {source}, {n_volumes} volumes at TR {info.tr_s:g} s, "
            f"needs {drifts} cosine drift columns with glm.high_pass_s {glm.high_pass_s:g} "
            f"s, more than {MAX_DRIFT_COLUMNS}"))]
    n_motion = glm.motion_confounds if config.motion.enabled else 0
    alerts: list[Alert] = []
    if glm.motion_confounds and not config.motion.enabled:
        alerts.append(("info", "glm_no_motion_confounds",
                       "glm.motion_confounds ignored: motion.enabled is false"))
    try:
        def design_with(n_motion: int) -> Any:
            return make_design(events, n_volumes, info.tr_s, hrf=glm.hrf,
                               high_pass_s=glm.high_pass_s, drift=glm.drift,
                               drift_order=glm.drift_order,
                               extra_names=motion_confound_names(n_motion) if n_motion else ())

        design = design_with(n_motion)
        if n_motion > 6 and design.p * MIN_VOLUMES_PER_COLUMN > n_volumes:
            # A short run would spend its degrees of freedom on motion columns and show
            # no map until it holds more volumes than columns.
            fewer = design_with(6)
            alerts.append(("info", "glm_motion_confounds_reduced",
                           f"{n_motion} motion columns make {design.p} in all, more than a "
                           f"run of {n_volumes} volumes supports ({MIN_VOLUMES_PER_COLUMN} "
                           f"per column); 6 are used ({fewer.p} columns)"))
            design = fewer
        if config.physio.file is not None:
            stage: GlmStage | CordGlmStage = build_cord_glm_stage(config, design, physio)
        else:
            stage = GlmStage(design, glm.contrasts, mask_fraction=config.pipeline.mask_fraction,
                             forgetting=glm.forgetting, p_value=glm.p_value)
    except RtscError as exc:
        return None, [*alerts, ("warning", "glm_disabled", f"no GLM for this series: {exc}")]
    return stage, alerts
