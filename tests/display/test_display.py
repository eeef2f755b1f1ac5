"""The dashboard drawn from recorded message streams (Agg): what is drawn is the data of
the messages. Streams are recorded from a real simulated run over C-STORE; a second copy
carries the QC stage's fields (issue 5), computed offline."""

from __future__ import annotations

import numpy as np
import pytest

from rtsc.display.app import fold_all, new_agg_figure, run_headless, HeadlessPlan
from rtsc.display.dashboard import Dashboard
from rtsc.display.state import DisplayState
from rtsc.conventions import MOTION_NAMES
from rtsc.messages import Message, decode, encode
from rtsc.pipeline.stages import automatic_mask

from display_streams import with_qc_fields, without_qc_fields

N = 24


@pytest.fixture
def recorded(recorded_run):
    return recorded_run


def _tiles(volume: np.ndarray, slices) -> np.ndarray:
    """Independent tiling: 4 columns for 12 slices, slice k shown as volume[:, ::-1, k].T."""
    nx, ny, _ = volume.shape
    cols = 4 if len(slices) == 12 else int(np.ceil(np.sqrt(len(slices) * 4 / 3)))
    rows = int(np.ceil(len(slices) / cols))
    out = np.full((rows * ny, cols * nx), np.nan, np.float32)
    for t, k in enumerate(slices):
        r, c = t // cols, t % cols
        out[r * ny:(r + 1) * ny, c * nx:(c + 1) * nx] = np.flipud(volume[:, :, k].T)
    return out


def _values(headers, name):
    return np.array([np.nan if h.get(name) is None else h[name] for h in headers], float)


def _draw(messages):
    state = DisplayState()
    fold_all(state, messages)
    dashboard = Dashboard(new_agg_figure(), blit=True)
    dashboard.update(state)
    return state, dashboard


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_lines_are_the_message_values(recorded):
    messages, truth, _ = recorded
    stream = with_qc_fields(messages, truth)
    state, dash = _draw(stream)
    volumes = [m.header for m in stream if m.topic == "volume"]
    assert len(volumes) == N
    lines = dash.line_data()
    x = np.arange(N, dtype=float)
    for name in MOTION_NAMES:
        drawn_x, drawn_y = lines[name]
        np.testing.assert_array_equal(drawn_x, x)
        expected = _values(volumes, name)
        if name.startswith("rot"):
            expected = np.degrees(expected)  # shown in degrees
        np.testing.assert_allclose(drawn_y, expected, rtol=1e-12)
    # The motion really moved (the simulator's jumps), so the check above is not of zeros.
    assert np.nanmax(np.abs(lines["trans_z"][1])) > 0.1
    for drawn, field in (("fd", "framewise_displacement"), ("std_dvars", "std_dvars"),
                         ("global_signal", "global_signal")):
        np.testing.assert_allclose(lines[drawn][1], _values(volumes, field), equal_nan=True)
    roi = np.array([np.nan if h["roi"]["target"] is None else h["roi"]["target"]
                    for h in volumes])
    np.testing.assert_allclose(lines["roi"][1], roi, equal_nan=True)
    assert lines["thresholds"] == [0.2, 0.3, 0.4]
    spikes = [h["index"] for h in volumes
              if h["slice_spikes"] or {"spike", "outlier"} & set(h["flags"])]
    assert 5 in spikes and 6 in spikes  # injected: slice spikes at 5, a spike flag at 6
    np.testing.assert_array_equal(lines["spikes"][0], spikes)
    # The design under the ROI: the series.start column, which is the simulator's own
    # HRF-convolved regressor (truth/design.tsv).
    start = next(m.header for m in stream if m.topic == "series.start")
    (design,) = lines["design"]
    np.testing.assert_allclose(design, start["design"]["columns"][0])
    true_design = np.loadtxt(truth / "design.tsv", skiprows=1)[:, 0]
    assert np.corrcoef(design, true_design[:N])[0, 1] > 0.99


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_images_are_the_maps(recorded):
    messages, truth, _ = recorded
    stream = with_qc_fields(messages, truth)
    state, dash = _draw(stream)
    maps = {}
    for m in stream:
        if m.topic == "map":
            maps[m.header["name"]] = m.arrays[0]
    shape = tuple(maps["mean"].shape)
    slices = np.unique(np.round(np.linspace(0, shape[2] - 1, 14)[1:-1]).astype(int))
    assert len(slices) == 12
    np.testing.assert_array_equal(dash.tsnr_image.get_array(), _tiles(maps["tsnr"], slices))
    np.testing.assert_array_equal(dash.mean_image.get_array(), _tiles(maps["mean"], slices))
    t = _tiles(maps["t:task"], slices)
    shown = dash.t_image.get_array()
    above = np.abs(np.nan_to_num(t)) >= 3.1
    assert above.sum() > 10  # the simulated activation
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), ~above)
    np.testing.assert_allclose(shown[above], np.abs(t[above]))
    # ROI outline: every outlined pixel is in the ROI, and the ROI's edge is outlined.
    roi = _tiles(maps["roi:target"], slices) > 0.5
    outline = dash.roi_image.get_array()[..., 3] > 0
    assert outline.sum() > 0 and np.all(roi[outline])
    interior = roi.copy()
    interior[1:-1, 1:-1] &= roi[:-2, 1:-1] & roi[2:, 1:-1] & roi[1:-1, :-2] & roi[1:-1, 2:]
    np.testing.assert_array_equal(outline, roi & ~interior)
    assert "outline: roi:target" in dash.act_note.get_text()
    assert "MNI fit" not in dash.act_note.get_text()
    # an ROI placed from MNI space: the registration's quality beside the outline
    first = next(i for i, m in enumerate(stream) if m.topic == "volume")
    header = dict(stream[first].header, mni_registration={"eta2": 0.8512, "coverage": 0.9})
    stream[first] = Message("volume", header, list(stream[first].arrays))
    _, dash = _draw(stream)
    assert "outline: roi:target (MNI fit: template explains 0.85)" in dash.act_note.get_text()


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_carpet_is_the_sampled_voxels_z_scored(recorded):
    messages, truth, service = recorded
    state, dash = _draw(messages)
    volumes = [m for m in messages if m.topic == "volume"]
    k = service.config.publish.carpet_voxels
    samples = np.stack([m.arrays[0] for m in volumes], axis=1).astype(np.float64)
    assert samples.shape == (k, N) and all(m.header["carpet"]["voxels"] == k for m in volumes)
    # Volume 0 is the motion reference (identity): its samples are the acquired values of
    # the in-mask voxels, evenly spaced in Fortran order.
    first = np.load(truth / "bold_quantised.npy")[..., 0].astype(np.float32)
    in_mask = np.flatnonzero(automatic_mask(first, 0.2).ravel(order="F"))
    assert volumes[0].header["carpet"]["mask_voxels"] == in_mask.size
    chosen = in_mask[np.unique(np.round(np.linspace(0, in_mask.size - 1, k)).astype(int))]
    np.testing.assert_allclose(samples[:, 0], first.ravel(order="F")[chosen], rtol=1e-6)
    # a voxel whose corrected sample left the acquired grid is NaN from then on (a gap
    # in its row; its z-scores are over the volumes it has)
    z = (samples - np.nanmean(samples, axis=1, keepdims=True)) \
        / np.nanstd(samples, axis=1, keepdims=True)
    np.testing.assert_allclose(state.carpet_image(), np.clip(z, -3, 3), atol=1e-5)
    drawn = dash.carpet.get_array()  # every step-th sampled voxel is a row on screen
    step = -(-k // 256)
    np.testing.assert_allclose(drawn[:, :N], np.clip(z, -3, 3)[::step], atol=1e-5)


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_status_usable_and_criterion(recorded):
    messages, truth, _ = recorded
    state, dash = _draw(with_qc_fields(messages, truth, target_minutes=2.0))
    status = dash.status.get_text()
    assert f"volume {N} of {N}" in status and "TR 2 s" in status
    assert "ENDED" in status and "verdict warn" in status
    last = [m.header for m in messages if m.topic == "volume"][-1]
    text = dash.usable_text.get_text()
    for key, count in last["usable_frames"].items():
        assert f"FD <= {key} mm: {count} of {N} frames" in text
    minutes = last["usable_frames"]["0.2"] * 2.0 / 60  # injected: frames x TR
    assert f"{minutes:.1f} min" in text
    assert dash.progress.get_width() == pytest.approx(minutes / 2.0)
    assert "ETA" in dash.progress_text.get_text()


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_real_qc_stage_outputs_are_drawn(recorded):
    """The recorded run's own QC stage: the newest ``tsnr`` map and the last volume's
    criterion are what the panels show."""
    messages, _, _ = recorded
    state, dash = _draw(messages)
    tsnr = [m for m in messages if m.topic == "map" and m.header["name"] == "tsnr"][-1]
    slices = np.unique(np.round(np.linspace(0, tsnr.arrays[0].shape[2] - 1, 14)[1:-1])
                       .astype(int))
    np.testing.assert_array_equal(dash.tsnr_image.get_array(), _tiles(tsnr.arrays[0], slices))
    assert np.percentile(tsnr.arrays[0], 90) > 20  # a real tSNR in the head, not zeros
    last = [m.header for m in messages if m.topic == "volume"][-1]
    assert last["criterion"] is not None
    assert dash.progress.get_width() == pytest.approx(min(last["criterion"]["fraction"], 1.0))
    end = next(m.header for m in messages if m.topic == "series.end")
    assert f"verdict {end['summary']['verdict']}" in dash.status.get_text()


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_without_qc_fields_panels_say_na(recorded):
    messages, _, _ = recorded
    state, dash = _draw(without_qc_fields(messages))
    assert "tSNR n/a" in dash.tsnr_note.get_text()
    assert np.ma.count(dash.tsnr_image.get_array()) == 0  # nothing drawn (all NaN)
    assert "criterion n/a" in dash.progress_text.get_text()
    assert dash.progress.get_width() == 0
    assert "min n/a" in dash.usable_text.get_text()
    assert "verdict" not in dash.status.get_text()


def _as_series(messages: list[Message], series: str) -> list[Message]:
    return [decode(encode(Message(m.topic, dict(m.header), list(m.arrays)), series))
            for m in messages]


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_waiting_then_new_series_starts_over(recorded):
    messages, _, _ = recorded
    state = DisplayState()
    dash = Dashboard(new_agg_figure(), blit=True)
    dash.update(state)
    assert dash.status.get_text().startswith("waiting for scanner")
    fold_all(state, messages)
    dash.update(state)
    second = _as_series(messages[:8], "b" * 12)  # start, a few volumes and maps
    n_volumes = sum(m.topic == "volume" for m in second)
    fold_all(state, second)
    dash.update(state)
    assert state.series == "b" * 12 and state.n == n_volumes and state.end is None
    # only the new series' own alerts (here the GLM's note on its motion columns)
    assert [a["code"] for a in state.alerts] == [m.header["code"] for m in second
                                                 if m.topic == "alert"]
    assert set(state.maps) <= {m.header.get("name") for m in second}
    x, y = dash.line_data()["trans_x"]
    np.testing.assert_array_equal(x, np.arange(n_volumes))
    assert "ENDED" not in dash.status.get_text() and f"volume {n_volumes} of {N}" in \
        dash.status.get_text()


@pytest.mark.slow
def test_blitted_frame_equals_a_full_redraw(recorded):
    """Partial (blitted) updates leave the canvas as a full redraw would."""
    messages, truth, _ = recorded
    stream = with_qc_fields(messages, truth)
    state = DisplayState()
    dash = Dashboard(new_agg_figure(), blit=True)
    for m in stream:
        state.fold(m)
        if m.topic == "volume":
            dash.update(state)
    dash.update(state)
    blitted = np.asarray(dash.figure.canvas.buffer_rgba()).copy()
    dash.full_redraw()
    full = np.asarray(dash.figure.canvas.buffer_rgba())
    assert np.mean(np.any(blitted != full, axis=-1)) < 1e-3


@pytest.mark.slow  # the shared recorded run costs ~10 s
def test_headless_png_for_a_volume_shows_that_volume(recorded, tmp_path):
    messages, _, _ = recorded
    plan = HeadlessPlan(tmp_path, at_volumes=[10])
    state = run_headless(messages, plan)
    assert [p.name for p in plan.written] == ["dashboard_vol0010.png",
                                              f"dashboard_{state.series}.png"]
    import matplotlib.image

    early, end = (matplotlib.image.imread(p) for p in plan.written)
    assert early.shape == end.shape == (900, 1600, 4)
    assert np.mean(np.any(early != end, axis=-1)) > 0.01


def test_an_absurd_run_length_preallocates_at_most_1024_volumes():
    """Issue 16 item 3: the display sized its series buffers (the carpet: samples x
    volumes) for series.start's n_expected; 2**31 - 1 asked for 17 TB."""
    from rtsc import messages  # noqa: PLC0415

    state = DisplayState()
    start = messages.series_start([4, 4, 2], [3.0, 3.0, 3.0], 2.0, 2**31 - 1, "brain")
    start.header["series"] = "s"
    state.fold(start)
    for index in range(3):
        volume = messages.volume(index, None, float(index), {},
                                 carpet=np.ones(2000, np.float32), carpet_mask_voxels=4000)
        volume.header["series"] = "s"
        state.fold(volume)
    assert state.n == 3 and state._capacity == 1024
    assert state._carpet is not None and state._carpet.nbytes == 2000 * 1024 * 4
