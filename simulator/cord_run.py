"""A simulated spinal cord series: its DICOM, its physiology files and its ground truth.

``simulator.anatomy: spinal_cord`` (:func:`simulator.scanner.run_simulation` hands such a
config here). The run is :func:`simulator.cord.plan_cord_run`'s plan of ``simulator`` and
``simulator.cord``; the truth adds the cord's own files (slice shifts, masks, slice
times, expected tSNR, the physiology) to the volumes every run saves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from rtsc.config import SimulatorConfig
from simulator.cord import CordPlan, expected_slice_tsnr, iter_cord_volumes, plan_cord_run
from simulator.dicom_series import SeriesInfo, new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices
from simulator.multiframe_writer import volumes_to_multiframe
from simulator.output import SimulationResult, TruthWriter, deliver, write_events
from simulator.physio import ProgressiveBidsWriter, write_bids_physio, write_siemens_pmu

__all__ = ["PHYSIO_STEM", "CordTruthWriter", "write_cord_truth", "run_cord_simulation"]

PHYSIO_STEM = "sub-sim_task-cord"


class CordTruthWriter(TruthWriter):
    """Writes the ground truth of a cord run (see :func:`run_cord_simulation`): the
    volumes as every :class:`~simulator.output.TruthWriter`, and the cord's static truth."""

    def _write_static(self, plan: CordPlan, info: SeriesInfo,  # type: ignore[override]
                      fmt: str) -> None:
        write_cord_truth(self.directory, plan, fmt, info.series_uid, float(info.start_time))


def write_cord_truth(d: Path, plan: CordPlan, fmt: str = "mosaic", series_uid: str = "",
                     start_time: float = 0.0) -> None:
    """Write the static ground truth of a cord run into directory ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    affine = plan.grid.affine()
    np.save(d / "slice_shifts.npy", plan.slice_shifts)
    for name, mask in plan.masks().items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), d / f"{name}_mask.nii.gz")
    nib.save(nib.Nifti1Image(plan.maps.dorsal_horn.astype(np.float32), affine),
             d / "activation.nii.gz")
    nib.save(nib.Nifti1Image(plan.maps.cord.astype(np.float32), affine),
             d / "cord_fraction.nii.gz")
    rows = ["slice\ttime_s"] + [f"{k}\t{t:.9g}" for k, t in enumerate(plan.slice_times_s)]
    (d / "slice_times.tsv").write_text("\n".join(rows) + "\n")
    tsnr = expected_slice_tsnr(plan)
    rows = ["slice\ttsnr_expected\ttsnr_thermal\tmean_signal\tn_voxels"]
    rows += [f"{k}\t{tsnr['expected'][k]:.9g}\t{tsnr['thermal'][k]:.9g}\t"
             f"{tsnr['mean_signal'][k]:.9g}\t{int(tsnr['n_voxels'][k])}"
             for k in range(plan.grid.shape[2])]
    (d / "slice_tsnr.tsv").write_text("\n".join(rows) + "\n")
    p = plan.physio
    np.savez_compressed(d / "physio_truth.npz", times_s=p.times_s, cardiac=p.cardiac,
                        respiratory=p.respiratory, trigger=p.trigger,
                        cardiac_phase=p.cardiac_phase, respiratory_phase=p.respiratory_phase,
                        beats_s=p.beats_s, slice_cardiac_phase=plan.cardiac_phase,
                        slice_respiratory_phase=plan.respiratory_phase)
    write_events(plan.events, d / "events.tsv")
    rows = ["task\tdrift"] + [f"{r:.9g}\t{dr:.9g}" for r, dr in
                              zip(plan.response.mean(axis=1), plan.drift)]
    (d / "design.tsv").write_text("\n".join(rows) + "\n")
    meta = {
        "anatomy": "spinal_cord", "shape": list(plan.grid.shape),
        "voxel_size_mm": list(plan.grid.voxel_size_mm), "affine_ras": affine.tolist(),
        "tr_s": plan.tr_s, "n_volumes": plan.n_volumes, "seed": plan.seed,
        "noise_sigma": plan.noise_sigma, "noise_model": plan.noise_model,
        "activation_pct": plan.activation_pct, "hrf": plan.hrf, "format": fmt,
        "slice_order": plan.slice_order, "slice_times_s": plan.slice_times_s.tolist(),
        "swallow_volumes": list(plan.swallows), "amplitudes": plan.amplitudes,
        "slice_factor": plan.maps.slice_factor.tolist(),
        "canal_centre_ras_mm": plan.maps.centre_ras.tolist(),
        "phase_encoding": "COL (A-P)",
        "bandwidth_per_pixel_phase_hz": plan.bandwidth_per_pixel_phase_hz,
        "physio_hz": plan.physio.hz, "physio_start_s": plan.physio.start_s,
        "series_instance_uid": series_uid, "start_time": start_time,
        "slice_shifts_convention": "slice_shifts.npy (nt, nz, 2) mm, RAS x (R-L) and y "
                                   "(A-P): tissue at p in the masks' rest position is at "
                                   "p + shift in that slice of that volume",
    }
    (d / "truth.json").write_text(json.dumps(meta, indent=2))


def _cord_datasets(plan: CordPlan, info: SeriesInfo, fmt: str, truth: CordTruthWriter | None,
                   progressive: ProgressiveBidsWriter | None) -> Iterator[list[Dataset]]:
    affine = plan.grid.affine()
    for volume in iter_cord_volumes(plan):
        if truth is not None:
            truth.add(volume.index, volume.data, volume.quantised)
        if progressive is not None:  # physiology up to the end of this volume
            progressive.advance((volume.index + 1) * plan.tr_s)
        if fmt == "mosaic":
            yield [volume_to_mosaic(volume.quantised, affine, info, volume.index)]
        elif fmt == "multiframe":
            yield [volumes_to_multiframe(volume.quantised, affine, info, volume.index)]
        else:
            yield volume_to_slices(volume.quantised, affine, info, volume.index)


def run_cord_simulation(config: SimulatorConfig, out_dir: str | Path | None = None,
                        send_to: tuple[str, int] | None = None, called_ae: str = "RTSC",
                        truth_dir: str | Path | None = None, series_number: int = 1,
                        physio_dir: str | Path | None = None) -> SimulationResult:
    """Simulate one spinal cord series (``simulator.anatomy: spinal_cord``).

    As :func:`simulator.scanner.run_simulation`; in addition the physiology is written
    to ``physio_dir`` (default ``out_dir/physio``, or ``<truth_dir>/physio`` when
    sending): ``sub-sim_task-cord_physio.tsv.gz`` + ``.json`` (BIDS) and
    ``sub-sim_task-cord.puls`` / ``.resp`` (Siemens PMU). With
    ``simulator.cord.physio_progressive`` the BIDS samples are also appended to
    ``sub-sim_task-cord_physio.tsv`` while the volumes are produced (up to the end of
    each volume just before it is sent or written).
    """
    if (out_dir is None) == (send_to is None):
        raise ValueError("give exactly one of out_dir and send_to")
    t0 = time.time()
    plan = plan_cord_run(config)
    info = new_series_info(series_number, plan.tr_s, n_volumes=plan.n_volumes, start_time=t0,
                           slice_times_s=tuple(float(x) for x in plan.slice_times_s),
                           series_description="ep2d_bold_cord_sim", te_s=0.040,
                           bandwidth_per_pixel_phase_hz=plan.bandwidth_per_pixel_phase_hz)
    if out_dir is not None:
        dicom_dir: Path | None = Path(out_dir) / "dicom"
        truth_path = Path(truth_dir) if truth_dir else Path(out_dir) / "truth"
        physio_path = Path(physio_dir) if physio_dir else Path(out_dir) / "physio"
    else:
        dicom_dir = None
        truth_path = Path(truth_dir) if truth_dir else \
            Path("simulator-runs") / time.strftime("%Y%m%d-%H%M%S")
        physio_path = Path(physio_dir) if physio_dir else truth_path / "physio"
    truth = CordTruthWriter(truth_path, plan, info, config.format)
    (truth_path / "injected.json").write_text(json.dumps({
        "swallows": list(plan.swallows),
        "delays_s": {str(k): v for k, v in config.delays_s.items()},
        "dropped": sorted(config.drop_volumes)}, indent=2))
    progressive = (ProgressiveBidsWriter(plan.physio, physio_path, PHYSIO_STEM)
                   if config.cord.physio_progressive else None)
    stream = _cord_datasets(plan, info, config.format, truth, progressive)
    try:
        n_files, failures, files = deliver(stream, config, plan.tr_s, send_to, called_ae,
                                           dicom_dir)
    finally:
        truth.close()
        if progressive is not None:
            progressive.finish()
        write_bids_physio(plan.physio, physio_path, PHYSIO_STEM)
        write_siemens_pmu(plan.physio, physio_path, PHYSIO_STEM, t0)
    return SimulationResult(plan.n_volumes, n_files, truth_path, dicom_dir, send_to is not None,
                            info.series_uid, time.time() - t0, failures, files)
