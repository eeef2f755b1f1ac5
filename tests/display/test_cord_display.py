"""The dashboard in spinal cord mode: the slice x volume motion image and the cord tSNR
profile show the values of the volume messages (produced by the real cord stages on
synthetic cord volumes with known per-slice shifts)."""

from __future__ import annotations

import time

import numpy as np

from rtsc import messages
from rtsc.config import config_from_dict
from rtsc.display.app import fold_all, new_agg_figure
from rtsc.display.dashboard import Dashboard
from rtsc.display.state import DisplayState
from rtsc.pipeline.series import SeriesPipeline, build_stages
from rtsc.volume import SeriesInfo, Volume
from cord_images import cord_slices

SHAPE = (64, 64, 8)
N = 12


def cord_stream(rng: np.random.Generator) -> tuple[list[messages.Message], np.ndarray]:
    """Messages of a short synthetic cord run through the spinal cord stages, and the
    true A-P shifts (n, nz) in mm (RAS y; the affine flips j)."""
    config = config_from_dict({"pipeline": {"mode": "spinal_cord"},
                               "spinal_cord": {"moco": {"reference_volumes": 2,
                                                        "output": "estimated"}}})
    info = SeriesInfo(series="cord", tr_s=2.3, n_expected=N, series_number=1, description="",
                      source="mosaic", phase_encoding_axis="j", bandwidth_pe_hz=17.0)
    stages, _ = build_stages(config, info)
    pipeline = SeriesPipeline(stages)
    affine = np.diag([-1.0, -1.0, 5.0, 1.0])
    frames = [messages.encode(messages.series_start(SHAPE, (1.0, 1.0, 5.0), 2.3, N,
                                                    "spinal_cord"), "cord")]
    shifts_vox = np.zeros((N, SHAPE[2]))
    for t in range(N):
        shifts_vox[t] = 0.8 * np.sin(0.9 * t + np.arange(SHAPE[2])) if t >= 2 else 0.0
        centres = np.stack([np.full(SHAPE[2], 32.0), 32.0 + shifts_vox[t]], axis=1)
        now = time.time()
        volume = Volume(cord_slices(SHAPE, centres, rng), affine, t, info, now, now, now)
        out = pipeline.process(volume)
        frames.append(messages.encode(messages.volume(t, now, now, out.metrics, out.flags),
                                      "cord"))
    return [messages.decode(f) for f in frames], -shifts_vox  # +j is posterior


def test_cord_panels_show_the_message_values(rng, tmp_path):
    stream, truth_mm = cord_stream(rng)
    volumes = [m.header for m in stream if m.topic == "volume"]
    assert all(len(h["slice_trans_y"]) == SHAPE[2] for h in volumes[1:])
    state = DisplayState()
    fold_all(state, stream)
    assert state.mode == "spinal_cord"
    dash = Dashboard(new_agg_figure(), blit=True)
    dash.update(state)
    assert dash.cord is not None and "cord" in dash._panel_artists
    image = np.asarray(dash.cord.image.get_array(), dtype=np.float64)
    expected = np.full((SHAPE[2], image.shape[1]), np.nan)
    for h in volumes:
        if h["slice_trans_y"] is not None:
            expected[:, h["index"]] = h["slice_trans_y"]
    np.testing.assert_allclose(image, expected, equal_nan=True)
    # the image is the motion: the published shifts are the true ones (reference: mean
    # of volumes 0 and 1, both unshifted)
    error = image[:, 2:N] - truth_mm[2:].T
    assert np.sqrt(np.mean(error ** 2)) < 0.04 and np.abs(error).max() < 0.1
    x, y = dash.cord.profile.get_data()
    np.testing.assert_allclose(np.asarray(x, float), volumes[-1]["slice_tsnr"])
    np.testing.assert_array_equal(np.asarray(y), np.arange(SHAPE[2]))
    # the translation panel shows the mean over slices of the per-slice shifts
    lines = dash.line_data()
    np.testing.assert_allclose(lines["trans_y"][1][2:],
                               [np.mean(h["slice_trans_y"]) for h in volumes[2:]])
    dash.save_png(tmp_path / "cord.png")
    assert (tmp_path / "cord.png").stat().st_size > 10_000


def test_brain_stream_has_no_cord_panels():
    state = DisplayState()
    state.fold(messages.decode(messages.encode(
        messages.series_start((8, 8, 4), (3.0, 3.0, 3.0), 2.0, 10, "brain"), "b")))
    dash = Dashboard(new_agg_figure(), blit=False)
    dash.update(state, draw=False)
    assert dash.cord is None and "cord" not in dash._panel_artists
