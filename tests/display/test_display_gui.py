"""`rtsc display` in a real Tk window on Xvfb during a simulated run, joined late (the
snapshot), with a screenshot of the X screen."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from PIL import ImageGrab

from simulator.scanner import run_simulation

SCREEN = (1680, 1000)


pytestmark = [pytest.mark.system, pytest.mark.slow]


def _start_xvfb() -> tuple[subprocess.Popen, str]:
    read_fd, write_fd = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                             f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
                            pass_fds=[write_fd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    assert number.isdigit(), "Xvfb did not report its display"
    return xvfb, f":{number}"


def _colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    diff = np.abs(image[..., :3].astype(int) - np.array(rgb)).max(axis=-1)
    return int(np.sum(diff <= tol))


def test_display_window_under_xvfb(service_factory, tmp_path: Path) -> None:
    service, collector = service_factory(simulator={"n_volumes": 30, "speed": 6.0})
    xvfb, display = _start_xvfb()
    figure_png = tmp_path / "figure.png"
    proc = None
    try:
        sender = threading.Thread(target=run_simulation, kwargs=dict(
            config=service.config.simulator, send_to=("127.0.0.1", service.receiver.port),
            truth_dir=tmp_path / "truth"), daemon=True)
        sender.start()
        time.sleep(2.0)  # a few volumes are out before the display starts: the snapshot
        env = dict(os.environ, DISPLAY=display, MPLBACKEND="TkAgg", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtsc.cli", "display", "--endpoint", service.publisher.endpoint,
             "--snapshot-endpoint", service.publisher.snapshot_endpoint,
             "--screenshot", str(figure_png), "--screenshot-after", "24", "--exit-after-end"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while not figure_png.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert figure_png.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.5)  # the window's own redraw after the save
        screen = np.asarray(ImageGrab.grab(xdisplay=display))
        matplotlib.image.imsave(tmp_path / "screen.png", screen)
        sender.join(timeout=60)
        assert collector.ended.wait(60)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        xvfb.terminate()
        xvfb.wait(timeout=10)
    assert "display backend TkAgg" in stderr
    assert screen.shape[:2] == (SCREEN[1], SCREEN[0])
    # The window shows the panels with data: the motion lines (tab:red/green/blue), the
    # FD line (black) and the viridis/gray mosaics fill the screen with many colours.
    for rgb in ((214, 39, 40), (44, 160, 44), (31, 119, 180)):
        assert _colour_pixels(screen, rgb) > 300, rgb
    colours = np.unique(screen[..., :3].reshape(-1, 3) // 16, axis=0)
    assert len(colours) > 200
    # The figure the display saved once 24 volumes were shown has the window's size
    # (16 x 9 inches at 100 dpi, less what the window manager-less Tk rounding takes).
    saved = matplotlib.image.imread(figure_png)
    assert abs(saved.shape[0] - 900) <= 2 and abs(saved.shape[1] - 1600) <= 2
