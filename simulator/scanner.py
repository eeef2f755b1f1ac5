"""The simulated scanner: plan a run, write or send its DICOM, save its ground truth.

Ground truth (``truth/`` next to the DICOM, or ``--truth DIR`` when sending)::

    truth.json             grid, affine, TR, seed, noise, format, series UID
    bold_float.npy         (nx, ny, nz, nt) float32, signal + noise before quantisation
    bold_quantised.npy     (nx, ny, nz, nt) int16, exactly the DICOM pixel values
    motion.tsv             trans_x..rot_z (mm, radians; rtsc.conventions), framewise_displacement
    events.tsv             BIDS onset, duration, trial_type
    design.tsv             task regressor (HRF-convolved, peak 1) and drift per volume
    activation.nii.gz      activation weight in [0, 1], reference grid
    activation_mask.nii.gz / brain_mask.nii.gz
    injected.json          spikes [volume, slice, amplitude], delays_s {volume: s},
                           dropped [volumes]

The head (``simulator.anatomy``) is the analytic phantom (``brain``,
:mod:`simulator.phantom`), wholly inside the field of view, or a real image cut by it
(``epi_image``: a measured EPI volume, ``simulator.base_image``; ``mni152``: nilearn's
template with EPI contrast; :mod:`simulator.real_anatomy`), with the same motion, BOLD,
noise and injections and the same truth files; truth.json then also names the base, its
placement and the activation centre. ``spinal_cord`` is :mod:`simulator.cord_run`'s run.
Writing or sending the datasets at the TR pace, and the truth's volume files, are
:mod:`simulator.output`'s, shared by both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from rtsc.config import SimulatorConfig
from rtsc.conventions import MOTION_NAMES, framewise_displacement_series
from rtsc.errors import ConfigError
from simulator.bold import RunPlan, iter_volumes, plan_run
from simulator.dicom_series import PHILIPS, SeriesInfo, new_series_info
from simulator.dicom_writer import (
    volume_to_mosaic,
    volume_to_philips_slices,
    volume_to_slices,
)
from simulator.cord_run import run_cord_simulation
from simulator.multiframe_writer import volumes_to_multiframe
from simulator.output import SimulationResult, TruthWriter, deliver, write_events
from simulator.phantom import Grid
from simulator.real_anatomy import ANATOMIES, CoverageError, check_coverage, load_anatomy

log = logging.getLogger(__name__)


def make_plan(config: SimulatorConfig) -> RunPlan:
    """The run described by the ``simulator`` config section.

    ``anatomy`` ``epi_image`` or ``mni152``: the head is a real image
    (:mod:`simulator.real_anatomy`), which also sets the acquired grid for ``epi_image``;
    ``psf_samples`` is then 1 (the base is already voxel averages).
    """
    grid = Grid(tuple(config.shape), tuple(config.voxel_size_mm))  # type: ignore[arg-type]
    head = None
    psf_samples = config.psf_samples
    if config.anatomy in ANATOMIES:
        try:
            grid, head = load_anatomy(config.anatomy, config.base_image, grid)
        except ImportError as exc:
            raise ConfigError(f"simulator.anatomy: {config.anatomy!r}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"simulator.base_image: {exc}") from exc
        psf_samples = 1
    for i, pair in enumerate(config.spikes):
        if len(pair) != 2 or not pair[1] < grid.shape[2]:
            raise ConfigError(f"simulator.spikes[{i}]: {pair!r}; allowed: [volume, slice] "
                              f"with slice below {grid.shape[2]}")
    motion_kwargs = dict(max_trans_mm=config.max_trans_mm, max_rot_deg=config.max_rot_deg,
                         n_jumps=config.n_jumps)
    plan = plan_run(grid, config.n_volumes, config.tr_s, seed=config.seed,
                    noise_sigma=config.noise_sigma, activation_pct=config.activation_pct,
                    motion_kwargs=motion_kwargs, psf_samples=psf_samples, phantom=head,
                    spikes=[(v, k, config.spike_amplitude) for v, k in config.spikes])
    if head is not None:
        try:  # the anatomy beyond the base's slices is not invented
            check_coverage(head, grid, np.unique(plan.motion, axis=0))
        except CoverageError as exc:
            raise ConfigError(f"simulator.max_trans_mm / simulator.max_rot_deg "
                              f"({config.max_trans_mm} mm, {config.max_rot_deg} deg): {exc}"
                              ) from exc
    return plan


def datasets(plan: RunPlan, info: SeriesInfo, fmt: str, truth: TruthWriter | None = None,
             vendor: str = "siemens") -> Iterator[list[Dataset]]:
    """The DICOM datasets of each volume, in acquisition order (computed lazily).

    ``vendor`` ``philips`` (with ``fmt`` ``slices``): Philips classic single slices
    (:func:`~simulator.dicom_writer.volume_to_philips_slices`).
    """
    check_vendor(fmt, vendor)
    return _datasets(plan, info, fmt, truth, vendor)


def check_vendor(fmt: str, vendor: str) -> None:
    """Raise ConfigError for a vendor and format the simulator cannot write together."""
    if vendor == "philips" and fmt != "slices":
        raise ConfigError(f"simulator.vendor: philips writes classic single-slice DICOM; "
                          f"simulator.format {fmt!r} is not allowed with it, use slices")


def _datasets(plan: RunPlan, info: SeriesInfo, fmt: str, truth: TruthWriter | None,
              vendor: str) -> Iterator[list[Dataset]]:
    affine = plan.grid.affine()
    for volume in iter_volumes(plan):
        if truth is not None:
            truth.add(volume.index, volume.data, volume.quantised)
        if vendor == "philips":
            yield volume_to_philips_slices(volume.quantised, affine, info, volume.index)
        elif fmt == "mosaic":
            yield [volume_to_mosaic(volume.quantised, affine, info, volume.index)]
        elif fmt == "multiframe":  # Siemens XA style: one enhanced MR file per volume
            yield [volumes_to_multiframe(volume.quantised, affine, info, volume.index)]
        else:
            yield volume_to_slices(volume.quantised, affine, info, volume.index)


class BrainTruthWriter(TruthWriter):
    """Saves the ground truth of a brain run (analytic phantom or a real base) as volumes
    are produced: the volumes as every :class:`~simulator.output.TruthWriter`, and the
    run's static truth (see the module docstring)."""

    def _write_static(self, plan: RunPlan, info: SeriesInfo, fmt: str) -> None:
        d = self.directory
        affine = plan.grid.affine()
        meta = {
            "shape": list(plan.grid.shape), "voxel_size_mm": list(plan.grid.voxel_size_mm),
            "affine_ras": affine.tolist(), "tr_s": plan.tr_s, "n_volumes": plan.n_volumes,
            "seed": plan.seed, "noise_sigma": plan.noise_sigma, "noise_model": plan.noise_model,
            "activation_pct": plan.activation_pct, "format": fmt, "vendor": self.vendor,
            "series_instance_uid": info.series_uid, "start_time": info.start_time,
            "psf_samples": plan.psf_samples,
            "motion_convention": "rtsc.conventions: x_current = R (x_ref - c) + c + t, "
                                 "R = Rz Ry Rx, c = RAS centre of the grid; mm and radians",
        }
        # The head: the analytic phantom, or a real base (which image, where, activation).
        meta.update(plan.phantom.truth() if hasattr(plan.phantom, "truth") else {
            "anatomy": "brain", "activation_center_ras":
                [float(v) for v in plan.phantom.activation_center_ras]})
        (d / "truth.json").write_text(json.dumps(meta, indent=2))
        fd = framewise_displacement_series(plan.motion)
        rows = ["\t".join((*MOTION_NAMES, "framewise_displacement"))]
        rows += ["\t".join(f"{v:.9g}" for v in (*m, f)) for m, f in zip(plan.motion, fd)]
        (d / "motion.tsv").write_text("\n".join(rows) + "\n")
        write_events(plan.events, d / "events.tsv")
        rows = ["task\tdrift"] + [f"{r:.9g}\t{dr:.9g}" for r, dr in zip(plan.regressor, plan.drift)]
        (d / "design.tsv").write_text("\n".join(rows) + "\n")
        xyz = plan.grid.ras_coordinates()
        shape = plan.grid.shape
        activation = plan.phantom.activation(xyz).reshape(shape).astype(np.float32)
        nib.save(nib.Nifti1Image(activation, affine), d / "activation.nii.gz")
        nib.save(nib.Nifti1Image((activation > 0.5).astype(np.uint8), affine),
                 d / "activation_mask.nii.gz")
        brain = plan.phantom.brain_mask(xyz).reshape(shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(brain, affine), d / "brain_mask.nii.gz")


def run_simulation(config: SimulatorConfig, out_dir: str | Path | None = None,
                   send_to: tuple[str, int] | None = None, called_ae: str = "RTSC",
                   truth_dir: str | Path | None = None, series_number: int = 1) -> SimulationResult:
    """Simulate one series and write it to ``out_dir`` and/or send it to ``send_to``.

    Parameters
    ----------
    config : SimulatorConfig
    out_dir : path or None
        Files go to ``out_dir/dicom`` (at the TR pace given by ``config.speed``), the
        ground truth to ``out_dir/truth``.
    send_to : (host, port) or None
        C-STORE receiver; one association, paced at ``tr_s / speed``.
    called_ae : str
        The receiver's AE title.
    truth_dir : path or None
        Where to save the ground truth when sending (default ``./simulator-runs/<time>``).
    """
    if config.anatomy == "spinal_cord":
        if config.vendor != "siemens":
            raise ConfigError(f"simulator.vendor: {config.vendor!r} is not simulated for "
                              "anatomy spinal_cord (Siemens only)")
        return run_cord_simulation(config, out_dir, send_to, called_ae, truth_dir,
                                   series_number)
    if (out_dir is None) == (send_to is None):
        raise ValueError("give exactly one of out_dir and send_to")
    check_vendor(config.format, config.vendor)
    t0 = time.time()
    plan = make_plan(config)
    vendor_kw = dict(manufacturer=PHILIPS, series_description="WIP_fMRI_FEEPI_sim") \
        if config.vendor == "philips" else {}
    info = new_series_info(series_number, config.tr_s, n_volumes=config.n_volumes,
                           start_time=t0, **vendor_kw)
    if out_dir is not None:
        dicom_dir: Path | None = Path(out_dir) / "dicom"
        truth_path = Path(truth_dir) if truth_dir else Path(out_dir) / "truth"
    else:
        dicom_dir = None
        truth_path = Path(truth_dir) if truth_dir else \
            Path("simulator-runs") / time.strftime("%Y%m%d-%H%M%S")
    truth = BrainTruthWriter(truth_path, plan, info, config.format, config.vendor)
    (truth_path / "injected.json").write_text(json.dumps({
        "spikes": [list(s) for s in plan.spikes],
        "delays_s": {str(k): v for k, v in config.delays_s.items()},
        "dropped": sorted(config.drop_volumes)}, indent=2))
    stream = datasets(plan, info, config.format, truth, config.vendor)
    try:
        n_files, failures, files = deliver(stream, config, config.tr_s, send_to, called_ae,
                                           dicom_dir)
    finally:
        truth.close()
    return SimulationResult(config.n_volumes, n_files, truth_path, dicom_dir, send_to is not None,
                            info.series_uid, time.time() - t0, failures, files)


