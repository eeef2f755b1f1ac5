"""Physiology readers and RETROICOR: regressors built while the recording grows equal a
plain numpy recomputation from the same samples; beats and phases match the simulator's
truth; clear errors for bad files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import rtsc.pipeline.cord.stages as cord_stages
import rtsc.pipeline.glm.build as glm_build
import rtsc.pipeline.series as series
from rtsc.config import CordSimConfig, SimulatorConfig, config_from_dict
from rtsc.pipeline.cord.qc import CordQcStage
from rtsc.pipeline.glm.design import make_design
from rtsc.pipeline.physio.retroicor import (PhysioError, PhysioSource, RegressorBuilder, RetroicorOrders,
                                  cardiac_peaks, read_bids_physio, read_siemens_physio)
from rtsc.pipeline.cord.slice_glm import CordGlmStage
from rtsc.volume import SeriesInfo, Volume
from simulator.cord import plan_cord_run, slice_order_times
from simulator.physio import (ProgressiveBidsWriter, generate_traces, write_bids_physio,
                              write_siemens_pmu)

TR = 2.3


# ------------------------------------------------------------------ naive references

def naive_peaks(x, hz, final):
    n = x.size
    w, big = max(1, round(0.25 * hz)), max(1, round(1.5 * hz))
    found = []
    for i in range(1, n):
        if not final and i >= n - big:
            break
        near = x[max(0, i - w):i + w + 1]
        ctx = x[max(0, i - big):i + big + 1]
        if x[i] == near.max() and x[i] > x[i - 1] and x[i] - ctx.min() > 0.5 * (ctx.max() - ctx.min()):
            if not found or i - found[-1] > w:
                found.append(i)
    return np.array(found)


def naive_regressors(card, resp, hz, start_s, times, final, orders):
    n = card.size
    beats = start_s + naive_peaks(card, hz, final) / hz
    phi_c = []
    for tau in times:
        j = np.searchsorted(beats, tau, side="right") - 1
        j = min(max(j, 0), beats.size - 2)
        phi_c.append((2 * np.pi * (tau - beats[j]) / (beats[j + 1] - beats[j])) % (2 * np.pi))
    m = max(1, round(0.25 * hz))
    smooth = np.array([resp[max(0, i - m):i + m + 1].mean() for i in range(n)])
    settled = smooth if final else smooth[:n - m]
    lo, hi = settled.min(), settled.max()
    bins = np.minimum(((settled - lo) / (hi - lo) * 100).astype(int), 99)
    phi_r = []
    for tau in times:
        i = min(int(np.rint((tau - start_s) * hz)), n - 1)
        b = min(int(min(max((smooth[i] - lo) / (hi - lo), 0), 1) * 100), 99)
        cdf = np.sum(bins <= b) / bins.size
        if i == 0:
            d = settled[1] - settled[0]
        elif i >= settled.size - 1:
            d = settled[-1] - settled[-2]
        else:
            d = (settled[i + 1] - settled[i - 1]) / 2
        phi_r.append((np.pi * (-1.0 if d < 0 else 1.0) * cdf) % (2 * np.pi))
    phi_c, phi_r = np.array(phi_c), np.array(phi_r)
    cols = []
    for k in range(1, orders.cardiac + 1):
        cols += [np.cos(k * phi_c), np.sin(k * phi_c)]
    for k in range(1, orders.respiratory + 1):
        cols += [np.cos(k * phi_r), np.sin(k * phi_r)]
    for a in range(1, orders.interaction[0] + 1):
        for b in range(1, orders.interaction[1] + 1):
            cols += [np.cos(a * phi_c + b * phi_r), np.sin(a * phi_c + b * phi_r),
                     np.cos(a * phi_c - b * phi_r), np.sin(a * phi_c - b * phi_r)]
    return np.column_stack(cols)


def _volume(data, index, tr, slice_times, t0=1.0e9):
    info = SeriesInfo("s", tr, None, 1, "cord", "mosaic")
    return Volume(np.asfortranarray(data, dtype=np.float32), np.eye(4), index, info,
                  t0 + index * tr, 0.0, 0.0, np.asarray(slice_times))


# ------------------------------------------------------------------------- tests

@pytest.mark.parametrize("preset,n_cols", [("tapas", 18), ("spinal", 33)])
def test_presets(preset, n_cols):
    orders = RetroicorOrders.preset(preset)
    assert orders.n_columns == n_cols == len(set(orders.names()))
    assert RetroicorOrders.preset("tapas", cardiac=2, interaction=[0, 0]).n_columns == 12
    with pytest.raises(PhysioError, match="preset 'fsl'"):
        RetroicorOrders.preset("fsl")


def test_growing_recording_gives_offline_regressors(tmp_path):
    """Regressors for each volume, built as a BIDS .tsv grows (appended in pieces between
    volumes), equal the naive recomputation from that file's samples to 1e-6."""
    n_vol, nz = 30, 6
    traces = generate_traces(n_vol * TR, TR, n_vol, seed=5, hz=100.0)
    writer = ProgressiveBidsWriter(traces, tmp_path, "sub-1_task-x")
    times = slice_order_times(nz, TR, "interleaved")
    orders = RetroicorOrders.preset("tapas")
    design = make_design([(10.0, 20.0, "task")], n_vol, TR)
    mask = np.ones((4, 3, nz), bool)
    stage = CordGlmStage(design, {}, PhysioSource(writer.path), orders, mask=mask)
    rng = np.random.default_rng(0)
    waits = []
    for t in range(n_vol):
        writer.advance((t + 1) * TR - 0.37)  # the physiology written so far, in an odd cut
        stage.update(_volume(100 + rng.normal(size=(4, 3, nz)), t, TR, times))
        waits.append(len(stage.pending))
    writer.finish()
    stage.finish()
    assert max(waits) >= 2 and not stage.pending  # it waited for the physiology, then caught up
    rows = np.loadtxt(writer.path)  # the same samples, read back by plain numpy
    card, resp = rows[:, 0], rows[:, 1]
    start = json.loads((tmp_path / "sub-1_task-x_physio.json").read_text())["StartTime"]
    assert sorted(stage.rows) == list(range(n_vol))
    for t in range(n_vol):
        need = int(np.floor((t * TR + times.max() + 3.0 - start) * 100.0)) + 1
        used = stage.builder.used[t]
        final = need > card.size
        assert used == (card.size if final else need)
        ref = naive_regressors(card[:used], resp[:used], 100.0, start, t * TR + times,
                               final, orders)
        assert np.allclose(stage.rows[t], ref, atol=1e-6, rtol=0), t


def test_beats_and_phases_match_the_truth():
    plan = plan_cord_run(SimulatorConfig(n_volumes=40, seed=2, cord=CordSimConfig(
        shape=[32, 32, 8], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=TR, psf_samples=1)))
    p = plan.physio
    peaks = cardiac_peaks(p.cardiac, p.hz)
    found = p.start_s + peaks / p.hz
    inside = p.beats_s[(p.beats_s > p.times_s[0] + 0.3) & (p.beats_s < p.times_s[-1] - 0.3)]
    assert found.size == inside.size
    assert np.max(np.abs(found - inside)) <= 1.0 / p.hz + 1e-9
    from rtsc.pipeline.physio.retroicor import Recording, slice_phases

    rec = Recording(p.hz, p.start_s, p.cardiac, p.respiratory, True, "sim")
    phi_c, phi_r = slice_phases(rec, plan.acquisition_times_s.ravel(), rec.n, True)

    def err(a, b):
        return np.abs(np.angle(np.exp(1j * (a - b))))

    assert np.median(err(phi_c, plan.cardiac_phase.ravel())) < 0.05
    assert np.median(err(phi_r, plan.respiratory_phase.ravel())) < 0.25
    assert np.percentile(err(phi_r, plan.respiratory_phase.ravel()), 95) < 0.7


def test_bids_and_siemens_readers_agree(tmp_path):
    traces = generate_traces(30.0, TR, 13, seed=1, hz=100.0)
    run_start = 1.7e9 + 0.25
    bids = read_bids_physio(write_bids_physio(traces, tmp_path, "s"))
    assert bids.hz == 100.0 and bids.start_s == pytest.approx(-4.0)
    assert np.allclose(bids.cardiac, traces.cardiac, atol=1e-6)
    puls, _ = write_siemens_pmu(traces, tmp_path, "s", run_start)
    pmu = read_siemens_physio(puls)
    assert pmu.hz == pytest.approx(100.0) and pmu.n == traces.cardiac.size
    builder = RegressorBuilder(PhysioSource(puls), RetroicorOrders(), TR, np.zeros(3),
                               first_volume_epoch_s=run_start)
    rec = builder.recording()
    assert rec.start_s == pytest.approx(traces.start_s, abs=1e-3)
    # the pulse log holds integers 400 + 2400 * trace: the same beats
    assert np.array_equal(cardiac_peaks(pmu.cardiac, pmu.hz), cardiac_peaks(bids.cardiac, 100.0))
    assert np.corrcoef(pmu.respiratory, bids.respiratory)[0, 1] > 0.9999


def test_errors_name_the_file_and_the_problem(tmp_path):
    traces = generate_traces(10.0, TR, 4, seed=1, hz=50.0)
    path = write_bids_physio(traces, tmp_path, "a")
    side = tmp_path / "a_physio.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "Columns": ["pulse", "resp", "trigger"]}))
    with pytest.raises(PhysioError, match=r"a_physio.json: Columns .* 'cardiac'"):
        read_bids_physio(path)
    side.unlink()
    with pytest.raises(PhysioError, match=r"a_physio.tsv.gz: cannot read its sidecar"):
        read_bids_physio(path)
    side.write_text(json.dumps(meta))
    with gzip.open(path, "wt") as fh:
        fh.write("0.1\t0.2\t0\n0.1\tx\t0\n")
    with pytest.raises(PhysioError, match=r"a_physio.tsv.gz: line 2: not numbers"):
        read_bids_physio(path)
    puls, resp = write_siemens_pmu(traces, tmp_path, "b", 1.7e9)
    resp.unlink()
    with pytest.raises(PhysioError, match=r"b.puls: its companion b.resp is missing"):
        read_siemens_physio(puls)
    write_siemens_pmu(traces, tmp_path, "b", 1.7e9)
    puls.write_text(puls.read_text().replace(" 5003", ""))
    with pytest.raises(PhysioError, match=r"b.puls: no end-of-data marker 5003"):
        read_siemens_physio(puls)
    with pytest.raises(PhysioError, match="cannot tell the format"):
        PhysioSource(tmp_path / "physio.csv")


def test_physio_config_is_validated():
    from rtsc.config import config_from_dict
    from rtsc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"physio.csf_mask: null.*preset 'spinal'"):
        config_from_dict({"physio": {"file": "x_physio.tsv.gz", "preset": "spinal"}})
    ok = config_from_dict({"physio": {"file": "x_physio.tsv.gz", "preset": "spinal",
                                      "csf": False, "interaction_order": [1, 2]}})
    assert RetroicorOrders.preset(ok.physio.preset, interaction=ok.physio.interaction_order,
                                  csf=ok.physio.csf).n_columns == 8 + 8 + 8
    with pytest.raises(ConfigError, match=r"physio.interaction_order.*2"):
        config_from_dict({"physio": {"interaction_order": [1]}})
    with pytest.raises(ConfigError, match=r"physio.preset: 'fsl' is not allowed"):
        config_from_dict({"physio": {"preset": "fsl"}})


def test_spinal_preset_csf_column_is_the_slice_csf_mean(tmp_path):
    n_vol, nz = 8, 4
    traces = generate_traces(n_vol * TR, TR, n_vol, seed=3, hz=50.0)
    physio = write_bids_physio(traces, tmp_path, "c")
    rng = np.random.default_rng(1)
    csf = rng.random((6, 5, nz)) > 0.6
    design = make_design([(4.0, 6.0, "task")], n_vol, TR)
    stage = CordGlmStage(design, {}, PhysioSource(physio), RetroicorOrders.preset("spinal"),
                         mask=np.ones((6, 5, nz), bool), csf_mask=csf)
    data = [500 + 20 * rng.normal(size=(6, 5, nz)) for _ in range(n_vol)]
    for t in range(n_vol):
        stage.update(_volume(data[t], t, TR, slice_order_times(nz, TR)))
    stage.finish()
    assert sorted(stage.rows) == list(range(n_vol))
    for t in range(n_vol):
        rows = stage.rows[t]
        assert rows.shape == (nz, 33)
        expected = [data[t][:, :, k][csf[:, :, k]].astype(np.float32).mean() for k in range(nz)]
        assert np.allclose(rows[:, -1], expected, rtol=1e-5)
    with pytest.raises(Exception, match="CSF regressor needs physio.csf_mask"):
        CordGlmStage(design, {}, PhysioSource(physio), RetroicorOrders.preset("spinal"))


def test_cord_stages_share_one_physio_source(tmp_path, monkeypatch):
    """Spinal cord mode with physio.file: the RETROICOR GLM and the cord QC's respiratory
    trace read the file through one PhysioSource (one tail of a growing file per series)."""
    traces = generate_traces(20 * TR, TR, 20, seed=4, hz=50.0)
    physio = write_bids_physio(traces, tmp_path, "s")
    created: list[PhysioSource] = []

    class Counted(PhysioSource):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(cord_stages, "PhysioSource", Counted)
    monkeypatch.setattr(glm_build, "PhysioSource", Counted)
    config = config_from_dict({
        "pipeline": {"mode": "spinal_cord"}, "physio": {"file": str(physio)},
        "glm": {"conditions": {"task": {"onsets_s": [10.0, 30.0], "durations_s": 10.0}}}})
    info = SeriesInfo(series="s", tr_s=TR, n_expected=20, series_number=1, description="",
                      source="mosaic")
    stages, alerts = series.build_stages(config, info)
    glm = next(s for s in stages if isinstance(s, CordGlmStage))
    qc = next(s for s in stages if isinstance(s, CordQcStage))
    assert len(created) == 1 and glm.source is created[0]
    assert created[0].recording is None
    qc.respiration(np.array([1.0, 2.0]))  # the QC's trace polls the GLM's source
    assert created[0].recording is not None
