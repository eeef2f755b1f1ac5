"""Series recognition: which series are BOLD time series the pipeline should process.

Scanners send more than BOLD in a session: single-band references (``*_SBRef``),
scanner-side motion-corrected copies (``*_MoCoSeries``, ImageType ``MOCO``), physiology
logs (CMRR ``*_PhysioLog``, raw data storage), localizers and derived images. They are
recognised from their header tags by the rules of :class:`~rtsc.config.SeriesFilterConfig`
and archived, not processed.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from rtsc.config import SeriesFilterConfig


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
            return f"ScanningSequence {'/'.join(sequence) or 'empty'} is not echo planar"
    return None
