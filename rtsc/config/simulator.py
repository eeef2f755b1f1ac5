"""Configuration of the scanner simulator and of `rtsc demo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rtsc.config.fields import _spec
from rtsc.errors import ConfigError


@dataclass(frozen=True)
class CordSimConfig:
    """The simulator's spinal cord run (``simulator.anatomy: spinal_cord``)."""

    shape: list[int] = _spec([128, 128, 24], lo=4, hi=512, length=3, doc="matrix nx, ny, nz")
    voxel_size_mm: list[float] = _spec([1.0, 1.0, 5.0], lo=0.1, hi=20.0, length=3,
                                       doc="voxel size, mm")
    tr_s: float = _spec(2.3, lo=0.05, hi=60.0, doc="repetition time, s")
    slice_order: str = _spec("interleaved", choices=("interleaved", "ascending", "descending"),
                             doc="slice acquisition order (the DICOM slice times follow it)")
    noise_sigma: float = _spec(20.0, lo=0.0, hi=10000.0, doc="thermal noise SD, intensity "
                                                              "units (cord about 1000)")
    activation_pct: float = _spec(4.0, lo=0.0, hi=100.0,
                                  doc="BOLD amplitude in the left dorsal horn, percent")
    hrf: str = _spec("spm", choices=("spm", "delayed"),
                     doc="response shape: canonical (peak ~5 s) or delayed (peak ~9 s)")
    block_s: float = _spec(20.0, lo=1.0, hi=1000.0, doc="task and rest block length, s")
    resp_shift_mm: float = _spec(0.8, lo=0.0, hi=20.0,
                                 doc="peak-to-peak A-P shift locked to breathing, mm")
    cardiac_shift_mm: float = _spec(0.15, lo=0.0, hi=20.0,
                                    doc="peak-to-peak A-P shift locked to the heartbeat, mm")
    lr_fraction: float = _spec(0.25, lo=0.0, hi=2.0, doc="R-L motion / A-P motion")
    n_swallows: int = _spec(2, lo=0, hi=1000, doc="swallowing jumps (1-2 volumes each)")
    swallow_shift_mm: float = _spec(2.5, lo=0.0, hi=50.0, doc="A-P size of a swallow, mm")
    heart_bpm: float = _spec(66.0, lo=20.0, hi=250.0, doc="heart rate, beats per minute")
    breaths_per_min: float = _spec(15.0, lo=2.0, hi=60.0, doc="breathing rate, per minute")
    cardiac_csf: float = _spec(0.08, lo=0.0, hi=1.0, doc="CSF pulsation, fraction of signal")
    cardiac_cord: float = _spec(0.03, lo=0.0, hi=1.0, doc="cardiac signal in the cord, fraction")
    respiratory: float = _spec(0.025, lo=0.0, hi=1.0, doc="respiratory signal, fraction")
    interaction: float = _spec(0.02, lo=0.0, hi=1.0,
                               doc="cardiac x respiratory term in CSF, fraction")
    physio_hz: float = _spec(100.0, lo=10.0, hi=2000.0, doc="physiology sampling rate, Hz")
    physio_progressive: bool = _spec(True, doc="append the BIDS physio .tsv while the run "
                                               "is produced (the .tsv.gz comes at the end)")
    psf_samples: int = _spec(4, lo=1, hi=8, doc="in-plane sub-samples per axis per voxel")
    bandwidth_per_pixel_phase_hz: float = _spec(17.0, lo=1.0, hi=1000.0,
                                                doc="BandwidthPerPixelPhaseEncode written, Hz")


@dataclass(frozen=True)
class SimulatorConfig:
    """The scanner simulator."""

    anatomy: str = _spec("brain", choices=("brain", "epi_image", "mni152", "spinal_cord"),
                         doc="brain: the analytic phantom (wholly inside the field of view); "
                             "epi_image: a measured EPI volume (simulator.base_image) cut by "
                             "the field of view, its matrix and voxel size replacing shape and "
                             "voxel_size_mm; mni152: nilearn's MNI152 template with EPI "
                             "contrast on shape x voxel_size_mm, vertex and inferior "
                             "cerebellum cut (simulator/real_anatomy.py); spinal_cord: the "
                             "cervical cord run of simulator.cord (its shape, voxel size and "
                             "TR replace those above)")
    base_image: str | None = _spec(None, doc="anatomy epi_image: one EPI volume, a NIfTI or "
                                             "a whole-volume DICOM file (e.g. a Siemens "
                                             "mosaic such as heudiconv's axasc35.dcm)")
    cord: CordSimConfig = field(default_factory=CordSimConfig)
    shape: list[int] = _spec([64, 64, 36], lo=4, hi=512, length=3, doc="matrix nx, ny, nz")
    voxel_size_mm: list[float] = _spec([3.0, 3.0, 3.0], lo=0.1, hi=20.0, length=3,
                                       doc="voxel size, mm")
    tr_s: float = _spec(2.0, lo=0.05, hi=60.0, doc="repetition time, s")
    n_volumes: int = _spec(60, lo=1, hi=100000, doc="volumes in the run")
    format: str = _spec("mosaic", choices=("mosaic", "slices", "multiframe"),
                        doc="mosaic: Siemens mosaics with the CSA header, one file per "
                            "volume; slices: one file per slice; multiframe: enhanced MR, "
                            "one file per volume")
    vendor: str = _spec("siemens", choices=("siemens", "philips"),
                        doc="philips: classic single-slice DICOM as a Philips scanner writes "
                            "it (format slices; files numbered slice by slice across time, "
                            "ScanningSequence GR with the FEEPI private tags)")
    seed: int = _spec(0, lo=0, hi=2**31 - 1,
                      doc="random seed of the simulated run")
    noise_sigma: float = _spec(10.0, lo=0.0, hi=10000.0, doc="thermal noise SD, intensity units")
    activation_pct: float = _spec(3.0, lo=0.0, hi=100.0, doc="BOLD amplitude, percent")
    max_trans_mm: float = _spec(1.0, lo=0.0, hi=50.0,
                                doc="largest translation of the simulated head, mm")
    max_rot_deg: float = _spec(1.0, lo=0.0, hi=45.0,
                               doc="largest rotation of the simulated head, degrees")
    n_jumps: int = _spec(3, lo=0, hi=1000, doc="abrupt moves in the run")
    psf_samples: int = _spec(2, lo=1, hi=8, doc="sub-samples per axis averaged into each voxel "
                                                "(partial volume); 1 samples voxel centres; "
                                                "analytic phantom only (a real base is "
                                                "already voxel averages)")
    speed: float = _spec(1.0, lo=0.0, hi=1e6, doc="send speed factor; 0 means as fast as possible")
    calling_ae: str = _spec("RTSC_SIM", doc="calling AE title the simulator sends with")
    spikes: list[list[int]] = _spec([], lo=0, hi=100000,
                                    doc="k-space spikes to inject: [volume, slice] pairs")
    spike_amplitude: float = _spec(20.0, lo=0.0, hi=1e6,
                                   doc="spike grating amplitude, intensity units")
    delays_s: dict[int, float] = _spec({}, doc="volume index -> seconds it is sent late")
    drop_volumes: list[int] = _spec([], lo=0, hi=100000, doc="volume indices never sent")

    def __post_init__(self) -> None:
        if self.anatomy == "epi_image":
            if self.base_image is None:
                raise ConfigError("simulator.base_image: null, but simulator.anatomy is "
                                  "epi_image; give the path of an EPI volume (NIfTI or "
                                  "whole-volume DICOM)")
            if not Path(self.base_image).is_file():
                raise ConfigError(f"simulator.base_image: {self.base_image!r} is not a file")


@dataclass(frozen=True)
class DemoConfig:
    """`rtsc demo`."""

    n_volumes: int = _spec(80, lo=1, hi=100000, doc="volumes of the demo run")
    speed: float = _spec(10.0, lo=0.0, hi=1e6, doc="0 means as fast as possible")

