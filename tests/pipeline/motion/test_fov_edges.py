"""Field-of-view edges on real anatomy: a motion-corrected sample outside the acquired grid
is invalid, never a made-up 0 (SPM's realign/reslice rule).

heudiconv's axasc35.dcm (a Siemens TrioTim BOLD mosaic, 64x64x35) cuts the brain at both
edge slices (378 and 303 voxels of the automatic mask in slices 0 and 34). Repeated with
seeded white noise and no motion, the registration still estimates shifts of a few
micrometres along the slice axis; before the fix, the reslice filled the edge slices with
0 wherever the sample fell a hair outside the grid, and DVARS doubled (21 of 30 clean
volumes flagged ``outlier``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from real_data import AXASC35, copies_as_series, fetch
from simulator.sender import send_files

N_VOLUMES = 30
NOISE_SIGMA = 12.0  # intensity units (brain ~1000: voxel tSNR ~80)


@pytest.fixture(scope="module")
def axasc35() -> Path:
    return fetch(AXASC35)


def noisy_series(source: Path, out: Path, n: int, sigma: float, seed: int) -> list[Path]:
    """``n`` copies of a mosaic as one new series (new UIDs and numbers), each with its own
    seeded white Gaussian noise of SD ``sigma`` added (rounded, kept within 0..4095)."""
    rng = np.random.default_rng(seed)

    def noisy(t: int, pixels: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, 4095)

    return copies_as_series(source, out, n, noisy)


def _confounds(path: Path) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {key: np.array([math.nan if r[key] == "n/a" else float(r[key]) for r in rows])
            for key in ("dvars", "std_dvars")}


OUTLIER_RULE = {"code": "outlier", "level": "warning", "metric": "flag:outlier", "op": ">=",
                "value": 1.0, "count": 1, "window": 1}


def _run(service_factory, tmp_path: Path, files: list[Path], motion: bool, name: str):
    from rtsc.config import _default_rules, to_dict  # noqa: PLC0415

    rules = [to_dict(r) for r in _default_rules()] + [OUTLIER_RULE]
    service, collector = service_factory(
        motion={"enabled": motion},
        # copies of one image announce no run length: end 2 s after the last (sent unpaced)
        session={"dir": str(tmp_path / name), "series_timeout_s": 2.0},
        qc={"alerts": rules})
    report = send_files(files, "127.0.0.1", service.receiver.port)
    assert report.n_failed == 0
    assert collector.ended.wait(60), "no series.end"
    volumes = [m.header for m in collector.topic("volume")]
    assert [v["index"] for v in volumes] == list(range(len(files)))
    alerts = [m.header for m in collector.topic("alert")]
    end = collector.topic("series.end")[0].header
    return volumes, alerts, end


@pytest.mark.slow
def test_motion_correction_of_a_still_head_cut_by_the_fov_changes_no_dvars(
        service_factory, tmp_path, axasc35):
    """Motion correction on vs off, same data: live and final DVARS and std_DVARS agree
    within 2 % for every volume (the head does not move: the reslice moves samples by
    micrometres), no volume is an outlier or a spike, no motion or outlier alert."""
    files = noisy_series(axasc35, tmp_path / "series", N_VOLUMES, NOISE_SIGMA, seed=7)
    runs = {motion: _run(service_factory, tmp_path, files, motion, f"motion_{motion}")
            for motion in (False, True)}
    off, on = runs[False], runs[True]
    # the registration found (almost) nothing
    trans = np.array([[v[k] for k in ("trans_x", "trans_y", "trans_z")] for v in on[0]])
    assert np.abs(trans).max() < 0.05
    for key in ("dvars", "std_dvars"):
        live_off = np.array([v[key] for v in off[0][1:]], dtype=float)
        live_on = np.array([v[key] for v in on[0][1:]], dtype=float)
        finite = np.isfinite(live_off)
        assert finite.sum() >= N_VOLUMES - 3  # NaN for the first volumes only
        np.testing.assert_array_equal(np.isfinite(live_on), finite)
        np.testing.assert_allclose(live_on[finite], live_off[finite], rtol=0.02)
        final_off = _confounds(Path(off[2]["outputs"]["bold"]).parent / "confounds.tsv")[key]
        final_on = _confounds(Path(on[2]["outputs"]["bold"]).parent / "confounds.tsv")[key]
        np.testing.assert_allclose(final_on[1:], final_off[1:], rtol=0.02)
    for volumes, alerts, end in (off, on):
        assert not [v["index"] for v in volumes if "outlier" in v["flags"] or v["outlier"]]
        assert not [v["index"] for v in volumes if "spike" in v["flags"]]
        assert end["summary"]["dvars_outliers"] == 0
        assert not [a for a in alerts if a["code"] in ("motion", "outlier", "spike",
                                                       "registration_failed")]
    # every voxel stayed valid (published: valid_voxels); without motion correction
    # there is no reslice and no count
    assert all(v["valid_voxels"] == 64 * 64 * 35 for v in on[0])
    assert on[2]["summary"]["valid_voxels"] == 64 * 64 * 35
    assert all(v.get("valid_voxels") is None for v in off[0])


class _Capture:
    """A last stage that keeps what the stages saw: the corrected data and coverage."""

    name = "capture"

    def __init__(self) -> None:
        self.data: list[np.ndarray] = []
        self.coverage: list = []

    def update(self, volume, upstream=None):
        from rtsc.pipeline.stages import StageResult  # noqa: PLC0415

        self.data.append(volume.data.copy(order="F"))
        self.coverage.append(volume.coverage)
        return StageResult()

    def maps(self):
        return {}

    def summary(self):
        return {}


@pytest.mark.slow
def test_a_shift_along_the_slice_axis_takes_the_edge_slice_out_of_dvars_and_tsnr(axasc35):
    """From volume 10 on the head sits 1 mm (0.28 voxel) higher along the slice axis:
    the top slice's corrected samples fall outside the acquired grid, so its voxels
    leave the run's validity mask, and DVARS (live and final) and tSNR are those of a
    NumPy recomputation over the automatic mask AND the final validity mask."""
    import dataclasses  # noqa: PLC0415
    import time  # noqa: PLC0415

    from scipy import ndimage  # noqa: PLC0415

    from rtsc.config import AssemblerConfig, config_from_dict  # noqa: PLC0415
    from rtsc.dicom.assemble import Assembler  # noqa: PLC0415
    from rtsc.dicom.incoming import Incoming  # noqa: PLC0415
    from rtsc.pipeline.qc.dvars import dvars_offline  # noqa: PLC0415
    from rtsc.pipeline.series import SeriesPipeline, build_stages  # noqa: PLC0415
    from rtsc.pipeline.stages import automatic_mask  # noqa: PLC0415

    ds = pydicom.dcmread(axasc35)
    (first,) = Assembler(AssemblerConfig()).add(Incoming(ds, None, time.time(), "cstore"))
    nz = first.shape[2]
    shift_vox = 1.0 / first.voxel_size_mm[2]
    moved = ndimage.shift(first.data.astype(np.float64), (0.0, 0.0, shift_vox), order=3,
                          mode="nearest")
    rng = np.random.default_rng(11)
    n = N_VOLUMES
    config = config_from_dict({"motion": {"enabled": True}})
    info = dataclasses.replace(first.info, n_expected=n)
    stages, _ = build_stages(config, info)
    capture = _Capture()
    pipeline = SeriesPipeline([*stages, capture])
    outputs = []
    for t in range(n):
        clean = first.data if t < 10 else moved
        data = np.clip(np.rint(clean + rng.normal(0.0, NOISE_SIGMA, clean.shape)), 0, 4095)
        volume = dataclasses.replace(first, data=np.asfortranarray(data, dtype=np.float32),
                                     index=t, info=info)
        outputs.append(pipeline.process(volume))
    assert not [o.alerts for o in outputs if o.alerts]
    trans = np.array([[o.metrics[k] for k in ("trans_x", "trans_y", "trans_z")]
                      for o in outputs])
    assert np.linalg.norm(trans[10:], axis=1) == pytest.approx(1.0, abs=0.1)

    valid = capture.coverage[-1].mask
    # each new coverage lists the voxels that left with it (the stages' short cut)
    versions = {c.version: c for c in capture.coverage}
    assert len(versions) > 1
    for version, coverage in versions.items():
        if version:
            before = versions[version - 1].mask
            np.testing.assert_array_equal(
                coverage.left, np.flatnonzero((before & ~coverage.mask).ravel(order="F")))
    mask = automatic_mask(capture.data[0], config.pipeline.mask_fraction)
    brain = mask & valid
    # the top slice's brain voxels left, the rest stayed; the count is published
    assert mask[:, :, nz - 1].sum() > 200 and not brain[:, :, nz - 1].any()
    assert brain[:, :, : nz - 1].sum() == mask[:, :, : nz - 1].sum()
    counts = [o.metrics["valid_voxels"] for o in outputs]
    assert counts[:10] == [valid.size] * 10 and counts[10:] == [int(valid.sum())] * (n - 10)
    assert all(np.isnan(d[~valid]).all() for d in capture.data[10:])  # never 0
    assert all(np.isfinite(d[brain]).all() for d in capture.data)

    series = np.stack([d[brain] for d in capture.data], axis=1)
    dvars, std_dvars = dvars_offline(series)
    final = pipeline.final_confounds()
    np.testing.assert_allclose(final["dvars"][1:], dvars[1:], rtol=1e-6)
    np.testing.assert_allclose(final["std_dvars"][1:], std_dvars[1:], rtol=1e-6)
    live = np.array([o.metrics["dvars"] for o in outputs], dtype=float)
    assert live[-1] == pytest.approx(dvars[-1], rel=1e-4)
    for t in range(12, n):  # the live value of volume t is that of the run so far
        truncated = dvars_offline(series[:, : t + 1])[0][-1]
        assert live[t] == pytest.approx(truncated, rel=1e-4)
    # only the move itself may stand out (resampled anatomy: a real signal change)
    assert {t for t, o in enumerate(outputs) if "outlier" in o.flags} <= {10}

    stack = np.stack(capture.data, axis=-1).astype(np.float64)
    voxel_tsnr = stack.mean(axis=-1) / stack.std(axis=-1, ddof=1)
    summary = pipeline.summary()
    assert summary["tsnr"] == pytest.approx(float(np.median(voxel_tsnr[brain])), rel=1e-9)
    assert summary["slice_tsnr"][nz - 1] is None
    assert summary["slice_tsnr"][0] == pytest.approx(
        float(np.median(voxel_tsnr[:, :, 0][brain[:, :, 0]])), rel=1e-9)
    assert summary["valid_voxels"] == int(valid.sum())
