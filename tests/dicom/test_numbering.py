"""Volume numbering of single-slice series by the vendors' rules (rtsc.dicom.numbering).

Series are built with the simulator's slice writer and then given the numbering each
vendor really writes (GE: AcquisitionNumber 1 everywhere, instance numbers cycling;
Philips: instances slice by slice across time; GE TriggerTime: ImagesInAcquisition
counting the whole run). The known answer is the volumes the simulator encoded; an
image that cannot be placed must come back as an alert naming it, never vanish.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from rtsc.config import AssemblerConfig
from rtsc.dicom.assemble import Assembler, AssemblyAlert
from rtsc.dicom.numbering import (
    ACQUISITION_NUMBER,
    INSTANCE_ACROSS_TIME,
    INSTANCE_CYCLE,
    TEMPORAL_POSITION,
    VolumeNumbering,
    slices_per_volume,
)
from rtsc.dicom.incoming import Incoming
from rtsc.errors import DicomError
from rtsc.volume import Volume
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_slices
from simulator.phantom import Grid

SHAPE = (12, 10, 6)
N_VOLUMES = 4


def _run(rng: np.random.Generator, manufacturer: str = "SIEMENS"):
    affine = Grid(SHAPE, (3.0, 3.0, 4.0)).affine()
    info = new_series_info(3, 2.0, n_volumes=N_VOLUMES, manufacturer=manufacturer,
                           start_time=1_700_000_000.0)
    data = [rng.integers(0, 3000, size=SHAPE, dtype=np.int16) for _ in range(N_VOLUMES)]
    slices = [volume_to_slices(d, affine, info, t) for t, d in enumerate(data)]
    return data, slices


def _as_ge(slices: list[list[Dataset]]) -> list[list[Dataset]]:
    """GE classic: AcquisitionNumber 1 on every slice, no TemporalPositionIdentifier."""
    for volume in slices:
        for ds in volume:
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.AcquisitionNumber = "1"
            del ds.TemporalPositionIdentifier
    return slices


def _feed(assembler: Assembler, datasets) -> tuple[list[Volume], list[AssemblyAlert]]:
    volumes, alerts = [], []
    for ds in datasets:
        for event in assembler.add(Incoming(ds, None, 0.0, "cstore")):
            (volumes if isinstance(event, Volume) else alerts).append(event)
    return volumes, alerts


def _assert_equal(volumes: list[Volume], data: list[np.ndarray]) -> None:
    assert [v.index for v in volumes] == list(range(len(data)))
    for volume, expected in zip(volumes, data):
        np.testing.assert_array_equal(volume.data, expected.astype(np.float32))
        assert volume.missing_slices == ()


def test_ge_volumes_come_from_the_instance_number_cycle(rng):
    data, slices = _run(rng)
    slices = _as_ge(slices)
    assembler = Assembler(AssemblerConfig())
    # Any order within a volume: the cycle places each slice by its instance number.
    order = [volume[k] for volume in slices for k in rng.permutation(len(volume))]
    volumes, alerts = _feed(assembler, order)
    assert alerts == []
    _assert_equal(volumes, data)


def test_ge_slice_count_from_the_private_locations_when_images_count_the_run(rng):
    """GE TriggerTime series: ImagesInAcquisition = slices x time points; (0021,104F)
    holds the slices per volume."""
    data, slices = _run(rng)
    for volume in slices:
        for ds in volume:
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.AcquisitionNumber = "1"
            ds.ImagesInAcquisition = str(SHAPE[2] * N_VOLUMES)
            ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(0x4F, "SS", SHAPE[2])
    count = slices_per_volume(slices[0][0])
    assert (count.n, count.source) == (SHAPE[2], "the GE header's slice count")
    volumes, alerts = _feed(Assembler(AssemblerConfig()), [d for v in slices for d in v])
    assert alerts == []
    _assert_equal(volumes, data)
    assert VolumeNumbering(slices[0][0], count).rule == TEMPORAL_POSITION


def test_philips_classic_numbers_instances_slice_by_slice_across_time(rng):
    data, slices = _run(rng)
    nz = SHAPE[2]
    for t, volume in enumerate(slices):
        for k, ds in enumerate(volume):
            ds.Manufacturer = "Philips Medical Systems"
            ds.InstanceNumber = str(k * N_VOLUMES + t + 1)
            del ds.TemporalPositionIdentifier
            ds.AcquisitionNumber = "1"
    numbering = VolumeNumbering(slices[0][0], slices_per_volume(slices[0][0]))
    assert numbering.rule == INSTANCE_ACROSS_TIME
    # In instance order: the scanner sends one slice position through time, then the next.
    by_instance = sorted((d for v in slices for d in v), key=lambda d: int(d.InstanceNumber))
    assert [d.ImagePositionPatient for d in by_instance[:N_VOLUMES]] == \
        [slices[0][0].ImagePositionPatient] * N_VOLUMES
    assembler = Assembler(AssemblerConfig(slice_timeout_s=1e6))
    volumes, alerts = _feed(assembler, by_instance)
    assert alerts == [] and nz == data[0].shape[2]
    _assert_equal(volumes, data)


def test_constant_acquisition_number_of_an_unknown_vendor_falls_back_to_the_cycle(rng):
    data, slices = _run(rng, manufacturer="ACME MR")
    for volume in slices:
        for ds in volume:
            ds.AcquisitionNumber = "1"
            del ds.TemporalPositionIdentifier
    assembler = Assembler(AssemblerConfig())
    volumes, alerts = _feed(assembler, [d for v in slices for d in v])
    assert alerts == []
    _assert_equal(volumes, data)


def test_siemens_single_slices_are_numbered_by_acquisition_number(rng):
    data, slices = _run(rng)
    for volume in slices:
        for ds in volume:
            del ds.TemporalPositionIdentifier
    numbering = VolumeNumbering(slices[0][0], slices_per_volume(slices[0][0]))
    assert numbering.rule == ACQUISITION_NUMBER
    volumes, alerts = _feed(Assembler(AssemblerConfig()), [d for v in slices for d in v])
    assert alerts == []
    _assert_equal(volumes, data)


def test_a_slice_count_that_contradicts_the_positions_is_named_in_alerts(rng):
    """ImagesInAcquisition one too small: the cycle puts instances at positions their
    slot never had. Those images are archived and named, not dropped."""
    data, slices = _run(rng)
    slices = _as_ge(slices)
    for volume in slices:
        for ds in volume:
            ds.ImagesInAcquisition = str(SHAPE[2] - 1)
    _, alerts = _feed(Assembler(AssemblerConfig()), [d for v in slices for d in v])
    assert alerts and {a.code for a in alerts} <= {"unplaced"}
    assert any("does not fit the series" in a.message for a in alerts)


def test_two_images_at_one_position_of_one_volume_alert_and_a_resend_is_silent(rng):
    data, slices = _run(rng)
    assembler = Assembler(AssemblerConfig())
    volumes, alerts = _feed(assembler, slices[0][:3])
    clash = slices[0][1].copy()
    clash.SOPInstanceUID = generate_uid()
    _, alerts = _feed(assembler, [clash])
    assert [(a.code, a.index) for a in alerts] == [("unplaced", 0)]
    assert "already has another image" in alerts[0].message
    _, alerts = _feed(assembler, [slices[0][1]])  # the same dataset again
    assert alerts == []
    volumes, alerts = _feed(assembler, slices[0][3:])
    assert alerts == [] and len(volumes) == 1


def test_no_slice_count_anywhere_is_refused_with_the_setting_to_use(rng):
    _, slices = _run(rng)
    ds = slices[0][0]
    del ds.ImagesInAcquisition
    with pytest.raises(DicomError, match="assembler.slices_per_volume"):
        slices_per_volume(ds)
    assert slices_per_volume(ds, configured=6).n == 6


def test_rules_chosen_from_the_first_image(rng):
    _, slices = _run(rng)
    ds = slices[0][0]
    count = slices_per_volume(ds)
    assert VolumeNumbering(ds, count).rule == TEMPORAL_POSITION
    del ds.TemporalPositionIdentifier
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    assert VolumeNumbering(ds, count).rule == INSTANCE_CYCLE
    ds.Manufacturer = "Philips Medical Systems"
    del ds.NumberOfTemporalPositions
    with pytest.raises(DicomError, match="Philips"):
        VolumeNumbering(ds, count)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_not_pixel_values(rng, signed):
    """Old Siemens software stores 12 of 16 bits and leaves overlay bits above them."""
    data, slices = _run(rng)
    volume = slices[0]
    stored = []
    for ds in volume:
        pixels = np.frombuffer(ds.PixelData, dtype=np.int16).astype(np.int32)
        if signed:
            values = pixels % 4096 - 2048  # 12-bit two's complement range
            raw = (values & 0x0FFF) | 0x5000  # garbage in the top 4 bits
            ds.PixelRepresentation = 1
        else:
            values = pixels % 4096
            raw = values | 0x3000
            ds.PixelRepresentation = 0
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = raw.astype(np.uint16).tobytes()
        stored.append(values.reshape(SHAPE[1], SHAPE[0]).T)
    (out,), alerts = _feed(Assembler(AssemblerConfig()), volume)
    assert alerts == []
    np.testing.assert_array_equal(out.data, np.stack(stored, axis=2).astype(np.float32))
