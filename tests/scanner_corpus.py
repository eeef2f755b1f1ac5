"""The real scanner series in ``tests/data/realdata`` and what is known about each.

The files are copies of dcm2niix's validation corpora dcm_qa_nih and dcm_qa_stc
(BSD-2-Clause) and of pyneal's test acquisitions (MIT), each licence beside its files
(docs/real-scanners.md). ``Ref/`` holds what dcm2niix made of the same DICOM files: the reference for
voxels, affine, TR and slice times.

Usable outside pytest: ``python tests/scanner_corpus.py`` lists the series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The world-axis helpers live in rtsc (verify compares through them too); the tests import
# them from here.
from rtsc.dicom.geometry import (phase_encoding_world, slice_times_world,  # noqa: F401
                                 world_axis)

ROOT = Path(__file__).parent / "data" / "realdata"


@dataclass(frozen=True)
class CorpusSeries:
    """One fMRI series of the corpus.

    Attributes
    ----------
    key : str
        Short unique name, used as the pytest id.
    folder : str
        Folder of the DICOM (or PAR/REC) files, relative to :data:`ROOT`.
    vendor : str
        ``GE``, ``Siemens`` or ``Philips``.
    layout : str
        ``slices`` (one file per slice), ``mosaic``, ``multiframe`` (one enhanced file
        per volume) or ``parrec`` (Philips real-time PAR/REC pairs, one per volume).
    ref : str or None
        dcm2niix's output for the series, relative to :data:`ROOT` without the suffix
        (``.nii.gz`` and ``.json``); None where the corpus ships none.
    n_volumes : int
        Volumes whose files are in the folder.
    n_expected : int or None
        The run length the scanner announced in the headers (the corpus often keeps
        only the first volumes of a longer run), None when the headers do not say.
    part_of : str or None
        Key of the series whose files these are a subset of (byte-identical files, same
        SeriesInstanceUID: dcm_qa_stc took its GE protocol-data-block series from
        dcm_qa_nih); its reference then describes that series' first volumes.
    """

    key: str
    folder: str
    vendor: str
    layout: str
    ref: str | None
    n_volumes: int
    n_expected: int | None
    part_of: str | None = None

    @property
    def path(self) -> Path:
        return ROOT / self.folder

    @property
    def ref_nifti(self) -> Path | None:
        return None if self.ref is None else ROOT / f"{self.ref}.nii.gz"

    @property
    def ref_json(self) -> Path | None:
        return None if self.ref is None else ROOT / f"{self.ref}.json"

    def files(self) -> list[Path]:
        """The series' data files in name order (README and other text files left out)."""
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.suffix.lower() not in (".txt", ".md"))


_NIH_GE = {4: "interleaved I-S", 5: "sequential I-S", 6: "interleaved S-I", 7: "sequential S-I"}

SERIES: tuple[CorpusSeries, ...] = (
    *(CorpusSeries(f"nih-ge-{n}", f"dcm_qa_nih/In/20180918GE/mr_000{n}", "GE", "slices",
                   f"dcm_qa_nih/Ref/DCM2NIIX_regression_test_{n}", 10, 10) for n in _NIH_GE),
    *(CorpusSeries(f"nih-siemens-{pe.lower()}", f"dcm_qa_nih/In/20180918Si/mr_000{n}",
                   "Siemens", "mosaic", f"dcm_qa_nih/Ref/EPI_PE={pe}_{n}", 2, 2)
      for n, pe in ((3, "AP"), (4, "PA"), (5, "RL"), (6, "LR"))),
    *(CorpusSeries(f"stc-ge-pdb-{n}", f"dcm_qa_stc/In/GE/ProtocolDataBlock/mr_000{n}", "GE",
                   "slices", f"dcm_qa_stc/Ref/GE_DCM2NIIX_regression_test_{n}", 3, 10,
                   part_of=f"nih-ge-{n}") for n in _NIH_GE),
    CorpusSeries("stc-ge-rtia", "dcm_qa_stc/In/GE/RTIA/2_epiRT_ascending", "GE", "slices",
                 "dcm_qa_stc/Ref/GE_Brain_Routine_2", 3, 16),
    CorpusSeries("stc-ge-triggertime", "dcm_qa_stc/In/GE/TriggerTime/4_epi_ascending", "GE",
                 "slices", "dcm_qa_stc/Ref/GE_Brain_Routine_4", 16, 16),
    CorpusSeries("stc-ge-rtiaold", "dcm_qa_stc/In/GE/RTIAold/15_Zugfahrt", "GE", "slices",
                 "dcm_qa_stc/Ref/GE_Zugfahrt_test_4_15", 2, 5),
    CorpusSeries("stc-siemens-b12", "dcm_qa_stc/In/Siemens/B12/2_FMRI_AX_ASC", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_FMRI_AX_ASC_2", 2, 2),
    CorpusSeries("stc-siemens-b13", "dcm_qa_stc/In/Siemens/B13/4_fMRIcontin", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_fMRIcontin_30x30x36_4", 3, 390),
    CorpusSeries("stc-siemens-b17", "dcm_qa_stc/In/Siemens/B17/6_ax_asc_35sl", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_ax_asc_35sl_6", 2, 2),
    CorpusSeries("stc-siemens-d13", "dcm_qa_stc/In/Siemens/D13/ep2d_Asc_2", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_ep2d_Asc_2", 2, 6),
    CorpusSeries("stc-siemens-d13-hf", "dcm_qa_stc/In/Siemens/D13/ep2d_Asc_HF_10", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_ep2d_Asc_HF_10", 2, 6),
    CorpusSeries("stc-siemens-e11-mb", "dcm_qa_stc/In/Siemens/E11/7_Rest_fMRI_AP", "Siemens",
                 "mosaic", "dcm_qa_stc/Ref/Siemens_Rest_fMRI_AP_7", 2, 22),
    # XA10 has no NumberOfTemporalPositions: its protocol text (private (0021,1019) in the
    # shared functional group) says lRepetitions = 449.
    CorpusSeries("stc-siemens-xa10-mb", "dcm_qa_stc/In/Siemens/XA10/6_REST1_w_SMS_PF7-8",
                 "Siemens", "multiframe", "dcm_qa_stc/Ref/Siemens_REST1_w_SMS_PF7-8_6", 18,
                 450),
    CorpusSeries("pyneal-ge", "pyneal/GE_env/funcData/s1925", "GE", "slices", None, 3, 60),
    CorpusSeries("pyneal-siemens", "pyneal/Siemens_env/funcData", "Siemens", "mosaic", None,
                 3, 60),
    # The Philips real-time dumps announce no run length: every .par says "Max. number of
    # dynamics: 1" (one dump per volume).
    CorpusSeries("pyneal-philips", "pyneal/Philips_env/funcData/0001", "Philips", "parrec",
                 None, 4, None),
)

BY_KEY = {s.key: s for s in SERIES}


def dicom_series(whole_only: bool = False) -> list[CorpusSeries]:
    """The series stored as DICOM (everything but the PAR/REC dumps); with
    ``whole_only``, without those that are part of another (see ``part_of``)."""
    return [s for s in SERIES if s.layout != "parrec" and not (whole_only and s.part_of)]


if __name__ == "__main__":
    for s in SERIES:
        print(f"{s.key:22s} {s.vendor:8s} {s.layout:10s} {s.n_volumes:3d} of "
              f"{s.n_expected if s.n_expected is not None else '?':>4}  {s.folder}")
