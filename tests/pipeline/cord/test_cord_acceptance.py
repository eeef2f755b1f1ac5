"""Spinal cord mode on the simulator's cord run (simulator.cord, 128x128x24, 1x1x5 mm,
TR 2.3 s, interleaved, breathing- and heartbeat-locked slice-wise motion, swallows),
compared with its ground truth: per-slice translations, swallows, cord tSNR per slice,
dropouts and the respiratory part of the phase-encoding shift."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.config import CordMocoConfig, CordQcConfig, CordSimConfig, SimulatorConfig
from rtsc.pipeline.cord.mask import auto_cord_mask, find_cord_centres, mask_centres
from rtsc.pipeline.cord.qc import CordQcStage, respiration_from_physio
from rtsc.pipeline.motion.slicewise import SliceMocoStage
from rtsc.pipeline.physio.retroicor import PhysioSource
from rtsc.volume import SeriesInfo, Volume
from simulator.cord import expected_slice_tsnr, iter_cord_volumes, plan_cord_run
from simulator.physio import write_bids_physio

N = 60
REFERENCE_VOLUMES = 5


# The module's simulated cord run costs ~5 s; every test here uses it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cord_run():
    plan = plan_cord_run(SimulatorConfig(n_volumes=N, seed=3, cord=CordSimConfig(
        shape=[128, 128, 24], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=2.3)))
    volumes = [np.asfortranarray(v.data) for v in iter_cord_volumes(plan)]
    return plan, volumes


def run_cord_stages(plan, volumes, dropout: tuple[int, int] | None = None,
                    respiration=False):
    """Slice-wise moco then cord QC (truth cord mask), as the pipeline chains them.

    Returns the two stages, the metrics per volume and the corrected volumes."""
    info = SeriesInfo(series="cord", tr_s=plan.tr_s, n_expected=N, series_number=1,
                      description="", source="mosaic", phase_encoding_axis="j",
                      bandwidth_pe_hz=plan.bandwidth_per_pixel_phase_hz)
    moco = SliceMocoStage(CordMocoConfig(reference_volumes=REFERENCE_VOLUMES))
    source = (lambda times: plan.physio.respiratory_at(times)) if respiration is True \
        else respiration or None
    qc = CordQcStage(CordQcConfig(), plan.masks()["cord"], respiration=source)
    metrics, corrected = [], []
    affine = plan.grid.affine()
    for t, data in enumerate(volumes):
        if dropout is not None and t == dropout[0]:
            data = data.copy(order="F")
            data[:, :, dropout[1]] *= np.float32(0.45)
        volume = Volume(data, affine, t, info, t * plan.tr_s, 0.0, 0.0,
                        slice_times_s=plan.slice_times_s)
        out = moco.update(volume)
        upstream = dict(out.metrics)
        volume = out.volume or volume
        corrected.append(volume.data)
        qc_out = qc.update(volume, upstream)
        upstream.update(qc_out.metrics)
        upstream["flags"] = out.flags + qc_out.flags
        metrics.append(upstream)
    return moco, qc, metrics, corrected


@pytest.fixture(scope="module")
def processed(cord_run):
    plan, volumes = cord_run
    return run_cord_stages(plan, volumes, respiration=True)


def translation_errors(plan, moco) -> np.ndarray:
    """(N, nz, 2) published minus true translations, mm. The reference is the mean of
    the first volumes, so the truth is taken relative to their mean position."""
    indices, trans = moco.translations()
    assert np.array_equal(indices, np.arange(N))
    truth = plan.slice_shifts - plan.slice_shifts[:REFERENCE_VOLUMES].mean(axis=0)
    return trans - truth


def test_slice_translations_recovered_under_a_tenth_of_a_voxel(cord_run, processed):
    plan, _ = cord_run
    moco, _, metrics, _ = processed
    error = translation_errors(plan, moco)  # 1 mm voxels: mm = voxels in-plane
    rms = float(np.sqrt(np.mean(error ** 2)))
    assert rms < 0.1, rms
    assert rms < 0.03  # measured 0.014 mm
    # what was published per volume is what the stage kept
    for t in range(REFERENCE_VOLUMES - 1, N):
        np.testing.assert_allclose(metrics[t]["slice_trans_y"], moco.trans[t][:, 1])
    # the motion is real: A-P breathing motion of the order of the voxel, swallows ~2.5 mm
    assert np.ptp(plan.slice_shifts[..., 1]) > 2.0


def test_swallow_does_not_leak_into_neighbouring_volumes(cord_run, processed):
    plan, _ = cord_run
    moco, _, _, _ = processed
    error = translation_errors(plan, moco)
    per_volume = np.sqrt(np.mean(error ** 2, axis=(1, 2)))
    swallows = sorted(plan.swallows)
    assert swallows, "the run has swallows"
    truth = plan.slice_shifts
    for s in swallows:
        assert np.abs(truth[s, :, 1] - truth[s - 1, :, 1]).max() > 1.0 or s - 1 in swallows
        assert per_volume[s] < 0.05  # the swallow itself is followed
    neighbours = sorted({s + d for s in swallows for d in (-2, -1, 1, 2)} - set(swallows))
    typical = float(np.median(per_volume))
    assert np.all(per_volume[neighbours] < 0.05)
    assert np.all(per_volume[neighbours] < 2.5 * typical)


def test_cord_slice_tsnr_equals_offline_and_truth(cord_run, processed):
    plan, _ = cord_run
    _, qc, metrics, corrected = processed
    cord = plan.masks()["cord"]
    series = np.stack(corrected, axis=-1).astype(np.float64)
    offline = np.array([np.median(series[:, :, k][cord[:, :, k]].mean(axis=1)
                                  / series[:, :, k][cord[:, :, k]].std(axis=1, ddof=1))
                        for k in range(cord.shape[2])])
    np.testing.assert_allclose(metrics[-1]["slice_tsnr"], offline, rtol=1e-6)
    signal = np.array([series[:, :, k, -1][cord[:, :, k]].mean() for k in range(cord.shape[2])])
    np.testing.assert_allclose(metrics[-1]["slice_signal"], signal, rtol=1e-9)
    expected = expected_slice_tsnr(plan)["expected"]
    ratio = np.asarray(metrics[-1]["slice_tsnr"]) / expected
    assert np.all(np.abs(ratio - 1) < 0.05), ratio


def test_phase_encoding_shift_is_respiratory(cord_run, processed):
    plan, _ = cord_run
    _, _, metrics, _ = processed
    last = metrics[-1]
    assert last["pe_axis"] == "j"
    # PE along j: the affine's j axis is -y (A-P), so the PE shift is minus slice_trans_y
    np.testing.assert_allclose(last["pe_shift_mm"], -np.asarray(last["slice_trans_y"]))
    assert last["pe_offset_hz_rms"] == pytest.approx(
        last["pe_shift_rms_mm"] * plan.bandwidth_per_pixel_phase_hz)
    assert last["pe_resp_band_fraction"] > 0.5
    assert abs(last["pe_resp_correlation"]) > 0.8


def test_dropout_flagged_on_its_slice_and_moco_falls_back(cord_run):
    plan, volumes = cord_run
    moco, qc, metrics, _ = run_cord_stages(plan, volumes[:30], dropout=(20, 9))
    flagged = {t: m["slice_dropout"] for t, m in enumerate(metrics) if m.get("slice_dropout")}
    assert flagged == {20: [9]}
    assert "slice_dropout" in metrics[20]["flags"]
    assert 9 in metrics[20]["slice_moco_failed"]
    truth = plan.slice_shifts[:30] - plan.slice_shifts[:REFERENCE_VOLUMES].mean(axis=0)
    _, trans = moco.translations()
    others = np.delete(np.arange(24), 9)
    assert np.sqrt(np.mean((trans[20, others] - truth[20, others]) ** 2)) < 0.05
    # the failed slice took the polynomial of its neighbours: near its truth, not wild
    assert np.abs(trans[20, 9] - truth[20, 9]).max() < 0.5


def test_pe_shift_correlates_with_the_bids_physio_file(cord_run, processed, tmp_path):
    """The respiratory trace read from the run's BIDS physio file (the physiology reader
    of rtsc.pipeline.physio.retroicor) gives the same correlation as the true belt trace."""
    plan, volumes = cord_run
    path = write_bids_physio(plan.physio, tmp_path, "sub-sim_task-cord")
    source = respiration_from_physio(PhysioSource(path))
    _, _, metrics, _ = run_cord_stages(plan, volumes, respiration=source)
    _, _, truth_metrics, _ = processed
    assert abs(metrics[-1]["pe_resp_correlation"]) > 0.8
    assert metrics[-1]["pe_resp_correlation"] == pytest.approx(
        truth_metrics[-1]["pe_resp_correlation"], abs=0.01)


def test_automatic_cord_mask_and_centres(cord_run):
    """Without spinal_cord.mask: the cylinder centres and the approximate cord mask
    found on the data lie on the simulator's cord."""
    plan, volumes = cord_run
    cord = plan.masks()["cord"]
    reference = np.mean(volumes[:REFERENCE_VOLUMES], axis=0).astype(np.float32)
    found = find_cord_centres(reference, (1.0, 1.0, 5.0))
    assert np.abs(found - mask_centres(cord)).max() < 2.0  # voxels (1 mm)
    mask = auto_cord_mask(volumes[0], (1.0, 1.0, 5.0))
    assert (mask & cord).sum() / mask.sum() > 0.95  # measured 0.999
    assert (mask & cord).sum() / cord.sum() > 0.6  # measured 0.80


def test_swallows_do_not_swamp_the_respiratory_analysis(cord_run):
    """Volumes 0-39 hold all three swallows (13, 14, 25) within the 32-volume window:
    they are left out of the pooled PE shifts, and breathing still dominates."""
    plan, volumes = cord_run
    assert {13, 14, 25} <= set(plan.swallows)
    _, _, metrics, _ = run_cord_stages(plan, volumes[:40], respiration=True)
    assert metrics[-1]["pe_resp_band_fraction"] > 0.5
    assert abs(metrics[-1]["pe_resp_correlation"]) > 0.8
