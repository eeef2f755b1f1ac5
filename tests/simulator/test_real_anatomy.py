"""The simulator's real-anatomy mode (simulator.real_anatomy) against independent references.

The base images are real (heudiconv's axasc35.dcm, a Siemens TrioTim BOLD mosaic) or
nilearn's MNI152 template; the checks are dcm2niix (the base read back, and the simulated
DICOM read back), nilearn (its EPI mask, its template mask resampled by its own code),
SimpleITK (registration of simulated volumes: motion.tsv is what was applied) and exact
identities (an unmoved volume is the base; a one-voxel move is the base shifted).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np
import pytest

from anatomies import REAL_HEADS, axasc35_anatomy, simulated_head, simulator_section
from real_data import AXASC35, fetch
from rtsc.config import config_from_dict
from rtsc.errors import ConfigError
from simulator.bold import plan_run, iter_volumes, quantise
from simulator.epi_image import head_weight, read_epi_volume
from simulator.motion import moved_coordinates
from simulator.phantom import BrainPhantom, Grid
from simulator.real_anatomy import EPI_MARGIN_SLICES, MNI_AT_ISOCENTRE, CoverageError
from simulator.scanner import make_plan, run_simulation
from sitk_reference import sitk_register_run

GRID = Grid((64, 64, 36), (3.0, 3.0, 3.0))


def _dcm2niix(src: Path, out: Path) -> nib.Nifti1Image:
    """dcm2niix's image of a folder, RAS axes."""
    out.mkdir()
    proc = subprocess.run([dcm2niix.bin, "-z", "n", "-f", "out", "-o", str(out), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return nib.as_closest_canonical(nib.load(out / "out.nii"))


def _dcm2niix_per_file(src: Path, out: Path) -> nib.Nifti1Image:
    """Enhanced multi-frame files one folder each (dcm2niix takes the int16 pixels of the
    second and later files of a folder for float32; see tests/dicom/test_multiframe.py),
    volumes stacked."""
    images = []
    for f in sorted(src.glob("*.dcm")):
        folder = out.parent / f"one_{f.stem}"
        folder.mkdir()
        (folder / f.name).symlink_to(f)
        images.append(_dcm2niix(folder, out.parent / f"nii_{f.stem}"))
    data = np.stack([np.asarray(i.dataobj) for i in images], axis=-1)
    return nib.Nifti1Image(data, images[0].affine)


def _sim_config(head: str, **changes):
    return config_from_dict({"simulator": {**simulator_section(head), "speed": 0.0,
                                           **changes}}).simulator


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---------------------------------------------------------------------------- the bases


@pytest.mark.system
def test_unmoved_epi_head_is_the_measured_image(tmp_path):
    """Volume 0 of an epi_image run is axasc35's own voxels (as dcm2niix reads them) in
    the head, the acquired slab being the base less two slices at each end."""
    path = fetch(AXASC35)
    grid, head = axasc35_anatomy()
    assert grid.shape == (64, 64, 35 - 2 * EPI_MARGIN_SLICES)
    np.testing.assert_allclose(grid.voxel_size_mm, (3.25, 3.25, 3.6))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "axasc35.dcm").symlink_to(path)
    reference = _dcm2niix(tmp_path / "in", tmp_path / "nii")  # RAS axes
    measured = np.asarray(reference.dataobj, dtype=np.float64)[::-1, ::-1, :]  # Grid axes
    acquired = measured[:, :, EPI_MARGIN_SLICES:-EPI_MARGIN_SLICES]
    sampled = head.intensity(grid.ras_coordinates()).reshape(grid.shape)
    weight = head_weight(read_epi_volume(path)[0])[:, :, EPI_MARGIN_SLICES:-EPI_MARGIN_SLICES]
    in_head = weight == 1.0
    assert in_head.mean() > 0.3
    np.testing.assert_allclose(sampled[in_head], acquired[in_head], atol=1e-6)
    # Outside the head the measured noise and ghosts (mean ~40) are gone: the simulator's
    # noise is then the only noise.
    far = weight < 1e-3
    assert far.mean() > 0.2 and acquired[far].mean() > 20.0
    assert np.abs(sampled[far]).max() < 1.0  # a tenth of the default noise sigma


@pytest.mark.parametrize("head_name", REAL_HEADS)
def test_the_field_of_view_cuts_the_brain(head_name, tmp_path):
    """The brain mask reaches the acquired slab's first or last slice (the phantom's does
    not), and the base holds brain beyond the slab, which motion can bring in."""
    sim = run_simulation(_sim_config(head_name, n_volumes=2), out_dir=tmp_path / "run")
    brain = np.asarray(nib.load(sim.truth_dir / "brain_mask.nii.gz").dataobj) > 0
    edge = max(brain[:, :, 0].sum(), brain[:, :, -1].sum())
    assert edge > 150, (brain[:, :, 0].sum(), brain[:, :, -1].sum())
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    assert truth["anatomy"] == simulator_section(head_name)["anatomy"]
    base_affine = np.array(truth["base_affine_ras"])
    grid, kwargs = simulated_head(head_name, GRID)
    base = kwargs["phantom"]
    k_first = base.slice_index(grid.affine()[:3, 3])
    k_last = k_first + grid.shape[2] - 1
    assert base.brain[:, :, :int(np.floor(k_first))].any() or \
        base.brain[:, :, int(np.ceil(k_last)) + 1:].any()
    np.testing.assert_allclose(base_affine, base.affine)
    phantom = BrainPhantom(0).brain_mask(GRID.ras_coordinates()).reshape(GRID.shape)
    assert phantom[:, :, 0].sum() == 0 and phantom[:, :, -1].sum() == 0


def test_epi_brain_mask_agrees_with_nilearn():
    from nilearn.masking import compute_epi_mask

    grid, head = axasc35_anatomy()
    ours = head.brain_mask(grid.ras_coordinates()).reshape(grid.shape)
    measured = read_epi_volume(fetch(AXASC35))[0][:, :, EPI_MARGIN_SLICES:-EPI_MARGIN_SLICES]
    theirs = np.asarray(compute_epi_mask(nib.Nifti1Image(measured.astype(np.float32),
                                                         grid.affine())).dataobj) > 0
    assert _dice(ours, theirs) > 0.9, _dice(ours, theirs)


def test_mni_brain_mask_is_the_template_placed_as_documented():
    """nilearn resamples its own mask onto the acquired grid placed at MNI_AT_ISOCENTRE."""
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img

    grid, kwargs = simulated_head("mni152", GRID)
    ours = kwargs["phantom"].brain_mask(grid.ras_coordinates()).reshape(grid.shape)
    target = grid.affine().copy()
    target[:3, 3] += MNI_AT_ISOCENTRE
    theirs = np.asarray(resample_img(load_mni152_brain_mask(resolution=2), target,
                                     grid.shape, interpolation="nearest",
                                     force_resample=True, copy_header=True).dataobj) > 0
    assert _dice(ours, theirs) > 0.95, _dice(ours, theirs)


@pytest.mark.parametrize("head_name", REAL_HEADS)
def test_activation_is_a_left_cortical_ball_inside_the_field_of_view(head_name):
    grid, kwargs = simulated_head(head_name, GRID)
    base = kwargs["phantom"]
    y = grid.ras_coordinates()
    weight = base.activation(y).reshape(grid.shape)
    centre = base.activation_center_ras
    assert centre[0] < -20  # left hemisphere
    assert base.brain_mask(centre[None])[0]
    assert weight.min() >= 0.0 and weight.max() <= 1.0
    assert (weight > 0.5).sum() >= 100
    far = np.linalg.norm(y - centre, axis=1).reshape(grid.shape) > 21.0
    assert np.all(weight[far] == 0.0)
    # The activation moves with the head: sampled where the head point went, it is the same.
    params = np.array([1.0, -0.5, 0.8, 0.01, -0.02, 0.015])
    c = grid.center_ras()
    from simulator.motion import displace
    np.testing.assert_allclose(base.activation(moved_coordinates(displace(y, params, c),
                                                                 params, c)),
                               weight.ravel(), atol=1e-9)


# ---------------------------------------------------------------------------- motion


def test_one_voxel_moves_shift_the_base_exactly():
    """trans_z = +1 slice (the head moved superior) puts base slice k - 1 at slice k;
    trans_x = +1 voxel (towards the right, lower i) base voxel i + 1 at i. The cubic
    spline interpolates: at the base's own voxels it returns them exactly."""
    grid, head = axasc35_anatomy()
    dx, _, dz = grid.voxel_size_mm
    y = grid.ras_coordinates()
    c = grid.center_ras()
    m = EPI_MARGIN_SLICES
    base = head.image
    up = head.intensity(moved_coordinates(y, np.array([0, 0, dz, 0, 0, 0.0]), c))
    np.testing.assert_allclose(up.reshape(grid.shape), base[:, :, m - 1:-m - 1], atol=1e-6)
    right = head.intensity(moved_coordinates(y, np.array([dx, 0, 0, 0, 0, 0.0]), c))
    np.testing.assert_allclose(right.reshape(grid.shape)[:-1], base[1:, :, m:-m], atol=1e-6)


@pytest.mark.parametrize("head_name", REAL_HEADS)
def test_motion_tsv_is_the_motion_applied_simpleitk(head_name, tmp_path):
    """SimpleITK registers the simulated volumes (DICOM pixel values) to volume 0: its
    estimates equal motion.tsv. Noise sigma 10, motion up to 2 mm and 2 degrees."""

    sim = run_simulation(_sim_config(head_name, n_volumes=6, seed=5, max_trans_mm=2.0,
                                      max_rot_deg=2.0, n_jumps=3),
                         out_dir=tmp_path / "run")
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    motion = np.loadtxt(sim.truth_dir / "motion.tsv", skiprows=1)[:, :6]
    assert np.abs(motion[:, :3]).max() > 0.8 and np.degrees(np.abs(motion[:, 3:])).max() > 0.8
    data = np.load(sim.truth_dir / "bold_quantised.npy").astype(np.float32)
    affine = np.array(truth["affine_ras"])
    grid = Grid(tuple(truth["shape"]), tuple(truth["voxel_size_mm"]))
    volumes = [np.asfortranarray(data[..., t]) for t in range(data.shape[-1])]
    estimate = sitk_register_run(volumes, affine, grid.center_ras())
    trans = np.abs(estimate[:, :3] - motion[1:, :3])
    rot = np.degrees(np.abs(estimate[:, 3:] - motion[1:, 3:]))
    print(f"{head_name}: SimpleITK vs motion.tsv: {trans.max():.3f} mm, {rot.max():.3f} deg")
    assert trans.max() < 0.1 and rot.max() < 0.15, (trans.max(), rot.max())


def test_motion_beyond_the_base_is_refused_not_invented():
    grid, head = axasc35_anatomy()
    with pytest.raises(ConfigError, match=r"simulator\.max_trans_mm / simulator\.max_rot_deg"):
        make_plan(_sim_config("axasc35", n_volumes=40, max_trans_mm=12.0, max_rot_deg=4.0,
                              n_jumps=0))
    # 3.6 mm beyond the top slice: inside the head's footprint, unknown; far out, air.
    top = head.affine[:3, :3] @ np.array([31.5, 31.5, head.shape[2] - 1 + 1.0]) + head.affine[:3, 3]
    with pytest.raises(CoverageError, match="not in the base"):
        head.sample(top[None])
    corner = head.affine[:3, :3] @ np.array([-8.0, -8.0, head.shape[2] + 0.5]) + head.affine[:3, 3]
    assert head.intensity(corner[None])[0] == 0.0
    make_plan(_sim_config("axasc35", n_volumes=40, max_trans_mm=3.0, max_rot_deg=3.0))


# ---------------------------------------------------------------------------- truth and DICOM


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("fmt, vendor", [("mosaic", "siemens"), ("slices", "siemens"),
                                         ("multiframe", "siemens"), ("slices", "philips")])
def test_dicom_pixels_are_the_quantised_truth(fmt, vendor, tmp_path):
    """dcm2niix reads back bold_quantised.npy and truth.json's affine from every layout;
    spikes, drops and the quantisation behave as in phantom mode."""
    sim = run_simulation(_sim_config("axasc35", n_volumes=4, format=fmt, vendor=vendor,
                                     spikes=[[2, 30]], drop_volumes=[3]),
                         out_dir=tmp_path / "run")
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    assert truth["shape"] == [64, 64, 31] and truth["psf_samples"] == 1
    assert truth["base"] == str(fetch(AXASC35))
    quantised = np.load(sim.truth_dir / "bold_quantised.npy")
    np.testing.assert_array_equal(quantised, quantise(np.load(sim.truth_dir / "bold_float.npy")))
    injected = json.loads((sim.truth_dir / "injected.json").read_text())
    assert injected == {"spikes": [[2, 30, 20.0]], "delays_s": {}, "dropped": [3]}
    read = _dcm2niix_per_file if fmt == "multiframe" else _dcm2niix
    theirs = read(sim.dicom_dir, tmp_path / "nii")
    ours = nib.as_closest_canonical(nib.Nifti1Image(quantised[..., :3],
                                                    np.array(truth["affine_ras"])))
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)
    # the files the truth names exist on the acquired grid
    for name in ("activation.nii.gz", "activation_mask.nii.gz", "brain_mask.nii.gz"):
        img = nib.load(sim.truth_dir / name)
        assert img.shape == (64, 64, 31)
        np.testing.assert_allclose(img.affine, truth["affine_ras"], atol=1e-6)


def test_real_volumes_follow_the_bold_model_without_noise():
    """Noise-free: volume t is base(moved) * (1 + pct * w * regressor[t]) * (1 + drift[t])."""
    grid, kwargs = simulated_head("axasc35", GRID)
    plan = plan_run(grid, 30, 2.0, seed=1, noise_sigma=0.0, activation_pct=3.0, **kwargs)
    head = kwargs["phantom"]
    t = int(np.argmax(plan.regressor))
    volume = list(iter_volumes(plan, t, t + 1))[0]
    base, weight = head.sample(moved_coordinates(grid.ras_coordinates(), plan.motion[t],
                                                 grid.center_ras()))
    expected = base * (1 + 0.03 * weight * plan.regressor[t]) * (1 + plan.drift[t])
    np.testing.assert_allclose(volume.data.ravel(), expected, rtol=1e-5, atol=1e-3)
    assert np.abs(plan.motion[t]).max() > 0  # the volume is moved


# ---------------------------------------------------------------------------- config, CLI


def test_config_names_the_base_image_key(tmp_path):
    with pytest.raises(ConfigError, match=r"simulator\.base_image: null"):
        config_from_dict({"simulator": {"anatomy": "epi_image"}})
    with pytest.raises(ConfigError, match=r"simulator\.base_image: .* is not a file"):
        config_from_dict({"simulator": {"anatomy": "epi_image",
                                        "base_image": str(tmp_path / "none.dcm")}})
    with pytest.raises(ConfigError, match=r"simulator\.anatomy"):
        config_from_dict({"simulator": {"anatomy": "axasc35"}})
    with pytest.raises(ConfigError, match=r"simulator\.spikes\[0\].*below 31"):
        make_plan(_sim_config("axasc35", spikes=[[1, 31]]))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(ConfigError, match=r"simulator\.base_image: .*at least 6"):
        make_plan(_sim_config("axasc35", base_image=str(tmp_path / "flat.nii")))


def test_cli_simulate_with_a_base_image(tmp_path, capsys):
    from rtsc.cli import main

    assert main(["simulate", "--out", str(tmp_path / "run"), "--n-volumes", "2",
                 "--speed", "0", "--base-image", str(fetch(AXASC35))]) == 0
    truth = json.loads((tmp_path / "run" / "truth" / "truth.json").read_text())
    assert truth["anatomy"] == "epi_image" and truth["shape"] == [64, 64, 31]
    assert "simulated 2 volumes" in capsys.readouterr().out
