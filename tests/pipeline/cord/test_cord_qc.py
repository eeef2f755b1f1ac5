"""Cord QC: Welford tSNR per slice against an offline numpy recomputation, the per-slice
dropout monitor, the respiratory share of the phase-encoding shift, the automatic cord
mask and the phase-encoding fields read from DICOM."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from rtsc.config import CordQcConfig
from rtsc.dicom.series_info import phase_encoding
from rtsc.pipeline.cord.mask import auto_cord_mask
from rtsc.pipeline.cord.qc import (
    DropoutState,
    cord_tsnr_init,
    cord_tsnr_step,
    dropout_step,
    respiratory_band_fraction,
)
from cord_images import VOXEL, cord_slices


def offline_slice_tsnr(series: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy: per slice, the median over cord voxels of mean / SD (ddof 1), and the
    cord mean of the last volume."""
    data = series.astype(np.float64)
    tsnr, last = [], []
    for k in range(mask.shape[2]):
        voxels = data[:, :, k][mask[:, :, k]]  # (m_k, n)
        tsnr.append(np.median(voxels.mean(axis=1) / voxels.std(axis=1, ddof=1)))
        last.append(voxels[:, -1].mean())
    return np.asarray(tsnr), np.asarray(last)


def test_slice_tsnr_equals_offline_recomputation(rng):
    shape = (24, 20, 6)
    mask = np.zeros(shape, bool, order="F")
    mask[8:14, 6:15, :] = True
    mask[8:10, 6:8, 3] = False  # slices of different sizes
    level = 600.0 * (1 + 0.35 * np.linspace(-1, 1, shape[2]))  # slice intensities differ
    for offset in (0.0, 1e5):  # the second: large mean, small variance (cancellation)
        state = cord_tsnr_init(mask)
        series = np.zeros((*shape, 30), np.float32)
        for t in range(30):
            volume = np.asfortranarray(
                (offset + level[None, None, :] + rng.normal(0, 12, shape)).astype(np.float32))
            series[..., t] = volume
            tsnr, signal = cord_tsnr_step(state, volume)
            if t in (1, 9, 29):
                expected_tsnr, expected_signal = offline_slice_tsnr(series[..., :t + 1], mask)
                np.testing.assert_allclose(tsnr, expected_tsnr, rtol=1e-6)
                np.testing.assert_allclose(signal, expected_signal, rtol=1e-9)


def test_dropout_judged_against_each_slice_own_baseline(rng):
    params = CordQcConfig(dropout_fraction=0.3, dropout_window=10, dropout_min_history=3)
    state = DropoutState()
    levels = np.array([500.0, 330.0, 650.0, 420.0])  # up to 35% darker slices are normal
    found = []
    for t in range(20):
        signal = levels * (1 + rng.normal(0, 0.02, 4))
        if t == 12:
            signal[2] *= 0.55  # slice 2 drops out
        if t == 15:
            signal[1] *= 0.8  # a 20% dip: not a dropout
        found.append(dropout_step(state, signal, params))
    assert found[12] == [2]
    assert all(f == [] for i, f in enumerate(found) if i != 12)


def test_respiratory_band_fraction(rng):
    tr, nz, n = 2.3, 24, 32
    offsets = np.concatenate([np.arange(0, nz, 2), np.arange(1, nz, 2)]) * tr / nz
    order = np.argsort(np.concatenate([np.arange(0, nz, 2), np.arange(1, nz, 2)]))
    times = (np.arange(n)[:, None] * tr + offsets[order][None, :]).ravel()
    groups = np.tile(np.arange(nz), n)
    slice_level = rng.normal(0, 1, nz)[groups]  # each slice its own mean: removed
    breathing = 0.4 * np.sin(2 * np.pi * 0.28 * times)  # 17 breaths/min, aliased at TR 2.3 s
    noise = rng.normal(0, 0.05, times.size)
    high = respiratory_band_fraction(times, slice_level + breathing + noise, groups,
                                     (0.15, 0.45))
    low = respiratory_band_fraction(times, slice_level + 8 * noise, groups, (0.15, 0.45))
    assert high > 0.8
    assert low < 0.5  # white noise: about the band's share (0.3) of 0..1 Hz


def test_auto_cord_mask_lies_in_the_cord(rng):
    shape = (64, 64, 6)
    centres = np.tile([[30.0, 34.0]], (shape[2], 1))
    data = cord_slices(shape, centres, rng)
    mask = auto_cord_mask(data, VOXEL)
    ii, jj = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    cord = ((ii - 30) / 3.75) ** 2 + ((jj - 34) / 6.5) ** 2 <= 1
    for k in range(shape[2]):
        inside = mask[:, :, k]
        assert inside.sum() >= 0.4 * cord.sum()
        assert (inside & cord).sum() >= 0.9 * inside.sum()


def test_phase_encoding_read_from_dicom():
    ds = Dataset()
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x00191028, "FD", 17.3)
    assert phase_encoding(ds) == {"phase_encoding_axis": "j", "bandwidth_pe_hz": 17.3}
    ds = Dataset()
    ds.InPlanePhaseEncodingDirection = "ROW"
    assert phase_encoding(ds) == {"phase_encoding_axis": "i", "bandwidth_pe_hz": None}
    assert phase_encoding(Dataset()) == {"phase_encoding_axis": None, "bandwidth_pe_hz": None}


def test_cord_config_validated_at_load():
    import pytest

    from rtsc.config import config_from_dict
    from rtsc.errors import ConfigError

    config = config_from_dict({"spinal_cord": {"moco": {"poly_degree": 3},
                                               "qc": {"resp_band_hz": [0.1, 0.5]}}})
    moco, qc = config.spinal_cord.moco, config.spinal_cord.qc  # what the stages take
    assert moco.poly_degree == 3 and moco.output == "estimated"
    assert tuple(qc.resp_band_hz) == (0.1, 0.5)
    for bad, words in (({"moco": {"output": "smooth"}}, ("spinal_cord.moco.output", "smooth",
                                                         "estimated")),
                       ({"moco": {"poly_degree": 11}}, ("spinal_cord.moco.poly_degree", "11")),
                       ({"qc": {"resp_band_hz": [0.1]}}, ("spinal_cord.qc.resp_band_hz",)),
                       ({"moco": {"radius": 3}}, ("spinal_cord.moco.radius",))):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"spinal_cord": bad})
        assert all(w in str(info.value) for w in words), str(info.value)


def test_phase_encoding_of_enhanced_multiframe_and_nifti_sidecar(tmp_path):
    import json

    from pydicom.sequence import Sequence

    from rtsc.intake.replay import sidecar_phase_encoding

    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "COL"
    group = Dataset()
    group.MRFOVGeometrySequence = Sequence([fov])
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    assert phase_encoding(ds)["phase_encoding_axis"] == "j"
    (tmp_path / "bold.json").write_text(json.dumps(
        {"PhaseEncodingDirection": "j-", "BandwidthPerPixelPhaseEncode": 16.9}))
    assert sidecar_phase_encoding(tmp_path / "bold.nii.gz") == {
        "phase_encoding_axis": "j", "bandwidth_pe_hz": 16.9}
    assert sidecar_phase_encoding(tmp_path / "other.nii") == {
        "phase_encoding_axis": None, "bandwidth_pe_hz": None}


def test_breathing_volumes_leave_a_swallow_out(rng):
    from rtsc.pipeline.cord.qc import breathing_volumes

    shifts = 0.3 * np.sin(np.arange(30)[:, None] * 1.3 + np.arange(24)[None, :]) \
        + rng.normal(0, 0.02, (30, 24))
    shifts[[11, 12]] += 2.5  # a two-volume swallow
    np.testing.assert_array_equal(breathing_volumes(shifts),
                                  [i for i in range(30) if i not in (11, 12)])
