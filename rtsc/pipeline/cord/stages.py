"""The stages of spinal cord mode (``pipeline.mode: spinal_cord``).

Slice-wise motion correction replaces the brain's rigid registration; cord QC (tSNR
and signal per slice in the cord mask, cord DVARS, dropouts, phase-encoding shift)
replaces the brain DVARS stage. Timing, spike detection, the GLM and ROI, the global
signal, the QC stage's tSNR and usable frames (on the slice-wise framewise
displacement) and the carpet run as in brain mode; with ``physio.file`` the GLM is the
slice-wise RETROICOR one and cord QC correlates the phase-encoding shift with the
respiratory trace of the same file. The rigid motion parameters are
null in this mode; the GLM gets no rigid motion confounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from rtsc.config import Config
from rtsc.errors import RtscError
from rtsc.pipeline.cord.qc import CordQcStage, respiration_from_physio
from rtsc.pipeline.glm.build import build_glm_stage
from rtsc.pipeline.glm.recursive import GlmStage
from rtsc.pipeline.motion.slicewise import SliceMocoStage, slice_column
from rtsc.pipeline.physio.retroicor import PhysioSource
from rtsc.pipeline.qc.carpet import CarpetStage
from rtsc.pipeline.qc.stages import QcStage, SliceQcStage, TimingStage
from rtsc.pipeline.roi.build import build_roi_stage
from rtsc.pipeline.roi.integrity import FeedbackIntegrityStage
from rtsc.pipeline.stages import Alert, SignalStage, Stage
from rtsc.volume import SeriesInfo

#: Per-slice list fields written to confounds.tsv as one column per slice.
SLICE_CONFOUNDS = ("slice_trans_x", "slice_trans_y")
#: Scalar fields of this mode added to confounds.tsv.
CORD_CONFOUNDS = ("slice_trans_max_mm", "slice_trans_rms_mm")


def cord_confound_columns(nz: int) -> list[str]:
    """confounds.tsv columns of spinal cord mode after the common ones:
    ``slice_trans_max_mm``, ``slice_trans_rms_mm``, then ``slice_trans_x_00`` ...
    ``slice_trans_y_<nz-1>`` (mm, one per slice)."""
    return [*CORD_CONFOUNDS, *(slice_column(name, k, nz) for name in SLICE_CONFOUNDS
                               for k in range(nz))]


def build_cord_stages(config: Config, info: SeriesInfo,
                      session_minutes: Mapping[str, float] | None = None,
                      ) -> tuple[list[Stage], list[Alert]]:
    """The stages of a new spinal cord series, in processing order, and set-up alerts."""
    cord = config.spinal_cord
    stages: list[Stage] = []
    alerts: list[Alert] = []
    qc = config.qc
    if qc.enabled:
        stages.append(TimingStage(qc.late_factor))
        stages.append(SliceQcStage(qc, config.pipeline.mask_fraction))
    stages.append(SliceMocoStage(cord.moco, cord.mask))
    # One reader of the physiology file for the series, shared by the RETROICOR GLM and
    # the cord QC (on the same worker thread): each new sample is read and parsed once.
    physio: PhysioSource | None = None
    physio_error: RtscError | None = None
    if config.physio.file is not None:
        try:
            physio = PhysioSource(config.physio.file, config.physio.format)
        except RtscError as exc:  # the GLM builder meets it too and disables the GLM
            physio_error = exc
    # No rigid parameters in this mode: the GLM is built without motion confounds.
    no_motion = dataclasses.replace(config, motion=dataclasses.replace(config.motion,
                                                                       enabled=False))
    glm, glm_alerts = build_glm_stage(no_motion, info, physio)
    alerts += [a for a in glm_alerts if a[1] != "glm_no_motion_confounds"]
    if glm is not None:
        stages.append(glm)
    roi, roi_alerts = build_roi_stage(config, glm if isinstance(glm, GlmStage) else None)
    alerts += roi_alerts
    if roi is not None:
        stages.append(roi)
    stages.append(SignalStage(config.pipeline.mask_fraction))
    if qc.enabled:
        # slice_tsnr is cord QC's (in the cord mask), not the QC stage's (head mask)
        stages.append(QcStage(qc, config.pipeline.mask_fraction,
                              config.pipeline.fd_thresholds_mm, config.pipeline.fd_radius_mm,
                              session_minutes, slice_tsnr=False))
    respiration = None
    if physio is not None:  # the PE shift's correlation with the belt trace
        respiration = respiration_from_physio(physio)
    elif physio_error is not None:
        alerts.append(("info", "pe_respiration_off", f"no respiratory trace for the "
                       f"phase-encoding shift: {physio_error}"))
    stages.append(CordQcStage(cord.qc, cord.mask, respiration=respiration))
    if roi is not None and config.glm.feedback_integrity_window:
        # after its inputs: the slice-wise FD, the cord DVARS, the global signal
        stages.append(FeedbackIntegrityStage(config.glm.feedback_integrity_window,
                                             config.glm.feedback_integrity_threshold))
    if config.publish.carpet_voxels:
        stages.append(CarpetStage(config.pipeline.mask_fraction, config.publish.carpet_voxels))
    return stages, alerts
