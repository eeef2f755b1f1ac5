"""Series recognition: only BOLD time series enter the pipeline.

A mixed session as a Siemens console sends it (an SBRef, a BOLD run, its scanner-side
MoCo copy, a localizer, a three-echo BOLD run, a PMU physio log) over one association:
only the BOLD run and the three echoes of the multi-echo run are processed, each as its
own series; everything is archived; each skipped series gets one `info` alert naming
the tag that gave it away.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from rtsc.config import ConfigError, SeriesFilterConfig, config_from_dict
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.incoming import Incoming
from rtsc.dicom.recognise import skip_reason
from rtsc.volume import Volume, series_id
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices
from simulator.phantom import Grid
from simulator.sender import send_series

SHAPE = (16, 16, 8)
TR_S = 1.0
N = 4


def _affine() -> np.ndarray:
    return Grid(SHAPE, (3.0, 3.0, 3.0)).affine()


def _data(rng, n: int) -> np.ndarray:
    """A fixed random image plus a little noise per volume (registration converges)."""
    base = rng.integers(100, 3000, size=(*SHAPE, 1))
    return (base + rng.integers(0, 5, size=(*SHAPE, n))).astype(np.int16)


def session(rng) -> dict[str, tuple[object, list[list[pydicom.Dataset]], np.ndarray]]:
    """name -> (SeriesInfo, per-volume dataset lists, data) of a mixed session."""
    out = {}
    start = time.time()

    def series(name, number, description, n, fmt="mosaic", **kw):
        info = new_series_info(number, TR_S, n_volumes=n, start_time=start,
                               series_description=description, **kw)
        data = _data(rng, n)
        make = volume_to_mosaic if fmt == "mosaic" else volume_to_slices
        vols = [make(data[..., t], _affine(), info, t) for t in range(n)]
        vols = [v if isinstance(v, list) else [v] for v in vols]
        out[name] = (info, vols, data)
        return vols

    series("sbref", 3, "ep2d_bold_SBRef", 1)
    series("bold", 4, "ep2d_bold", N)
    for (ds,) in series("moco", 5, "ep2d_bold_MoCoSeries", N):
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "ND", "MOCO", "MOSAIC"]
    for vol in series("localizer", 1, "AAHead_Scout_64ch", 1, fmt="slices"):
        for ds in vol:
            ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
    # Multi-echo BOLD: one SeriesInstanceUID, EchoNumbers 1..3, interleaved per volume.
    uid = generate_uid()
    echoes = []
    for echo, te in ((1, 0.015), (2, 0.035), (3, 0.055)):
        info = new_series_info(6, TR_S, n_volumes=N, start_time=start, te_s=te,
                               series_uid=uid, series_description="ep2d_me_bold")
        data = _data(rng, N)
        vols = []
        for t in range(N):
            ds = volume_to_mosaic(data[..., t], _affine(), info, t)
            ds.EchoNumbers = str(echo)
            vols.append([ds])
        out[f"echo{echo}"] = (info, vols, data)
        echoes.append(vols)
    out["me_interleaved"] = (None, [[e[t][0] for e in echoes] for t in range(N)], None)
    return out


def test_skip_reasons_name_the_tag(rng):
    rules = SeriesFilterConfig()
    s = session(rng)
    assert skip_reason(s["sbref"][1][0][0], rules) == "SeriesDescription ends with _SBRef"
    assert skip_reason(s["moco"][1][0][0], rules) == "SeriesDescription ends with _MoCoSeries"
    moco = s["moco"][1][0][0]
    moco.SeriesDescription = "renamed"
    assert skip_reason(moco, rules) == "ImageType contains DERIVED"
    assert "localizer" in skip_reason(s["localizer"][1][0][0], rules)
    scout = s["localizer"][1][0][0]
    scout.SeriesDescription = "t1_fl2d"
    assert skip_reason(scout, rules) == "ScanningSequence GR is not echo planar"
    physio = pydicom.Dataset()
    physio.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66"
    assert "Raw Data Storage" in skip_reason(physio, rules)
    for name in ("bold", "echo1", "echo3"):
        assert skip_reason(s[name][1][0][0], rules) is None
    assert skip_reason(s["sbref"][1][0][0], SeriesFilterConfig(enabled=False)) is None


def test_series_filter_config_is_validated():
    cfg = config_from_dict({"series_filter": {"description_suffixes": ["_SBRef"],
                                              "require_epi": False}})
    assert cfg.series_filter.description_suffixes == ["_SBRef"]
    with pytest.raises(ConfigError, match="series_filter.*bogus"):
        config_from_dict({"series_filter": {"bogus": 1}})
    with pytest.raises(ConfigError, match="series_filter.require_epi"):
        config_from_dict({"series_filter": {"require_epi": "yes"}})


def test_skipped_series_alert_once_and_normal_series_still_assemble(rng):
    s = session(rng)
    assembler = Assembler(config_from_dict({}).assembler)
    events = []
    for vol in s["moco"][1] + s["bold"][1]:
        for ds in vol:
            events.extend(assembler.add(Incoming(ds, None, time.time(), "cstore")))
    alerts = [e for e in events if isinstance(e, AssemblyAlert)]
    assert len(alerts) == 1 and alerts[0].level == "info" and alerts[0].code == "skipped_series"
    assert "MoCoSeries" in alerts[0].message
    volumes = [e for e in events if isinstance(e, Volume)]
    assert [v.index for v in volumes] == list(range(N))


def test_mixed_session_in_one_association(service_factory, rng):
    service, collector = service_factory(session={"report": False})
    s = session(rng)
    order = ["localizer", "sbref", "bold", "moco", "me_interleaved"]
    volumes = [vol for name in order for vol in s[name][1]]
    report = send_series(volumes, "127.0.0.1", service.receiver.port, speed=0)
    assert report.n_failed == 0
    processed = {series_id(s["bold"][0].series_uid): "bold",
                 series_id(s["echo1"][0].series_uid): "echo1",
                 series_id(s["echo1"][0].series_uid + "/echo2"): "echo2",
                 series_id(s["echo1"][0].series_uid + "/echo3"): "echo3"}
    deadline = time.time() + 60
    while len(collector.topic("series.end")) < 4 and time.time() < deadline:
        time.sleep(0.1)
    starts = collector.topic("series.start")
    assert sorted(m.header["series"] for m in starts) == sorted(processed)
    assert {m.header["echo"] for m in starts} == {1, 2, 3}
    ends = {m.header["series"]: m.header for m in collector.topic("series.end")}
    assert set(ends) == set(processed)
    for sid, name in processed.items():
        idx = [m.header["index"] for m in collector.topic("volume") if m.header["series"] == sid]
        assert idx == list(range(N)), name
        img = nib.load(ends[sid]["outputs"]["bold"])
        np.testing.assert_array_equal(np.asarray(img.dataobj), s[name][2])
    skipped = [m.header for m in collector.topic("alert") if m.header["code"] == "skipped_series"]
    assert len(skipped) == 3 and all(a["level"] == "info" for a in skipped)
    text = " ".join(a["message"] for a in skipped)
    for needle in ("_SBRef", "_MoCoSeries", "AAHead_Scout_64ch", "localizer"):
        assert needle in text
    # Everything sent is archived, skipped series included.
    for name in ("localizer", "sbref", "moco", "bold"):
        archive = service.store.series_dir(series_id(s[name][0].series_uid)) / "dicom"
        assert len(list(archive.glob("*.dcm"))) == sum(len(v) for v in s[name][1]), name
    me_archive = service.store.series_dir(series_id(s["echo1"][0].series_uid)) / "dicom"
    assert len(list(me_archive.glob("*.dcm"))) == 3 * N  # the echoes share their UID
