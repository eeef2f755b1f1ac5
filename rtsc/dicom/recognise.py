"""Series recognition: which series are BOLD time series the pipeline should process.

Scanners send more than BOLD in a session: single-band references (``*_SBRef``),
scanner-side motion-corrected copies (``*_MoCoSeries``, ImageType ``MOCO``), physiology
logs (CMRR ``*_PhysioLog``, raw data storage), localizers and derived images. They are
recognised from their header tags by the rules of :class:`~rtsc.config.SeriesFilterConfig`
and archived, not processed.

Echo planar imaging is told by ScanningSequence ``EP`` (Siemens, GE, Canon), except for
Philips, whose classic DICOM says ``GR`` (FFE-EPI) or ``SE`` (SE-EPI) for EPI as for any
gradient or spin echo: its EPI is told by the vendor's own tags (see
:func:`philips_echo_planar`; dcm2niix's notes on Philips DICOM list them).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from rtsc.config import SeriesFilterConfig
from rtsc.dicom.private import number, private_value, text
from rtsc.dicom.vendor import (
    PHILIPS_EPI_FACTOR,
    PHILIPS_IMAGING,
    PHILIPS_SCANNING_TECHNIQUE,
    manufacturer,
)


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\")]
    try:
        return [str(v).strip() for v in value]
    except TypeError:
        return [str(value).strip()]


def skip_reason(ds: Dataset, rules: SeriesFilterConfig) -> str | None:
    """Why a dataset's series is not a BOLD time series, or None when it is one.

    Parameters
    ----------
    ds : pydicom Dataset (header only is enough)
    rules : SeriesFilterConfig

    Returns
    -------
    str or None
        A short reason naming the tag that matched, e.g.
        ``"SeriesDescription ends with _SBRef"``.
    """
    if not rules.enabled:
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in rules.sop_classes:
        name = getattr(ds.get("SOPClassUID"), "name", sop_class)
        return f"SOP class {name} is not an image time series"
    description = str(ds.get("SeriesDescription", "") or "").strip()
    lowered = description.lower()
    for suffix in rules.description_suffixes:
        if suffix and lowered.endswith(suffix.lower()):
            return f"SeriesDescription ends with {suffix}"
    for word in rules.description_words:
        if word and word.lower() in lowered:
            return f"SeriesDescription contains {word!r} (localizer)"
    image_type = [v.upper() for v in _values(ds, "ImageType")]
    for wanted in rules.image_types:
        if wanted.upper() in image_type:
            return f"ImageType contains {wanted.upper()}"
    if rules.require_epi and "ScanningSequence" in ds:
        sequence = [v.upper() for v in _values(ds, "ScanningSequence")]
        if "EP" not in sequence:
            reason = f"ScanningSequence {'/'.join(sequence) or 'empty'} is not echo planar"
            if manufacturer(ds) != "PHILIPS":
                return reason
            epi, evidence = philips_echo_planar(ds)
            if not epi:
                return f"{reason} ({evidence})"
    return None


def philips_echo_planar(ds: Dataset) -> tuple[bool, str]:
    """Whether a Philips image is echo planar, and which tags said so.

    The first of these that is present decides:

    1. EchoPlanarPulseSequence (0018,9018) ``YES`` (Philips writes it in enhanced files;
       some classic exports carry it too);
    2. the private Scanning Technique Description (2001,xx20) of the ``Philips Imaging DD
       001`` block, or PulseSequenceName (0018,9005): EPI when it contains ``EPI``
       (``FEEPI`` for FFE-EPI BOLD, ``SEEPI``), not for ``T1TFE``, ``TSE``, ``FFE``...;
    3. the private EPI Factor (2001,xx13): EPI when above 1.

    Without any of them (private tags removed by an anonymiser or a PACS), the public
    tags of a BOLD time series decide: a 2D (MRAcquisitionType) gradient echo
    (ScanningSequence GR) with an echo train (EchoTrainLength above 1, which Philips sets
    to the EPI factor) repeated in time (NumberOfTemporalPositions above 1). A 3D T1 TFE,
    a TSE (SE) or a single-phase scan is not.

    Parameters
    ----------
    ds : pydicom Dataset (header only is enough); private elements may still be raw
        bytes (implicit VR)

    Returns
    -------
    (bool, str)
        Echo planar or not, and the evidence, e.g. ``"Philips ScanningTechnique T1TFE"``.
    """
    if str(ds.get("EchoPlanarPulseSequence", "") or "").strip().upper() == "YES":
        return True, "EchoPlanarPulseSequence YES"
    technique = text(private_value(ds, 0x2001, PHILIPS_IMAGING, PHILIPS_SCANNING_TECHNIQUE)) \
        or text(ds.get("PulseSequenceName"))
    if technique:
        return "EPI" in technique.upper(), f"Philips ScanningTechnique {technique}"
    factor = _integer(number(private_value(ds, 0x2001, PHILIPS_IMAGING, PHILIPS_EPI_FACTOR),
                             binary="i"))
    if factor is not None:
        return factor > 1, f"Philips EPI factor {factor}"
    acquisition = text(ds.get("MRAcquisitionType")).upper()
    sequence = [v.upper() for v in _values(ds, "ScanningSequence")]
    train = _integer(number(ds.get("EchoTrainLength")))
    positions = _integer(number(ds.get("NumberOfTemporalPositions")))
    epi = (acquisition == "2D" and "GR" in sequence and (train or 0) > 1
           and (positions or 0) > 1)
    return epi, (f"no Philips technique tag; MRAcquisitionType {acquisition or '?'}, "
                 f"EchoTrainLength {train if train is not None else '?'}, "
                 f"NumberOfTemporalPositions {positions if positions is not None else '?'}")


def _integer(value: float | None) -> int | None:
    return None if value is None else int(value)
