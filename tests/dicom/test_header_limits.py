"""Header amplification (issue 16 item 3): counts read from DICOM headers are checked
against what the bytes hold and the config caps; buffers grow with what arrived; alerts
and messages stay small whatever a header claims."""

from __future__ import annotations

import json

from rtsc.ranges import index_ranges, missing_ranges, ranges_text


def test_missing_ranges_cost_what_arrived_not_what_was_claimed():
    assert index_ranges([9, 3, 7, 8, 3]) == [[3, 3], [7, 9]]
    assert missing_ranges([0, 1, 4], 8) == (5, [[2, 3], [5, 7]])
    assert missing_ranges([], 0) == (0, [])
    # a claimed run of 2**31 - 1 volumes: one range, at once
    count, ranges = missing_ranges([0, 1, 2], 2**31 - 1)
    assert count == 2**31 - 4 and ranges == [[3, 2**31 - 2]]
    # every other volume missing: the count stays exact, the ranges listed are capped
    count, ranges = missing_ranges(range(0, 100000, 2), 100000)
    assert count == 50000 and len(ranges) == 100 and len(json.dumps(ranges)) < 2000
    assert ranges_text([[3, 3], [7, 9]]) == "3, 7-9"
    assert ranges_text(ranges, count) == \
        "1, 3, 5, 7, 9, 11, 13, 15 and 92 more ranges (50000 in all)"


# ---- the assembler: counts and numbers checked before anything is sized by them --------

import copy  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from rtsc.config import AssemblerConfig  # noqa: E402
from rtsc.dicom.assemble import Assembler, AssemblyAlert  # noqa: E402
from rtsc.dicom.csa import csa_image_header  # noqa: E402
from rtsc.dicom.incoming import Incoming  # noqa: E402
from rtsc.volume import Volume  # noqa: E402
from simulator.dicom_series import new_series_info  # noqa: E402
from simulator.dicom_writer import volume_to_mosaic, volume_to_slices  # noqa: E402
from simulator.siemens_csa import encode_csa2  # noqa: E402
from simulator.multiframe_writer import volumes_to_multiframe  # noqa: E402
from simulator.phantom import Grid  # noqa: E402

SHAPE = (64, 64, 36)
_DATA = np.random.default_rng(3).integers(0, 1000, size=SHAPE).astype(np.int16)
_AFFINE = Grid(SHAPE, (3.0, 3.0, 3.0)).affine()


def _feed(assembler: Assembler, datasets) -> tuple[list[Volume], list[AssemblyAlert]]:
    events = []
    for ds in datasets:
        events += assembler.add(Incoming(ds, None, time.time(), "cstore"))
    events += assembler.poll(now=time.time() + 100.0)
    return ([e for e in events if isinstance(e, Volume)],
            [e for e in events if isinstance(e, AssemblyAlert)])


def _mosaics(n=3, n_volumes=3, edit=None, data=_DATA):
    info = new_series_info(3, 2.0, n_volumes=n_volumes)
    out = []
    for i in range(n):
        ds = volume_to_mosaic(data, _AFFINE, info, i)
        if edit is not None:
            edit(ds, i)
        out.append(ds)
    return out


def _set_mosaic_count(ds: Dataset, n: int) -> None:
    """Rewrite the CSA image header's NumberOfImagesInMosaic (and the private copy)."""
    normal = csa_image_header(ds, {"SliceNormalVector"})["SliceNormalVector"]
    ds[0x0029, 0x1010].value = encode_csa2([
        ("NumberOfImagesInMosaic", "US", [str(n)]),
        ("SliceNormalVector", "FD", [f"{float(v):.8f}" for v in normal])])
    ds[0x0019, 0x100A].value = n


def test_slice_count_above_max_slices_is_refused_not_allocated():
    """ImagesInAcquisition 20000 on 64 x 64 slices built a 64 x 64 x 20000 volume (35 s,
    4.4 GB through the service) from 36 slices; now each image is refused at once."""
    info = new_series_info(4, 2.0, n_volumes=3)
    slices = volume_to_slices(_DATA, _AFFINE, info, 0)
    for ds in slices:
        ds.ImagesInAcquisition = 20000
    t0 = time.perf_counter()
    volumes, alerts = _feed(Assembler(AssemblerConfig()), slices)
    assert time.perf_counter() - t0 < 2.0
    assert volumes == [] and len(alerts) == len(slices)
    assert {a.code for a in alerts} == {"implausible_header"}
    assert "ImagesInAcquisition (0020,1002) says 20000 slices per volume, more than " \
           "assembler.max_slices (1024)" in alerts[0].message
    # the series was not half set up by its refused first image: a correct count works
    slices = volume_to_slices(_DATA, _AFFINE, info, 1)
    assembler = Assembler(AssemblerConfig())
    _feed(assembler, [_with(slices[0], ImagesInAcquisition=20000, SOPInstanceUID=generate_uid())])
    volumes, alerts = _feed(assembler, slices[1:] + [slices[0]])
    assert alerts == [] and len(volumes) == 1 and volumes[0].shape == SHAPE


def _with(ds: Dataset, **values) -> Dataset:
    changed = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(changed, keyword, value)
    return changed


@pytest.mark.parametrize("vendor", ["GE", "Philips"])
def test_private_slice_counts_are_capped_too(vendor):
    info = new_series_info(4, 2.0, n_volumes=3)
    slices = volume_to_slices(_DATA, _AFFINE, info, 0)[:2]
    for ds in slices:
        if vendor == "GE":
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.ImagesInAcquisition = 40000
            ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(0x4F, "SS", 30000)
        else:
            ds.Manufacturer = "Philips Medical Systems"
            ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
                0x18, "SL", 5000)
    _, alerts = _feed(Assembler(AssemblerConfig(max_slices=512)), slices)
    where = "GE Locations in Acquisition (0021,xx4F) says 30000" if vendor == "GE" \
        else "Philips Number of Slices MR (2001,xx18) says 5000"
    assert [a.code for a in alerts] == ["implausible_header"] * 2
    assert where in alerts[0].message and "assembler.max_slices (512)" in alerts[0].message


def test_mosaic_count_above_max_slices_is_refused():
    volumes, alerts = _feed(Assembler(AssemblerConfig()),
                            _mosaics(1, edit=lambda ds, i: _set_mosaic_count(ds, 1600)))
    assert volumes == [] and [a.code for a in alerts] == ["implausible_header"]
    assert "NumberOfImagesInMosaic (CSA image header) 1600 is more slices than " \
           "assembler.max_slices (1024)" in alerts[0].message


def test_mosaic_count_larger_than_its_tiles_hold_is_refused():
    """A 384 x 384 mosaic of 64 x 64 images holds 36; a header saying 64 would cut it
    into 8 x 8 tiles of 48 x 48 and build a wrong volume without a word."""
    volumes, alerts = _feed(Assembler(AssemblerConfig()),
                            _mosaics(1, edit=lambda ds, i: _set_mosaic_count(ds, 64)))
    assert volumes == [] and [a.code for a in alerts] == ["implausible_header"]
    assert "NumberOfImagesInMosaic (CSA image header) 64 is more images than the mosaic " \
           "holds: 8x8 tiles of 48x48 in 384x384, smaller than the acquired matrix (64, " \
           "AcquisitionMatrix (0018,1310)), which fits at most 36" in alerts[0].message
    # the private copy alone is read the same way
    def private_only(ds, i):
        _set_mosaic_count(ds, 64)
        del ds[0x0029, 0x1010]
    _, alerts = _feed(Assembler(AssemblerConfig()), _mosaics(1, edit=private_only))
    assert "NumberOfImagesInMosaic (0019,100A) 64 is more images" in alerts[0].message
    # fewer images than tiles (36 of 6 x 6 said as 31) is a count the tiles hold
    volumes, alerts = _feed(Assembler(AssemblerConfig()),
                            _mosaics(1, edit=lambda ds, i: _set_mosaic_count(ds, 31)))
    assert alerts == [] and volumes[0].shape == (64, 64, 31)


@pytest.mark.parametrize("keyword, value", [("AcquisitionNumber", 3_000_000),
                                            ("TemporalPositionIdentifier", 100_001),
                                            ("InstanceNumber", 2**31 - 1)])
def test_mosaic_volume_number_beyond_max_volumes_is_refused(keyword, value):
    def edit(ds, i):
        for other in ("TemporalPositionIdentifier", "AcquisitionNumber", "InstanceNumber"):
            if other != keyword and i == 2:
                delattr(ds, other)
        if i == 2:
            setattr(ds, keyword, value)
    volumes, alerts = _feed(Assembler(AssemblerConfig()), _mosaics(3, n_volumes=None,
                                                                    edit=edit))
    assert [v.index for v in volumes] == [0, 1]
    assert [a.code for a in alerts] == ["implausible_header"]
    assert f"{keyword} (0020,0" in alerts[0].message and f" {value} numbers a volume " \
        "beyond session.max_volumes (100000)" in alerts[0].message


def test_slice_volume_numbers_beyond_max_volumes_are_refused():
    info = new_series_info(4, 2.0, n_volumes=3)
    slices = volume_to_slices(_DATA, _AFFINE, info, 0)
    slices[3].TemporalPositionIdentifier = 5000
    volumes, alerts = _feed(Assembler(AssemblerConfig(slice_timeout_s=1.0), max_volumes=4000),
                            slices)
    assert [a.code for a in alerts] == ["implausible_header", "missing_slices"]
    assert "TemporalPositionIdentifier (0020,0100) 5000 numbers volume 5000, beyond " \
           "session.max_volumes (4000)" in alerts[0].message
    # GE numbers by the instance cycle: an instance number far beyond the run
    slices = volume_to_slices(_DATA, _AFFINE, info, 0)
    for ds in slices:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        del ds.TemporalPositionIdentifier
    slices[5].InstanceNumber = 36 * 4000 + 6
    _, alerts = _feed(Assembler(AssemblerConfig(slice_timeout_s=1.0), max_volumes=4000),
                      slices)
    assert alerts[0].code == "implausible_header"
    assert "InstanceNumber (0020,0013) 144006 numbers volume 4001" in alerts[0].message


def test_multiframe_counts_beyond_the_caps_are_refused():
    info = new_series_info(5, 2.0, n_volumes=2)
    small = _DATA[:16, :16, :10]
    ds = volumes_to_multiframe(small, Grid((16, 16, 10), (3.0, 3.0, 3.0)).affine(), info, 0)
    volumes, alerts = _feed(Assembler(AssemblerConfig(max_slices=8)), [ds])
    assert volumes == [] and [a.code for a in alerts] == ["implausible_header"]
    assert "10 frames in one temporal position (NumberOfFrames (0028,0008) 10), more " \
           "slices than assembler.max_slices (8)" in alerts[0].message
    both = np.stack([small, small], axis=-1)
    ds = volumes_to_multiframe(both, Grid((16, 16, 10), (3.0, 3.0, 3.0)).affine(), info, 0)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        content = frame.FrameContentSequence[0]
        if content.TemporalPositionIndex == 2:
            content.TemporalPositionIndex = 3_000_000
            content.DimensionIndexValues = [*content.DimensionIndexValues[:2], 3_000_000]
    volumes, alerts = _feed(Assembler(AssemblerConfig()), [ds])
    assert volumes == [] and [a.code for a in alerts] == ["implausible_header"]
    assert "TemporalPositionIndex (0020,9128) 3000000 numbers a volume beyond " \
           "session.max_volumes (100000)" in alerts[0].message


def test_run_length_above_max_volumes_is_unknown_with_one_alert():
    """NumberOfTemporalPositions 2**31 - 1 (and the Siemens protocol saying the same)
    ended in MemoryError and a series without qc.json nor series.end; now the run
    length is unknown, said once."""
    volumes, alerts = _feed(Assembler(AssemblerConfig()), _mosaics(3, n_volumes=2**31 - 1))
    assert [v.index for v in volumes] == [0, 1, 2]
    assert all(v.info.n_expected is None for v in volumes)
    assert [a.code for a in alerts] == ["implausible_header"]
    assert alerts[0].message == ("NumberOfTemporalPositions (0020,0105) announces 2147483647 "
                                 "volumes, more than session.max_volumes (100000): the run "
                                 "length is taken as unknown")
    # below the cap the header's run length stands
    volumes, alerts = _feed(Assembler(AssemblerConfig()), _mosaics(3, n_volumes=20000))
    assert alerts == [] and volumes[0].info.n_expected == 20000


# ---- `rtsc run` fed absurd headers: bounded memory and messages, every series ends -------

@pytest.mark.system
@pytest.mark.slow
def test_rtsc_run_with_absurd_headers_ends_every_series_in_bounded_memory(tmp_path):
    """Through C-STORE into a real `rtsc run`. Before: NumberOfTemporalPositions 20000 on
    3 mosaics took +780 MB at the first volume; 2**31 - 1 ended in MemoryError (the OOM
    killer on this 24 GB machine) with no qc.json and no series.end; AcquisitionNumber
    3,000,000 made 25.9 MB volume and series.end messages; ImagesInAcquisition 20000
    built 64 x 64 x 20000 volumes (+7.5 GB, 77 s). Now each series ends with qc.json and
    series.end, no message passes 10 kB (maps aside), and the process grows by no more
    than an honest run would take: the 20000 makes DVARS allocate 512 volumes ahead, at
    most ``pipeline.series_memory_mb`` (32 MB here, the default), as any run of
    that many volumes does. (Measured: +168 MB for the four series; with honest headers,
    4 volumes announced, +143 MB.)"""
    from conftest import Collector, free_port  # noqa: PLC0415
    from rtsc_subprocess import rtsc_run  # noqa: PLC0415
    from simulator.sender import send_series  # noqa: PLC0415

    def numbered(ds, i):
        del ds.TemporalPositionIdentifier
        del ds[0x0029, 0x1020]  # the Siemens protocol: no run length at all
        ds.AcquisitionNumber = {0: 1, 1: 99_999, 2: 3_000_000}[i]

    absurd = {"ntp_max": _mosaics(3, n_volumes=2**31 - 1),
              "ntp_20000": _mosaics(3, n_volumes=20000),
              "numbers": _mosaics(3, n_volumes=None, edit=numbered)}
    slices = volume_to_slices(_DATA, _AFFINE, new_series_info(4, 2.0, n_volumes=3), 0)
    for ds in slices:
        ds.ImagesInAcquisition = 20000
    pub = free_port()
    with rtsc_run(tmp_path, publish={"endpoint": f"tcp://127.0.0.1:{pub}"},
                  session={"series_timeout_s": 4.0, "report": False},
                  pipeline={"series_memory_mb": 32.0}) as run:
        collector = Collector(f"tcp://127.0.0.1:{pub}")
        try:
            time.sleep(1.5)  # start-up allocations settle; the subscription joins
            before = run.peak_rss_mb()
            t0 = time.monotonic()
            for series in absurd.values():
                report = send_series([[ds] for ds in series], "127.0.0.1", run.port, speed=0)
                assert report.n_failed == 0
            assert send_series([slices], "127.0.0.1", run.port, speed=0).n_failed == 0
            deadline = time.monotonic() + 60
            while len(collector.topic("series.end")) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            grown = run.peak_rss_mb() - before
            print(f"absurd headers: +{grown:.0f} MB, {elapsed:.1f} s")
            output = run.output()
            assert run.stop() == 0
        finally:
            collector.close()
    ends = collector.topic("series.end")
    assert len(ends) == 3, output[-3000:]
    assert len(list((tmp_path / "sessions").rglob("qc.json"))) == 3
    assert grown < 250, (before, grown)
    assert elapsed < 30
    sizes = {m.topic: max(len(json.dumps(n.header)) for n in collector.topic(m.topic))
             for m in collector.messages if m.topic != "map"}
    assert max(sizes.values()) < 10_000, sizes
    summaries = {e.header["summary"]["n_expected"]: e.header["summary"] for e in ends}
    assert set(summaries) == {None, 20000}
    numbered_end = next(e.header["summary"] for e in ends
                        if e.header["summary"]["missing_volumes"] == [[1, 99997]])
    assert numbered_end["n_missing_volumes"] == 99997 and numbered_end["n_volumes"] == 2
    alerts = [m.header for m in collector.topic("alert")]
    codes = [a["code"] for a in alerts]
    assert codes.count("implausible_header") == 1 + 1 + len(slices)  # run length, number
    assert any("announces 2147483647 volumes" in a["message"] for a in alerts)
    assert any("AcquisitionNumber (0020,0012) 3000000" in a["message"] for a in alerts)
    assert "internal_error" not in codes and "stage_failed" not in codes
