"""An Xvfb X server on a free display, for tests that open real windows.

The same start as tests/display/test_display_gui.py's: Xvfb picks a free display number
itself and writes it to a pipe (``-displayfd``), so parallel runs never collide.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator


@contextlib.contextmanager
def xvfb(width: int = 1024, height: int = 768) -> Iterator[str]:
    """Run Xvfb (24-bit, a black root window, no TCP) for the ``with`` block; yields its DISPLAY (``":N"``)."""
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                               f"{width}x{height}x24", "-br", "-nolisten", "tcp"],
                              pass_fds=[write_fd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()
        assert number.isdigit(), "Xvfb did not report its display"
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)
