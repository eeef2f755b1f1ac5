"""Slice-wise recursive GLM: exact against per-slice numpy lstsq; on a simulated cord run
the dorsal-horn activation is found with RETROICOR and weaker without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rtsc.config import CordSimConfig, SimulatorConfig
from rtsc.pipeline.glm.design import make_design
from rtsc.pipeline.physio.retroicor import PhysioSource, RetroicorOrders
from rtsc.pipeline.cord.slice_glm import CordGlmStage, SliceGlm
from rtsc.volume import SeriesInfo, Volume
from simulator.cord import iter_cord_volumes, plan_cord_run
from simulator.physio import write_bids_physio


def _lstsq_reference(x, y, c):
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    rank = np.linalg.matrix_rank(x)
    resid = y - x @ beta
    sigma2 = (resid ** 2).sum(axis=0) / (x.shape[0] - rank)
    factor = np.einsum("ij,jk,ik->i", c, np.linalg.pinv(x.T @ x), c)
    effect = c @ beta
    return effect, effect / np.sqrt(factor[:, None] * sigma2[None, :])


def test_slice_glm_equals_per_slice_lstsq(rng):
    shape, n = (5, 4, 3), 45
    mask = rng.random(shape) > 0.2
    design = make_design([(6.0, 10.0, "a"), (20.0, 8.0, "b"), (50.0, 10.0, "a")], n, 2.0,
                         high_pass_s=60.0)
    p_slice = 3
    slice_cols = rng.normal(size=(n, shape[2], p_slice))
    slice_cols[:, :, 2] += 0.5 * design.fixed[:, :1]  # correlated with the task column
    glm = SliceGlm(mask, design.p, p_slice, constant=design.column("constant"))
    c = np.zeros((3, design.p + p_slice))
    c[0, :design.p] = design.contrast("a - b")
    c[1, :design.p] = design.contrast("a")
    c[2, design.p + 1] = 1.0  # a slice-specific column
    data = 1000.0 + rng.normal(size=(n,) + shape) * 5.0
    data += 3.0 * design.fixed[:, 0][:, None, None, None] * mask
    data += 4.0 * np.einsum("tk,xyk->txyk", slice_cols[:, :, 1], np.ones(shape))
    data = data.astype(np.float32)
    checked = 0
    for t in range(n):
        glm.update(glm.compact(data[t]), design.row(t), slice_cols[t])
        if t + 1 not in (12, 30, 45):
            continue
        fit = glm.fit(c)
        for k in range(shape[2]):
            sel = glm.slice_of == k
            vox = glm.index[sel]
            y = data[:t + 1].reshape(t + 1, -1, order="F")[:, vox].astype(np.float64)
            x = np.column_stack([design.fixed[:t + 1], slice_cols[:t + 1, k]])
            effect, tval = _lstsq_reference(x, y, c)
            assert np.allclose(fit.effect[:, sel], effect, rtol=1e-6, atol=1e-9)
            assert np.allclose(fit.t[:, sel], tval, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked == 9


@pytest.fixture(scope="module")
def cord_run(tmp_path_factory):
    """A 100-volume simulated cord run (default physiology and slice-wise motion, no
    motion correction), through the RETROICOR GLM stage with the truth cord mask."""
    plan = plan_cord_run(SimulatorConfig(n_volumes=100, seed=11, cord=CordSimConfig(
        shape=[128, 128, 24], voxel_size_mm=[1.0, 1.0, 5.0], tr_s=2.3)))
    physio = write_bids_physio(plan.physio, tmp_path_factory.mktemp("physio"), "sub-1")
    masks = plan.masks()
    design = make_design(plan.events, plan.n_volumes, plan.tr_s)
    stage = CordGlmStage(design, {}, PhysioSource(physio), RetroicorOrders.preset("tapas"),
                         mask=masks["cord"])
    info = SeriesInfo("s", plan.tr_s, plan.n_volumes, 1, "cord", "mosaic")
    for v in iter_cord_volumes(plan):
        stage.update(Volume(np.asfortranarray(v.data), plan.grid.affine(), v.index, info,
                            1.0e9 + v.index * plan.tr_s, 0.0, 0.0, plan.slice_times_s))
    stage.finish()
    return plan, stage


@pytest.mark.slow
def test_dorsal_horn_found_with_retroicor_weaker_without(cord_run):
    plan, stage = cord_run
    summary = stage.summary()
    maps = stage.maps()
    dh = plan.masks()["dorsal_horn"]
    threshold = summary["glm_contrasts"]["task"]["threshold_t"]
    with_t, without_t = maps["t:task"][dh], maps["t_nophysio:task"][dh]
    frac_with, frac_without = np.mean(with_t > threshold), np.mean(without_t > threshold)
    print(f"dorsal horn ({dh.sum()} voxels), t > {threshold:.2f}: with RETROICOR "
          f"{frac_with:.2f} (mean t {with_t.mean():.2f}), without {frac_without:.2f} "
          f"(mean t {without_t.mean():.2f})")
    assert frac_with >= 0.6 and frac_with > frac_without + 0.2
    assert with_t.mean() > 1.2 * without_t.mean()
    # away from the activated horn (no partial volume of it) the cord stays quiet
    quiet = plan.masks()["cord"] & (plan.maps.dorsal_horn < 1e-3)
    false_with = np.mean(maps["t:task"][quiet] > threshold)
    false_without = np.mean(maps["t_nophysio:task"][quiet] > threshold)
    print(f"quiet cord voxels above threshold: {false_with:.4f} / {false_without:.4f}")
    assert false_with < 0.01 and false_without < 0.01
    physio = summary["glm_physio"]
    assert len(physio["columns"]) == 18 and physio["volumes_without_physio"] == []
    r2 = physio["variance_explained"]
    assert r2["mask_mean"] > 0.3 and len(r2["per_slice_median"]) == 24
    assert summary["glm_volumes"] == 100


@pytest.mark.slow
def test_cord_run_live_with_growing_physio_then_replayed_with_the_log(service_factory, tmp_path):
    """A cord run over C-STORE while its BIDS physio grows; then `rtsc replay` of the
    session with the finished .tsv.gz gives the same RETROICOR t-map."""
    import nibabel as nib

    from rtsc.config import config_from_dict, merge, to_dict
    from rtsc.intake.replay import run_replay
    from simulator.bold import block_events
    from simulator.scanner import run_simulation

    n = 30
    sim_changes = {"anatomy": "spinal_cord", "n_volumes": n, "speed": 25.0,
                   "cord": {"psf_samples": 2}}
    cfg0 = config_from_dict({"simulator": sim_changes}).simulator
    plan = plan_cord_run(cfg0)  # the same phantom the run will use: its masks up front
    mask_path = tmp_path / "cord_mask.nii.gz"
    nib.save(nib.Nifti1Image(plan.masks()["cord"].astype(np.uint8), plan.grid.affine()),
             mask_path)
    truth = tmp_path / "truth"
    growing = truth / "physio" / "sub-sim_task-cord_physio.tsv"
    onsets = [e[0] for e in block_events(n, 2.3)]
    glm = {"conditions": {"task": {"onsets_s": onsets, "durations_s": 20.0}}, "n_volumes": n}
    service, collector = service_factory(
        session={"series_timeout_s": 3.0}, glm=glm, spinal_cord={"mask": str(mask_path)},
        physio={"file": str(growing), "preset": "tapas"}, motion={"enabled": False})
    cfg = config_from_dict(merge(to_dict(service.config), {"simulator": sim_changes})).simulator
    sim = run_simulation(cfg, send_to=("127.0.0.1", service.receiver.port), truth_dir=truth)
    assert sim.failures == 0
    assert collector.ended.wait(60), "no series.end"
    volumes = [m.header for m in collector.topic("volume")]
    assert max(h["physio_pending"] for h in volumes) >= 1  # it waited for the physiology
    end = collector.topic("series.end")[0].header
    physio = end["summary"]["glm_physio"]
    assert physio["volumes_without_physio"] == [] and physio["volumes_waiting"] == 0
    assert physio["variance_explained"]["mask_mean"] > 0.2
    assert end["summary"]["glm_volumes"] == n
    live_t = nib.load(end["outputs"]["map:t:task"]).get_fdata()

    config = config_from_dict(merge(to_dict(service.config), {
        "physio": {"file": str(truth / "physio" / "sub-sim_task-cord_physio.tsv.gz")},
        "session": {"dir": str(tmp_path / "replayed")}}))
    session = Path(end["outputs"]["bold"]).parent
    ended = run_replay(config, session / "dicom", speed=0.0)
    replay_t = nib.load(ended[0]["outputs"]["map:t:task"]).get_fdata()
    cord = plan.masks()["cord"]
    assert np.allclose(live_t[cord], replay_t[cord], rtol=1e-6, atol=1e-6)
    # the Siemens PMU logs of the same run (integer samples, placed on the DICOM clock by
    # LogStartMDHTime): the same activation map up to the logs' quantisation
    # through the command line: `rtsc replay SESSION --physio FILE`
    import yaml

    from rtsc.cli import main

    cfg_path = tmp_path / "replay.yaml"
    plain = merge(to_dict(config), {"session": {"dir": str(tmp_path / "replayed_pmu")}})
    cfg_path.write_text(yaml.safe_dump(plain))
    pmu = truth / "physio" / "sub-sim_task-cord.puls"
    assert main(["replay", str(session), "--physio", str(pmu), "--speed", "0",
                 "--config", str(cfg_path)]) == 0
    (out,) = [p for p in (tmp_path / "replayed_pmu").iterdir() if p.is_dir()]
    qc = json.loads((out / "qc.json").read_text())
    assert qc["glm_physio"]["volumes_without_physio"] == [] and qc["glm_volumes"] == n
    pmu_t = nib.load(out / "maps" / "t_task.nii.gz").get_fdata()
    assert np.corrcoef(live_t[cord], pmu_t[cord])[0, 1] > 0.99
    print("PMU vs BIDS t: median |diff|", np.median(np.abs(live_t[cord] - pmu_t[cord])))
    assert np.median(np.abs(live_t[cord] - pmu_t[cord])) < 0.1
