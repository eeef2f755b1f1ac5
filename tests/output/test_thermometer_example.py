"""examples/thermometer.py, the PsychoPy neurofeedback thermometer: its value -> bar
mapping, and the program itself in a real window on Xvfb, fed by a real rtsc publisher,
checked by the pixels of every frame that showed a new value."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageGrab

from rtsc import messages
from rtsc.output.publish import Publisher
from xvfb_server import xvfb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "thermometer.py"

VMIN, VMAX, TARGET, TUBE_PX = -1.0, 3.0, 2.0, 360
SIZE = (800, 600)
# Two below the range, the bottom, inside, the target, the top, one above (clipped).
VALUES = [-2.5, -1.0, 0.0, 0.37, 1.234, 2.0, 3.0, 7.5]
RED, TUBE_GREY, YELLOW = (255, 0, 0), (51, 51, 51), (255, 255, 0)


def _example():
    spec = importlib.util.spec_from_file_location("thermometer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_px(value: float) -> int:
    return round(min(1.0, max(0.0, (value - VMIN) / (VMAX - VMIN))) * TUBE_PX)


def test_bar_height_is_linear_clipped_and_rounded():
    bar = _example().bar_height_px
    assert bar(-1.0, -1.0, 3.0, 400) == 0
    assert bar(3.0, -1.0, 3.0, 400) == 400
    assert bar(1.0, -1.0, 3.0, 400) == 200
    assert bar(0.0, -1.0, 3.0, 400) == 100
    assert bar(-7.0, -1.0, 3.0, 400) == 0       # clipped at the bottom
    assert bar(1e9, -1.0, 3.0, 400) == 400      # and at the top
    assert bar(0.01, 0.0, 1.0, 360) == 4        # 3.6 rounds to 4
    assert bar(math.nan, 0.0, 1.0, 360) == 0
    heights = [bar(v, 0.0, 1.0, 300) for v in np.linspace(-0.5, 1.5, 201)]
    assert heights == sorted(heights)
    with pytest.raises(ValueError, match="--max"):
        bar(0.5, 1.0, 1.0, 300)


def _matches(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 8) -> np.ndarray:
    return np.abs(pixels[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tol


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _log_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()
            if line and not line.startswith("#")]


def _wait(condition, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the thermometer exited ({proc.returncode}) while waiting "
                                 f"for {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.skipif(sys.version_info >= (3, 13), reason="PsychoPy 2026.2 supports Python < 3.13")
def test_the_thermometer_draws_every_value_it_receives(tmp_path):
    """A real publisher on an ephemeral port, the example in its own process on Xvfb:
    each published value is logged as drawn with its index, and the saved frame's red bar
    is as many pixels high as the value maps to (clipped ones at the tube's ends), from
    the tube's bottom; "waiting for scanner" before the first value, and the X screen
    itself shows the last value's bar."""
    log, shots = tmp_path / "drawn.tsv", tmp_path / "frames"
    publisher = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    publisher.start()
    proc = None
    try:
        with xvfb(1024, 768) as display:
            env = dict(os.environ, DISPLAY=display, OPENBLAS_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(
                           [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
            proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--endpoint", publisher.endpoint,
                 "--min", str(VMIN), "--max", str(VMAX), "--target", str(TARGET),
                 "--size", f"{SIZE[0]}x{SIZE[1]}", "--tube-px", str(TUBE_PX),
                 "--log", str(log), "--screenshot-dir", str(shots),
                 "--duration", "60", "--end-hold", "1.0"],
                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            banner = proc.stdout.readline()
            assert f"feedback from {publisher.endpoint}" in banner, (banner, proc.stderr.read())
            # Before any value: the window says so, and shows no thermometer.
            time.sleep(0.5)
            waiting = np.asarray(ImageGrab.grab(xdisplay=display).convert("RGB"))
            # PUB/SUB joins asynchronously: probe values of another series until one is
            # drawn, so none of the real ones is lost to the join.
            k = 0

            def probed() -> bool:
                nonlocal k
                publisher.publish(messages.feedback(k, time.time(), VMIN, {}), "probe")
                k += 1
                return any(line[0] == "probe" for line in _log_lines(log))

            _wait(probed, 30, proc, "a probe value to be drawn")
            for i, value in enumerate(VALUES):
                publisher.publish(messages.feedback(i, time.time(), value, {}), "run1")
                time.sleep(0.25)  # a (fast) TR: each value is on screen for many frames
            _wait(lambda: any(line[:2] == ["run1", str(len(VALUES) - 1)]
                              for line in _log_lines(log)), 10, proc, "the last value")
            time.sleep(0.2)
            last_on_screen = np.asarray(ImageGrab.grab(xdisplay=display).convert("RGB"))
            t_end = time.monotonic()
            publisher.publish(messages.series_end(len(VALUES), {}, {}), "run1")
            out, err = proc.communicate(timeout=20)
            ended_after = time.monotonic() - t_end
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        publisher.close()
    assert proc.returncode == 0, err
    assert 0.9 < ended_after < 10, ended_after  # --end-hold after the series' end

    white = _matches(waiting, (255, 255, 255), tol=60).sum()
    assert white > 200, "no 'waiting for scanner' text on the screen"
    assert _matches(waiting, RED).sum() == 0
    assert _matches(waiting, TUBE_GREY, 3).sum(axis=0).max() < 20  # the text's edges, no tube

    drawn = [line for line in _log_lines(log) if line[0] == "run1"]
    assert [int(line[1]) for line in drawn] == list(range(len(VALUES)))
    assert [float(line[2]) for line in drawn] == VALUES
    assert [int(line[3]) for line in drawn] == [_expected_px(v) for v in VALUES]
    t_flip = [float(line[4]) for line in drawn]
    assert t_flip == sorted(t_flip)
    assert all(0 <= float(line[5]) < 1000 for line in drawn)  # the value's age on screen

    text_rows = []
    for i, value in enumerate(VALUES):
        frame = np.asarray(Image.open(shots / f"run1-{i:05d}.png").convert("RGB"))
        assert frame.shape == (SIZE[1], SIZE[0], 3)
        column = frame[:, SIZE[0] // 2]
        tube = _matches(column, TUBE_GREY, 3) | _matches(column, RED) | _matches(column, YELLOW)
        (top, bottom), = _runs(tube)  # one tube, whole
        assert abs((bottom - top) - TUBE_PX) <= 2, (value, top, bottom)
        red = _runs(_matches(column, RED))
        expected = _expected_px(value)
        if expected == 0:
            assert red == [], value
        else:
            (start, stop), = red  # one bar, from the tube's bottom up
            assert stop == bottom, (value, stop, bottom)
            assert abs((stop - start) - expected) <= 2, (value, stop - start, expected)
        # The target line crosses the tube at TARGET's height (covered by the bar there).
        yellow_left = _runs(_matches(frame[:, SIZE[0] // 2 - 75], YELLOW))
        assert len(yellow_left) == 1
        target_row = bottom - _expected_px(TARGET)
        assert abs(sum(yellow_left[0]) / 2 - target_row) <= 2
        text_rows.append(frame[:top].copy())
        assert _matches(text_rows[-1], (255, 255, 255), tol=60).sum() > 100, "no value text"
    # Each value has its own text ("+0.37", "+1.23", ...): no two frames' texts are equal.
    assert len({rows.tobytes() for rows in text_rows}) == len(VALUES)

    # What the X server shows, not only what was drawn: the last value fills the tube.
    red_on_screen = _matches(last_on_screen, RED)
    assert abs(red_on_screen.sum(axis=0).max() - TUBE_PX) <= 2
